"""Throughput of ``python -m pipelines.export`` on a 10k-product table, with and without embeddings.

    python benchmarks/export_throughput.py [--products 10000] [--repeat 3] [--workdir DIR]
        [--json FILE] [key=value ...]

Builds (once per ``--workdir``) a LanceDB index laid out as the index job leaves it: a
``products__<model_id>`` table with the products schema (256-d L2-normalised random embeddings,
small real JPEGs as model image and thumbnail, the demo catalog's metadata columns), a ``rejects``
and a ``runs`` table, each tagged ``run-<id>`` and ``published``. Then times ``products`` exports
through the export's own code path (``pipelines.export.export``, temporary folder, rename and
``_SUCCESS`` included) without embeddings, with embeddings, and with embeddings partitioned by
category, and prints rows/s and bytes written (best of ``--repeat``). ``key=value`` overrides go
to the config (configs/local.yaml), e.g. ``export.compression=snappy``.

``build_index`` is importable (tests build small tables with it).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipelines.indexing import tables  # noqa: E402
from pipelines.indexing.validate import REJECTS_SCHEMA  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("sofa", "chair", "table", "lamp", "rug", "bed", "shelf", "desk", "mirror", "vase")
METADATA = [
    pa.field("category", pa.string()),
    pa.field("price", pa.float64()),
    pa.field("brand", pa.string()),
    pa.field("title_lang", pa.string()),
    pa.field("split", pa.string()),
]
MODEL_ID = "synthetic-0000"
RUN_ID = "20260101T000000Z-bench0"


def _jpegs(n: int, size: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, 3, dtype=np.uint8)
        noise = rng.integers(0, 48, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(base + noise).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def _batches(n: int, dim: int, seed: int, chunk: int, image_px: int, thumb_px: int):
    rng = np.random.default_rng(seed)
    images, thumbs = _jpegs(16, image_px, seed), _jpegs(16, thumb_px, seed + 1)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    schema = tables.products_schema(dim, METADATA)
    for lo in range(0, n, chunk):
        ids = np.arange(lo, min(n, lo + chunk))
        emb = rng.standard_normal((len(ids), dim)).astype(np.float32)  # (c, D)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        titles = [f"{CATEGORIES[i % len(CATEGORIES)]} model {i}" for i in ids]
        yield pa.RecordBatch.from_pydict(
            {
                "product_id": [f"p{i:07d}" for i in ids],
                "title": titles,
                "title_normalized": [t.lower() for t in titles],
                "category": [CATEGORIES[i % len(CATEGORIES)] for i in ids],
                "price": (rng.random(len(ids)) * 500).round(2),
                "brand": [f"brand{i % 37}" for i in ids],
                "title_lang": ["en"] * len(ids),
                "split": ["test" if i % 5 == 0 else "train" for i in ids],
                "image_embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(emb.reshape(-1)), dim
                ),
                "model_image": [images[i % 16] for i in ids],
                "thumbnail": [thumbs[i % 16] for i in ids],
                "content_hash": [f"{i:016x}" for i in ids],
                "model_id": [MODEL_ID] * len(ids),
                "indexed_at": [now] * len(ids),
                "run_id": [RUN_ID] * len(ids),
                "itm_tokens": [None] * len(ids),  # no stored ITM tokens (exports skip them)
                "itm_tokens_shape": [None] * len(ids),
            },
            schema=schema,
        )


def build_index(
    uri: str | Path,
    n: int,
    *,
    dim: int = 256,
    seed: int = 0,
    chunk: int = 2048,
    image_px: int = 96,
    thumb_px: int = 64,
) -> dict:
    """A LanceDB index at ``uri`` as one completed index run leaves it; returns its runs row."""
    db = tables.connect(str(uri))
    name = tables.products_table_name("products", MODEL_ID)
    schema = tables.products_schema(dim, METADATA)
    reader = pa.RecordBatchReader.from_batches(
        schema, _batches(n, dim, seed, chunk, image_px, thumb_px)
    )
    products = db.create_table(name, reader, schema=schema)
    rejects_rows = pa.Table.from_pylist(
        [
            {
                "run_id": RUN_ID,
                "product_id": f"bad{i}",
                "source_file": "part-0.parquet",
                "row_number": i,
                "stage": "validate",
                "reason": "empty_title",
                "detail": f"row {i}: title is empty",
            }
            for i in range(3)
        ],
        schema=REJECTS_SCHEMA,
    )
    rejects = db.create_table(tables.REJECTS_TABLE, rejects_rows, schema=REJECTS_SCHEMA)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    run = {
        "run_id": RUN_ID,
        "started_at": now,
        "finished_at": now,
        "config_digest": "0" * 16,
        "model_id": MODEL_ID,
        "model_path": None,
        "source_uri": "synthetic",
        "products_table": name,
        "rows_in": n + 3,
        "indexed": n,
        "unchanged": 0,
        "rejected": 3,
        "deleted": 0,
        "rejected_by_reason": json.dumps({"empty_title": 3}),
        "seconds": 0.0,
        "images_per_s": 0.0,
        "products_version": products.version,
        "rejects_version": rejects.version,
    }
    runs = db.create_table(
        tables.RUNS_TABLE,
        pa.Table.from_pylist([run], schema=tables.RUNS_SCHEMA),
        schema=tables.RUNS_SCHEMA,
    )
    for table in (products, rejects, runs):
        tables.move_tag(table, tables.run_tag(RUN_ID), table.version)
        tables.move_tag(table, tables.PUBLISHED, table.version)
    return run


def _time_export(cfg, out: Path, repeat: int, **request) -> dict:
    from pipelines.exporting.job import ExportRequest, export

    best = None
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        summary = export(cfg, ExportRequest(what="products", out=str(out), **request))
        seconds = time.perf_counter() - t0
        if best is None or seconds < best["seconds"]:
            best = {
                "seconds": round(seconds, 3),
                "rows": summary["rows"],
                "rows_per_s": round(summary["rows"] / seconds, 1),
                "bytes": summary["bytes"],
                "files": len(summary["files"]),
            }
    shutil.rmtree(out, ignore_errors=True)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keeps the built table between runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    from pipelines.config import load_config

    work = Path(args.workdir or tempfile.mkdtemp(prefix="export-bench-"))
    index = work / f"lancedb-{args.products}"
    built_s = None
    if not index.exists():
        t0 = time.perf_counter()
        build_index(index, args.products)
        built_s = round(time.perf_counter() - t0, 2)
    cfg = load_config(REPO / "configs" / "local.yaml", [f"index.uri={index}", *args.overrides])
    partitioned = load_config(
        REPO / "configs" / "local.yaml",
        [f"index.uri={index}", "export.partition_by=[category]", *args.overrides],
    )
    cases = {
        "without embeddings": _time_export(cfg, work / "out", args.repeat),
        "with embeddings": _time_export(cfg, work / "out", args.repeat, with_embeddings=True),
        "with embeddings, by category": _time_export(
            partitioned, work / "out", args.repeat, with_embeddings=True
        ),
    }
    print(f"products export, {args.products} rows (table built in {built_s or 'cached'} s)")
    for label, r in cases.items():
        print(
            f"  {label:30s} {r['rows_per_s']:>10,.0f} rows/s  {r['seconds']:.3f} s  "
            f"{r['bytes'] / 2**20:7.2f} MB in {r['files']} file(s)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"products": args.products, "cases": cases}, indent=2)
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
