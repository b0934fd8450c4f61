"""The two-stage search over one pinned :class:`Snapshot`.

Stage 1: the ITC query embedding (text, image, or the normalised mean of both) finds the top
``candidates`` by cosine in the table (ANN once the job has built an index, exact below that),
optionally filtered. Stage 2: with a text, the first ``rerank_k`` are re-scored with BLIP's rule
(ITM positive logit + ITC cosine) and sorted; the rest follow in ANN order with ``itm_score`` null.
Image-only queries keep the ITC order.

The model work goes through a *scorer* with async ``encode_text``, ``encode_image`` and ``itm``:
the model deployment's handle in the service (``pipelines.search.deployments.HandleScorer``),
:class:`LocalScorer` offline (batch exports, tests). The re-rank is
:func:`pipelines.search.scorer.rerank_job`: the scorer's ITM logits, then
:func:`blip_ops.rerank.rerank`.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Protocol

import numpy as np
import pyarrow as pa
from PIL import Image

from blip_ops.rerank import RerankResult
from pipelines.search.hybrid import cosine, fused_order
from pipelines.search.request import SearchQuery
from pipelines.search.scorer import ItmJob, QueryScorer, rerank_job
from pipelines.search.snapshot import Snapshot


class Scorer(Protocol):
    def normalize_text(self, text: str) -> str: ...

    async def encode_text(self, text: str) -> np.ndarray: ...

    async def encode_image(self, image: Image.Image) -> np.ndarray: ...

    async def itm(self, job: ItmJob) -> np.ndarray: ...


class LocalScorer:
    """A :class:`QueryScorer` behind the async scorer interface (no Ray, one request at a time)."""

    def __init__(self, scorer: QueryScorer):
        self.scorer = scorer
        self.model_id = scorer.model_id

    def normalize_text(self, text: str) -> str:
        return self.scorer.model.normalize_text(text)

    async def encode_text(self, text: str) -> np.ndarray:
        return self.scorer.encode_texts([text])[0]

    async def encode_image(self, image: Image.Image) -> np.ndarray:
        return self.scorer.encode_images([image])[0]

    async def itm(self, job: ItmJob) -> np.ndarray:
        return self.scorer.itm([job])[0]


def query_vector(text_emb: np.ndarray | None, image_emb: np.ndarray | None) -> np.ndarray:
    """The ANN query: one embedding, or the normalised mean of text and image embeddings."""
    parts = [e for e in (text_emb, image_emb) if e is not None]
    if not parts:
        raise ValueError("a query needs a text or an image embedding")
    v = np.mean(np.stack(parts), axis=0).astype(np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def fuse(found: pa.Table, lexical: pa.Table | None, vector: np.ndarray, query) -> pa.Table:
    """The vector candidates and the BM25 hits in fused order (first ``query.candidates``), with
    ``itc`` for every row (from the stored embedding where only BM25 found it) and ``bm25``."""
    n = found.num_rows
    if lexical is None or lexical.num_rows == 0:
        return found.append_column("bm25", pa.nulls(n, pa.float32()))
    vec_ids = found.column("product_id").to_pylist()
    lex_ids = lexical.column("product_id").to_pylist()
    order = fused_order(
        vec_ids,
        found.column("itc").to_pylist(),
        lex_ids,
        lexical.column("bm25").to_pylist(),
        mode=query.hybrid,
        n=query.candidates,
        rrf_k=query.rrf_k,
        weight=query.hybrid_weight,
    )
    bm25 = dict(zip(lex_ids, lexical.column("bm25").to_pylist(), strict=True))
    in_vector = set(vec_ids)
    only_lexical = [i for i, p in enumerate(lex_ids) if p not in in_vector]
    extra = lexical.take(pa.array(only_lexical, pa.int64()))
    emb = (
        np.stack(extra.column("image_embedding").to_numpy(zero_copy_only=False))
        if only_lexical
        else np.empty((0, len(vector)))
    )
    extra = extra.drop_columns(["image_embedding", "bm25"]).append_column(
        "itc", pa.array(cosine(emb, vector), pa.float32())
    )
    both = pa.concat_tables([found, extra.select(found.column_names)])
    position = {p: i for i, p in enumerate(both.column("product_id").to_pylist())}
    fused = both.take(pa.array([position[p] for p in order], pa.int64()))
    scores = [bm25.get(p) for p in order]
    return fused.append_column("bm25", pa.array(scores, pa.float32()))


def ranked_rows(found: pa.Table, ranked: RerankResult, metadata_columns) -> list[dict]:
    """The response's results: the candidates in ranked order with their scores."""
    rows = found.select(["product_id", "title", *metadata_columns]).to_pylist()
    lexical_scores = (
        found.column("bm25").to_pylist() if "bm25" in found.column_names else [None] * len(rows)
    )
    results = []
    for pos, i in enumerate(ranked.order.tolist()):
        row = rows[i]
        results.append(
            {
                "product_id": row["product_id"],
                "title": row["title"],
                "score": float(ranked.score[pos]),
                "itc_score": float(ranked.itc[pos]),
                "itm_score": _num(float(ranked.itm[pos])),
                "lexical_score": lexical_scores[i],
                "metadata": {c: row[c] for c in metadata_columns},
            }
        )
    return results


