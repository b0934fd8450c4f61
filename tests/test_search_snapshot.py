"""Query-time ANN settings (index.search_*) reach LanceDB: an IVF_PQ table answers with the recall
its settings buy (benchmarks/bench_ann.py measures the same at 10k-100k rows)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.config import load_config
from pipelines.indexing import tables
from pipelines.search.snapshot import Snapshot, ann_settings

DIM, ROWS, K = 32, 2048, 50


def _table(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(16, DIM))
    vectors = centres[rng.integers(0, 16, ROWS)] + 0.6 * rng.normal(size=(ROWS, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    rows = pa.Table.from_pydict(
        {
            "product_id": [f"p{i}" for i in range(ROWS)],
            "title": ["t"] * ROWS,
            "title_normalized": ["t"] * ROWS,
            "image_embedding": list(vectors),
            "model_image": [b""] * ROWS,
            "thumbnail": [b""] * ROWS,
            "content_hash": ["h"] * ROWS,
            "model_id": ["m"] * ROWS,
            "indexed_at": [None] * ROWS,
            "run_id": ["r"] * ROWS,
            "itm_tokens": [None] * ROWS,
            "itm_tokens_shape": [None] * ROWS,
        },
        schema=tables.products_schema(DIM),
    )
    table = tables.connect(str(tmp_path)).create_table("products", rows)
    table.create_index(
        metric="cosine",
        vector_column_name="image_embedding",
        index_type="IVF_PQ",
        num_partitions=16,
        num_sub_vectors=4,
    )
    return table, vectors


def _recall(table, vectors, ann: dict) -> float:
    snap = Snapshot(table, "products", table.version, "m", "r", ROWS, (), ann=ann)
    hits = 0
    for q in vectors[:40]:
        exact = set(np.argsort(-(vectors @ q), kind="stable")[:K])
        got = {int(p[1:]) for p in snap.candidates(q, K).column("product_id").to_pylist()}
        hits += len(exact & got)
    return hits / (40 * K)


def test_refine_factor_and_nprobes_reach_lancedb(tmp_path):
    table, vectors = _table(tmp_path)
    default = _recall(table, vectors, {})
    tuned = _recall(table, vectors, {"nprobes": 16, "refine_factor": 20})
    assert tuned >= 0.98, tuned
    assert tuned > default + 0.05, (default, tuned)  # PQ alone loses neighbours; refine finds them


def test_ann_settings_from_config():
    assert ann_settings(load_config(None, []).index) == {}
    cfg = load_config(None, ["index.search_nprobes=20", "index.search_refine_factor=10"])
    assert ann_settings(cfg.index) == {"nprobes": 20, "refine_factor": 10}
