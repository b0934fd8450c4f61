"""Task B, shoppers: the held-out shopper queries rank every product of the split; success@1
and nDCG@10 over relevant products, R@1/5/10 of the product each query was written for."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from blip_ops.evaluate import ImageTokenCache, embed_images, embed_texts
from blip_ops.rerank import combine_scores
from pipelines.evaluation.catalog import load_catalog
from pipelines.quality.common import DEPTH, TOKEN_CACHE_BYTES, Relevance
from pipelines.quality.inputs import aligned, catalog_products, catalog_queries
from pipelines.quality.rankings import judge, paired_report, per_query_metrics, ranking_report

if TYPE_CHECKING:
    from blip_ops.family import RetrievalModel
    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)


def rerank_top(
    model: RetrievalModel,
    texts: Sequence[str],
    sims: np.ndarray,
    cache: ImageTokenCache,
    *,
    k_test: int,
    depth: int = DEPTH,
    itm_weight: float = 1.0,
) -> np.ndarray:
    """(Q, min(depth, P)) product indices after ITC→ITM: the first ``k_test`` by cosine ordered by
    cosine + itm_weight × ITM logit (``combine_scores``), the rest in cosine order."""
    n_q, n_p = sims.shape  # (Q, P)
    r = min(k_test, n_p)
    keep = min(max(k_test, depth), n_p)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :keep]  # (Q, keep)
    out = np.empty((n_q, min(depth, n_p)), dtype=np.int64)
    for q in range(n_q):
        cands = order[q]  # (keep,)
        logits = model.itm_scores(texts[q], cache.get(cands[:r])).numpy()  # (r,)
        ranked = combine_scores(sims[q, cands], logits, itm_weight)
        out[q] = cands[ranked.order[: out.shape[1]]]
    return out


def task_b_from_data(
    model: RetrievalModel,
    images: Sequence,
    products: Sequence[Mapping],
    queries: Sequence[Mapping],
    *,
    k_test: int = 16,
    itm_weight: float = 1.0,
    batch_size: int = 32,
    n_boot: int = 1000,
    relevance: Relevance | None = None,
) -> dict:
    """:func:`task_b` on in-memory inputs: ``images[i]`` is ``products[i]``'s image."""
    if k_test < 1:
        raise ValueError(f"k_test must be >= 1, got {k_test}")
    if len(images) != len(products):
        raise ValueError(f"got {len(images)} images for {len(products)} products")
    judged = judge(queries, products, relevance)
    cache = ImageTokenCache(model, images, max_bytes=TOKEN_CACHE_BYTES, batch_size=batch_size)
    image_emb = embed_images(model, images, batch_size=batch_size, token_cache=cache)  # (P, D)
    texts = [q["query"] for q in queries]
    sims = embed_texts(model, texts) @ image_emb.T  # (Q, P) cosines
    top_itc = np.argsort(-sims, axis=1, kind="stable")[:, :DEPTH]  # (Q, min(DEPTH, P))
    top_itm = rerank_top(model, texts, sims, cache, k_test=k_test, itm_weight=itm_weight)
    itc = per_query_metrics(top_itc, judged.labelled, judged.relevant)
    itm = per_query_metrics(top_itm, judged.labelled, judged.relevant)
    return {
        "k_test": k_test,
        "itm_weight": itm_weight,
        "counts": {
            "queries": len(queries),
            "products": len(products),
            "relevant_per_query": float(judged.relevant.sum(axis=1).mean()),
        },
        "itc": ranking_report(itc, judged.langs, n_boot),
        "itm": ranking_report(itm, judged.langs, n_boot),
        "itm_minus_itc": paired_report(itc, itm, judged.langs, n_boot),
    }


def task_b(
    model: RetrievalModel,
    catalog_root: str,
    cfg: AppConfig,
    *,
    split: str = "test",
    k_test: int = 16,
    itm_weight: float = 1.0,
    batch_size: int = 32,
    n_boot: int = 1000,
    relevance: Relevance | None = None,
) -> dict:
    """Shopper queries of the split rank all its products, ITC and ITC→ITM at ``k_test``.

    Returns {"k_test", "itm_weight", "counts", "itc" / "itm": {"overall": {metric: {"value",
    "ci", "n"}}, "by_lang": {lang: same}}, "itm_minus_itc": same, paired}; metrics success@1,
    ndcg@10 (relevant = ``relevance``) and R@1/5/10 of the labelled product.
    """
    started = time.perf_counter()
    data = load_catalog(
        catalog_root, split, cfg, target_size=model.image_settings.size, texts="queries"
    )
    products = aligned(catalog_products(catalog_root, cfg, split), data.product_ids)
    queries = catalog_queries(catalog_root, cfg, split)
    out = task_b_from_data(
        model, data.images, products, queries, k_test=k_test, itm_weight=itm_weight,
        batch_size=batch_size, n_boot=n_boot, relevance=relevance,
    )  # fmt: skip
    logger.info(
        "task B (%s, %d queries, %d products): %.1fs",
        split, len(queries), len(products), time.perf_counter() - started,
    )  # fmt: skip
    return out
