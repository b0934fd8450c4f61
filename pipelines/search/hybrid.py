"""Hybrid recall: fuse the vector (ITC) candidates with full-text (BM25) hits on the normalised title.

Embeddings are weak on exact tokens (brand names, model numbers such as "TE04", pinyin spellings);
BM25 on ``title_normalized`` (Chinese titles are indexed through their pinyin normalisation, the
same rule queries go through) is strong there. Two ways to fuse, before the ITM re-rank:

* ``rrf``: reciprocal-rank fusion, ``sum 1 / (rrf_k + rank)`` over both lists (ranks from 1);
  needs no score calibration.
* ``weighted``: ``w * itc + (1 - w) * bm25 / max(bm25)``; items missing from a list score 0 there.

Every fused candidate keeps its ITC cosine (computed from its stored embedding when only BM25
found it), because the re-rank rule adds it to the ITM logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("off", "rrf", "weighted")


def rrf_scores(lists: Sequence[Sequence[str]], k: float = 60.0) -> dict[str, float]:
    """Reciprocal-rank fusion of ranked id lists (best first)."""
    fused: dict[str, float] = {}
    for ranked in lists:
        for rank, item in enumerate(ranked, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused


def weighted_scores(
    itc: dict[str, float], bm25: dict[str, float], weight: float = 0.5
) -> dict[str, float]:
    """``weight * itc + (1 - weight) * bm25 / max(bm25)`` over the union of both."""
    top = max(bm25.values(), default=0.0)
    fused = {}
    for item in set(itc) | set(bm25):
        lexical = bm25.get(item, 0.0) / top if top > 0 else 0.0
        fused[item] = weight * itc.get(item, 0.0) + (1.0 - weight) * lexical
    return fused


def fused_order(
    vector_ids: Sequence[str],
    itc: Sequence[float],
    lexical_ids: Sequence[str],
    bm25: Sequence[float],
    *,
    mode: str,
    n: int,
    rrf_k: float = 60.0,
    weight: float = 0.5,
) -> list[str]:
    """The first ``n`` ids of the fused ranking (ties keep the vector order, then the lexical)."""
    if mode == "rrf":
        fused = rrf_scores([vector_ids, lexical_ids], rrf_k)
    elif mode == "weighted":
        fused = weighted_scores(
            dict(zip(vector_ids, itc, strict=True)),
            dict(zip(lexical_ids, bm25, strict=True)),
            weight,
        )
    else:
        raise ValueError(f"hybrid mode must be one of {MODES[1:]}, got {mode!r}")
    first_seen = {item: i for i, item in enumerate(dict.fromkeys([*vector_ids, *lexical_ids]))}
    ids = sorted(fused, key=lambda item: (-fused[item], first_seen[item]))
    return ids[:n]


def cosine(embeddings: np.ndarray, query: np.ndarray) -> np.ndarray:
    """ITC cosine of L2-normalised stored embeddings (n, D) with the query vector (D,)."""
    if len(embeddings) == 0:
        return np.empty(0, np.float32)
    return (np.asarray(embeddings, np.float32) @ np.asarray(query, np.float32)).astype(np.float32)
