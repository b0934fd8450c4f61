"""Choosing on ``val``: the re-rank's ITM weight, and which fine-tuning setting wins.

The re-rank score is ``cosine + itm_weight * ITM logit`` (:func:`blip_ops.rerank.combine_scores`).
BLIP's rule is weight 1.0; with a weak head the logit swamps the cosine and the re-ranked order
is the head's alone. The weight is a setting like any other, so it is chosen on the val split's
own titles (text→product R@1, the paper's task), never on test. The ITM logits of each title's
``k`` cosine candidates are computed once and every weight re-ranks the same numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from blip_ops.evaluate import ImageTokenCache, embed_images, embed_texts, rank_positives
from pipelines.evaluation.catalog import load_catalog

if TYPE_CHECKING:
    from blip_ops.family import RetrievalModel
    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)

ITM_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)  # 0.0 = ITC alone; 1.0 = BLIP's rule


def sweep_itm_weight(
    model: RetrievalModel,
    catalog_root: str,
    cfg: AppConfig,
    *,
    weights: Sequence[float] = ITM_WEIGHTS,
    split: str = "val",
    k_test: int = 16,
    batch_size: int = 32,
) -> dict:
    """Text→product R@1 of ``split``'s own titles for each re-rank weight, mean over languages.

    Returns {"split", "k_test", "r1": {weight: mean R@1}, "by_lang": {weight: {lang: R@1}},
    "best": the weight with the highest mean R@1 (ties: the smaller weight, nearer to ITC),
    "itm_pairs", "seconds"}.
    """
    if split == "test":
        raise ValueError("the re-rank weight is a tuned setting: choose it on val, never test")
    started = time.perf_counter()
    data = load_catalog(
        catalog_root, split, cfg, target_size=model.image_settings.size, texts="titles"
    )
    cache = ImageTokenCache(model, data.images, max_bytes=1 << 30, batch_size=batch_size)
    image_emb = embed_images(model, data.images, batch_size=batch_size, token_cache=cache)
    sims = embed_texts(model, data.texts) @ image_emb.T  # (T, P)
    k = min(k_test, sims.shape[1])
    logits: dict[int, np.ndarray] = {}

    def itm(q: int, cands: np.ndarray) -> np.ndarray:
        if q not in logits:
            logits[q] = model.itm_scores(data.texts[q], cache.get(cands)).numpy()
        return logits[q]

    labels, langs = np.asarray(data.text_product), np.asarray(data.languages, dtype=object)
    by_lang: dict[float, dict[str, float]] = {}
    for w in weights:
        ranks = rank_positives(
            sims, labels, np.arange(sims.shape[1]), k_test=(k,), itm=itm, itm_weight=float(w)
        ).itm[k]  # (T,)
        by_lang[float(w)] = {
            str(lang): float((ranks[langs == lang] < 1).mean()) for lang in dict.fromkeys(langs)
        }
    r1 = {w: float(np.mean(list(v.values()))) for w, v in by_lang.items()}
    best = max(sorted(r1), key=lambda w: (round(r1[w], 9), -w))
    out = {
        "split": split, "k_test": k, "r1": r1, "by_lang": by_lang, "best": best,
        "itm_pairs": sum(len(v) for v in logits.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    logger.info("ITM weight sweep on %s: R@1 %s, best %s", split, r1, best)
    return out
