"""Relevance judgements and per-query ranking metrics shared by Task B and Task C."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from blip_ops.metrics import hits_at_k, ndcg_at_k, paired_summary, success_at_1, summary
from pipelines.evaluation.data import EvalInputError
from pipelines.quality.common import NDCG_AT, RECALL_AT, Relevance, lang_order

logger = logging.getLogger(__name__)


@dataclass
class Judgements:
    """Who answers each query: the labelled product and every relevant one."""

    labelled: np.ndarray  # (Q,) int64 index of the product each query was written for
    relevant: np.ndarray  # (Q, P) bool, the labelled product always included
    index: dict[str, int]  # product_id -> index into the pool
    langs: list[str]  # (Q,)


def judge(
    queries: Sequence[Mapping], products: Sequence[Mapping], relevance: Relevance | None = None
) -> Judgements:
    """Relevance of every pool product to every query (``relevance_matrix`` by default)."""
    if relevance is None:
        from pipelines.catalog.relevance import relevance_matrix as relevance
    index = {p["product_id"]: i for i, p in enumerate(products)}
    outside = [q.get("query_id", q["query"]) for q in queries if q["product_id"] not in index]
    if outside:
        raise EvalInputError(
            f"{len(outside)} of {len(queries)} queries are for products outside the pool of "
            f"{len(products)}, e.g. {outside[:3]}"
        )
    labelled = np.array([index[q["product_id"]] for q in queries], dtype=np.int64)  # (Q,)
    rel = np.array(relevance(queries, products), dtype=bool)  # (Q, P)
    if rel.shape != (len(queries), len(products)):
        raise ValueError(f"relevance gave {rel.shape} for {len(queries)} x {len(products)}")
    rows = np.arange(len(queries))
    missed = int((~rel[rows, labelled]).sum())
    if missed:
        logger.warning("%d queries did not find their own product relevant: counted so", missed)
    rel[rows, labelled] = True
    return Judgements(labelled, rel, index, [q["lang"] for q in queries])


def per_query_metrics(top: np.ndarray, labelled: np.ndarray, relevant: np.ndarray) -> dict:
    """{metric: (Q,) float}: success@1, ndcg@10 and the labelled product's R@1/5/10.

    top: (Q, D) product indices, best first, -1 where a result list is shorter than D.
    """
    top = np.asarray(top, dtype=np.int64)
    n_q = len(labelled)
    if top.ndim != 2 or top.shape[0] != n_q:
        raise ValueError(f"expected ({n_q}, depth) ranked product indices, got {top.shape}")
    if top.shape[1] == 0:
        top = np.full((n_q, 1), -1, dtype=np.int64)
    valid = top >= 0  # (Q, D)
    rows = np.arange(n_q)[:, None]
    rel_ranked = valid & relevant[rows, np.where(valid, top, 0)]  # (Q, D)
    hit = valid & (top == np.asarray(labelled)[:, None])  # (Q, D)
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), np.iinfo(np.int64).max)  # (Q,)
    out = {
        "success@1": success_at_1(rel_ranked),
        f"ndcg@{NDCG_AT}": ndcg_at_k(rel_ranked, NDCG_AT, n_relevant=relevant.sum(axis=1)),
    }
    out.update({f"R@{k}": hits_at_k(rank, k) for k in RECALL_AT})
    return out


def _by_lang(langs: Sequence[str], figure: Callable[[np.ndarray], dict]) -> dict:
    langs = np.asarray(list(langs), dtype=object)
    return {
        "overall": figure(np.ones(len(langs), dtype=bool)),
        "by_lang": {lang: figure(langs == lang) for lang in lang_order(langs.tolist())},
    }


def ranking_report(per_query: Mapping[str, np.ndarray], langs: Sequence[str], n_boot: int) -> dict:
    """{"overall": {metric: summary}, "by_lang": {lang: same}}."""
    return _by_lang(
        langs, lambda m: {name: summary(v[m], n_boot=n_boot) for name, v in per_query.items()}
    )


def paired_report(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], langs: Sequence[str], n_boot: int
) -> dict:
    """:func:`ranking_report` of b minus a, paired over the same queries."""
    return _by_lang(
        langs,
        lambda m: {name: paired_summary(a[name][m], b[name][m], n_boot=n_boot) for name in a},
    )
