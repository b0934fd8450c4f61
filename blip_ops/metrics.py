"""Search-quality metrics with bootstrap intervals over queries.

A recall of 0.62 on 300 queries and one of 0.58 on the same queries are not a finding until we know
how much either would move on another draw of queries. Every figure here is therefore a mean of
per-query values (0/1 hits, gains), and :func:`bootstrap_ci` resamples the queries to give the
percentile interval of that mean; :func:`paired_bootstrap_ci` does the same for "method B minus
method A" on the same queries, which is much tighter than comparing two separate intervals.

Per-query builders: :func:`hits_at_k` (from 0-based ranks), :func:`success_at_1` and
:func:`ndcg_at_k` (from a (Q, K) boolean "is the product at this position relevant" matrix), and
:func:`roc_auc` (Mann–Whitney, ties half) for score separations such as ITM's own-title vs
sibling-title logits. numpy only: no torch, no Ray, no pipeline imports.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

_BOOT_CHUNK = 256  # resamples drawn at once: bounds memory at 256 x Q indices


def _per_query(values, name: str = "per_query") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected one value per query (1-D), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: got {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


def _check_boot(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def bootstrap_means(per_query: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot,) means of ``per_query`` (Q,) resampled over queries with replacement."""
    values = _per_query(per_query)
    n = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, _BOOT_CHUNK):
        stop = min(start + _BOOT_CHUNK, n_boot)
        picks = rng.integers(0, n, size=(stop - start, n))  # (b, Q) query indices
        out[start:stop] = values[picks].mean(axis=1)
    return out


