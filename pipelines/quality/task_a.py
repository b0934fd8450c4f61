"""Task A, the paper's task: each product's own titles against the split's images, both ways,
R@1/5/10 for ITC and ITC→ITM per ``k_test``; comparable with BLIP's tables."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from blip_ops.evaluate import evaluate_model
from blip_ops.metrics import hits_at_k, paired_summary, summary
from pipelines.evaluation.catalog import load_catalog
from pipelines.quality.common import RECALL_AT

if TYPE_CHECKING:
    from blip_ops.family import RetrievalModel
    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)


def _recalls(ranks: Mapping[str, np.ndarray], n_boot: int) -> dict:
    """{direction: {"R@K": summary}} from each direction's (n,) 0-based ranks."""
    return {
        d: {f"R@{k}": summary(hits_at_k(r, k), n_boot=n_boot) for k in RECALL_AT}
        for d, r in ranks.items()
    }


def _recall_deltas(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], n_boot: int) -> dict:
    """{direction: {"R@K": paired summary of b minus a}} over the same queries."""
    return {
        d: {
            f"R@{k}": paired_summary(hits_at_k(a[d], k), hits_at_k(b[d], k), n_boot=n_boot)
            for k in RECALL_AT
        }
        for d in a
    }


def task_a_report(metrics: dict, *, k_default: int = 16, n_boot: int = 1000) -> dict:
    """Task A's figures from ``retrieval_metrics(..., languages=..., with_ranks=True)``.

    Returns {lang: {"counts", "itc": {direction: {"R@K": {"value", "ci", "n"}}}, "itm": {"<k>":
    same}, "itm_minus_itc": {"<k>": same, paired}, "itc_r1", "itm_r1"}}; ``itc_r1`` / ``itm_r1``
    are text→product R@1 (fractions), ITM at ``k_default``.
    """
    if "by_lang" not in metrics:
        raise ValueError("Task A needs metrics computed with languages (got no 'by_lang')")
    k = str(int(k_default))
    out = {}
    for lang, block in metrics["by_lang"].items():
        ranks = block.get("ranks")
        if ranks is None:
            raise ValueError("Task A needs metrics computed with with_ranks=True")
        if k not in ranks["itm"]:
            raise ValueError(f"k_default {k} is not among the k_test values {list(ranks['itm'])}")
        itc = _recalls(ranks["itc"], n_boot)
        itm = {kk: _recalls(r, n_boot) for kk, r in ranks["itm"].items()}
        out[lang] = {
            "counts": block["counts"],
            "itc": itc,
            "itm": itm,
            "itm_minus_itc": {
                kk: _recall_deltas(ranks["itc"], r, n_boot) for kk, r in ranks["itm"].items()
            },
            "itc_r1": itc["text_to_product"]["R@1"]["value"],
            "itm_r1": itm[k]["text_to_product"]["R@1"]["value"],
        }
    return out


def task_a(
    model: RetrievalModel,
    catalog_root: str,
    cfg: AppConfig,
    *,
    split: str = "test",
    k_tests: Sequence[int] = (4, 8, 16),
    k_default: int = 16,
    itm_weight: float = 1.0,
    batch_size: int = 32,
    n_boot: int = 1000,
) -> dict:
    """The paper's task on the split's own titles, per language (see :func:`task_a_report`).

    Text→product: each title ranks the split's products; product→text: each product ranks the
    split's titles of that language. ``k_default`` joins ``k_tests`` when it is not among them.
    """
    started = time.perf_counter()
    data = load_catalog(
        catalog_root, split, cfg, target_size=model.image_settings.size, texts="titles"
    )
    ks = sorted({int(k) for k in k_tests} | {int(k_default)})
    metrics = evaluate_model(
        model, data.images, data.texts, data.text_product, languages=data.languages, k_test=ks,
        batch_size=batch_size, itm_weight=itm_weight, with_ranks=True,
    )  # fmt: skip
    out = task_a_report(metrics, k_default=k_default, n_boot=n_boot)
    logger.info(
        "task A (%s, %d products, %d titles, k_test %s): %.1fs",
        split, len(data.product_ids), len(data.texts), ks, time.perf_counter() - started,
    )  # fmt: skip
    return out