async def itm_job(text: str | None, found: pa.Table, r: int, snap: Snapshot) -> ItmJob:
    """The re-rank of the first ``r`` candidates: their cache keys and, per candidate, its stored
    ITM tokens or else its model-resolution JPEG, read by row id for these ``r`` rows only (the
    ANN query never reads them: a token set weighs more than the rest of a candidate's row)."""
    if not r:
        return ItmJob(text or "", (), ())
    ids = found.column("product_id").to_pylist()[:r]
    hashes = found.column("content_hash").to_pylist()[:r]
    row_ids = found.column("_rowid").to_pylist()[:r]
    images, tokens = await asyncio.to_thread(snap.rerank_inputs, row_ids)
    keys = tuple(f"{p}:{h}" for p, h in zip(ids, hashes, strict=True))
    stored = tuple(tokens) if any(t is not None for t in tokens) else ()
    return ItmJob(text, keys, tuple(images), stored, snap.model_id if stored else None)


async def search(query: SearchQuery, snap: Snapshot, scorer: Scorer) -> dict:
    """Run one query; returns the response body without ``request_id``."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    encodes = []
    if query.text is not None:
        encodes.append(scorer.encode_text(query.text))
    if query.image is not None:
        encodes.append(scorer.encode_image(query.image))
    embs = await asyncio.gather(*encodes)
    text_emb = embs[0] if query.text is not None else None
    image_emb = embs[-1] if query.image is not None else None
    timings["encode"] = _ms(t0)

    t = time.perf_counter()
    vector = query_vector(text_emb, image_emb)
    found = await asyncio.to_thread(snap.candidates, vector, query.candidates, query.filter)
    timings["ann"] = _ms(t)

    hybrid = query.hybrid if query.text is not None else "off"
    if hybrid != "off":
        t = time.perf_counter()
        lexical = await asyncio.to_thread(
            snap.lexical, scorer.normalize_text(query.text), query.candidates, query.filter
        )
        found = fuse(found, lexical, vector, query)
        timings["lexical"] = _ms(t)

    itc = found.column("itc").to_numpy(zero_copy_only=False)
    r = min(query.rerank_k, found.num_rows) if (query.text is not None and query.rerank) else 0
    t = time.perf_counter()
    job = await itm_job(query.text, found, r, snap)
    ranked = await rerank_job(scorer, job, itc, itm_weight=query.itm_weight, k=query.k)
    timings["rerank"] = _ms(t)

    results = ranked_rows(found, ranked, snap.metadata_columns)
    timings["total"] = _ms(t0)
    return {
        "results": results,
        "reranked": r,
        "hybrid": hybrid,
        "candidates": found.num_rows,
        "timings_ms": timings,
        "table_version": snap.version,
        "products_table": snap.products_table,
        "model_id": snap.model_id,
    }