def bootstrap_ci(
    per_query: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile ``level`` interval of the mean of ``per_query`` (Q,), queries resampled.

    (nan, nan) when there are no queries. The same ``seed`` and Q draw the same resamples.
    """
    _check_boot(n_boot, level)
    values = _per_query(per_query)
    if len(values) == 0:
        return (math.nan, math.nan)
    means = bootstrap_means(values, n_boot=n_boot, seed=seed)  # (n_boot,)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Interval of mean(b) - mean(a) for paired per-query values (same queries, two methods).

    Resampling the queries once for both keeps the pairing: the interval of the mean difference.
    """
    a, b = _per_query(a, "a"), _per_query(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same queries, got {a.shape} and {b.shape}")
    return bootstrap_ci(b - a, n_boot=n_boot, seed=seed, level=level)


def summary(
    per_query: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """{"value": mean or None, "ci": [lo, hi] or [None, None], "n": queries} (JSON-ready)."""
    values = _per_query(per_query)
    if len(values) == 0:
        return {"value": None, "ci": [None, None], "n": 0}
    lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed, level=level)
    return {"value": float(values.mean()), "ci": [lo, hi], "n": len(values)}


def paired_summary(
    a: np.ndarray, b: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """:func:`summary` of the paired difference b - a."""
    a, b = _per_query(a, "a"), _per_query(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same queries, got {a.shape} and {b.shape}")
    return summary(b - a, n_boot=n_boot, seed=seed, level=level)


# --------------------------------------------------------------------------- per-query values


def hits_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """(Q,) float 0/1: 1 where the 0-based rank of the query's positive is below ``k``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = np.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"expected one rank per query (1-D), got shape {ranks.shape}")
    return (ranks < k).astype(np.float64)


def _relevance(relevant_ranked) -> np.ndarray:
    rel = np.asarray(relevant_ranked, dtype=bool)
    if rel.ndim != 2:
        raise ValueError(f"expected a (queries, positions) relevance matrix, got {rel.shape}")
    return rel


def success_at_1(relevant_ranked: np.ndarray) -> np.ndarray:
    """(Q,) float 0/1: the first result is relevant. ``relevant_ranked`` (Q, K) bool, K >= 1."""
    rel = _relevance(relevant_ranked)  # (Q, K)
    if rel.shape[1] == 0:
        raise ValueError("success@1 needs at least one ranked position, got K = 0")
    return rel[:, 0].astype(np.float64)


def ndcg_at_k(relevant_ranked: np.ndarray, k: int = 10, *, n_relevant: np.ndarray) -> np.ndarray:
    """(Q,) nDCG@k with binary gains: sum of 1/log2(pos + 2) over relevant positions < k, divided
    by the ideal DCG of min(n_relevant, k) relevant results (0 for a query with none).

    relevant_ranked: (Q, K) bool, position j = the j-th result (K may be below k: a short list).
    n_relevant: (Q,) how many products are relevant to each query in the whole pool.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rel = _relevance(relevant_ranked)[:, :k]  # (Q, min(K, k))
    n_rel = np.asarray(n_relevant)
    if n_rel.shape != (rel.shape[0],):
        raise ValueError(f"got {n_rel.shape} n_relevant for {rel.shape[0]} queries")
    if (n_rel < rel.sum(axis=1)).any():
        raise ValueError("n_relevant is below the relevant results counted in the ranking")
    discount = 1.0 / np.log2(np.arange(k) + 2.0)  # (k,)
    dcg = (rel * discount[: rel.shape[1]]).sum(axis=1)  # (Q,)
    ideal_cum = np.concatenate([[0.0], np.cumsum(discount)])  # (k + 1,): IDCG of j relevant
    idcg = ideal_cum[np.minimum(n_rel, k).astype(np.int64)]  # (Q,)
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


# --------------------------------------------------------------------------- score separation


def _scores(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(arr).any():
        raise ValueError(f"{name}: got NaN scores")
    return arr


def _auc_positions(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sort the negatives once: (order (B,), first index >= each positive (A,), first index > it)."""
    order = np.argsort(neg, kind="stable")
    neg_sorted = neg[order]  # (B,)
    below = np.searchsorted(neg_sorted, pos, side="left")  # (A,) negatives < p
    upto = np.searchsorted(neg_sorted, pos, side="right")  # (A,) negatives <= p
    return order, below, upto


def _weighted_auc(
    w_pos: np.ndarray, w_neg_sorted: np.ndarray, below: np.ndarray, upto: np.ndarray
) -> float:
    cum = np.concatenate([[0.0], np.cumsum(w_neg_sorted)])  # (B + 1,) weight below each cut
    total = w_pos.sum() * cum[-1]
    if total == 0:
        return math.nan
    return float((w_pos * (cum[below] + 0.5 * (cum[upto] - cum[below]))).sum() / total)


def roc_auc(
    pos_scores: np.ndarray,
    neg_scores: np.ndarray,
    *,
    pos_weight: np.ndarray | None = None,
    neg_weight: np.ndarray | None = None,
) -> float:
    """P(positive score > negative score), ties counted half (Mann–Whitney); nan if a side is empty.

    Optional weights (one per score, e.g. resampling counts) make it the weighted estimate
    sum_ij w_i v_j [p_i > n_j] / (sum w sum v).
    """
    pos, neg = _scores(pos_scores, "pos_scores"), _scores(neg_scores, "neg_scores")  # (A,), (B,)
    w_pos = np.ones_like(pos) if pos_weight is None else np.asarray(pos_weight, np.float64)
    w_neg = np.ones_like(neg) if neg_weight is None else np.asarray(neg_weight, np.float64)
    if w_pos.shape != pos.shape or w_neg.shape != neg.shape:
        raise ValueError(
            f"weights {w_pos.shape}/{w_neg.shape} do not match scores {pos.shape}/{neg.shape}"
        )
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    order, below, upto = _auc_positions(pos, neg)
    return _weighted_auc(w_pos, w_neg[order], below, upto)


def grouped_auc_ci(
    pos_scores: np.ndarray,
    neg_scores: np.ndarray,
    pos_groups: np.ndarray,
    neg_groups: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of :func:`roc_auc` resampling *groups* (e.g. products) with replacement.

    Scores of one group (one image's positive and negatives) move together, as queries do in
    :func:`bootstrap_ci`. Groups are integer ids; (nan, nan) when either side is empty.
    """
    _check_boot(n_boot, level)
    pos, neg = _scores(pos_scores, "pos_scores"), _scores(neg_scores, "neg_scores")
    g_pos = np.asarray(pos_groups, dtype=np.int64).reshape(-1)
    g_neg = np.asarray(neg_groups, dtype=np.int64).reshape(-1)
    if g_pos.shape != pos.shape or g_neg.shape != neg.shape:
        raise ValueError(
            f"groups {g_pos.shape}/{g_neg.shape} do not match scores {pos.shape}/{neg.shape}"
        )
    if len(pos) == 0 or len(neg) == 0:
        return (math.nan, math.nan)
    groups, inverse = np.unique(np.concatenate([g_pos, g_neg]), return_inverse=True)
    i_pos, i_neg = inverse[: len(pos)], inverse[len(pos) :]  # (A,), (B,) group of each score
    order, below, upto = _auc_positions(pos, neg)
    i_neg_sorted = i_neg[order]
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        drawn = rng.integers(0, len(groups), len(groups))
        w = np.bincount(drawn, minlength=len(groups)).astype(np.float64)  # (G,) times drawn
        aucs[b] = _weighted_auc(w[i_pos], w[i_neg_sorted], below, upto)
    aucs = aucs[np.isfinite(aucs)]  # a draw with no positive (or negative) group has no AUC
    if len(aucs) == 0:
        return (math.nan, math.nan)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(aucs, [tail, 1.0 - tail])
    return (float(lo), float(hi))
