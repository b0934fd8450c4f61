"""Hard negatives mined from the published index: each train product's nearest other train products.

Reads the products table at the version the ``published`` tag points to (what the search service
serves, never "the latest"), keeps the rows whose ``split`` is ``train`` (a table without a
``split`` column is refused: nothing could keep test products out of training) and, for each, finds
the ``mine.per_product`` other train products whose stored ITC image embeddings are closest by
cosine. Test products are never candidates and a product is never its own neighbour.

The search is exact: L2-normalised embeddings, ``mine.chunk_rows`` anchors at a time against all
train products (one float32 matmul each, memory ``chunk_rows x products x 4`` bytes), top-N by
``argpartition``. At 100k products x 256-d that is ~2.6 TFLOP, about a minute on 2 cores, and it
needs no ANN index (which, below ``index.ann_min_rows``, the table does not have) and no recall
caveat. Past a few hundred thousand products an IVF query per product with a ``split = 'train'``
prefilter would be the way. The file written is :mod:`pipelines.training.mined`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipelines.config import dump_config
from pipelines.indexing import tables
from pipelines.storage import S3Settings
from pipelines.training.mined import default_out, negatives_table, write_negatives
from pipelines.training.splits import TRAIN_SPLIT

if TYPE_CHECKING:
    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)

SPLIT_COLUMN = "split"
VECTOR = "image_embedding"  # the ITC image embedding of the products table (L2-normalised)


class NothingPublished(ValueError):
    """The index has no published run: there is no version to mine from."""


class MiningInputError(ValueError):
    """The published table cannot be mined (no split column, no train rows, bad embeddings)."""


# --------------------------------------------------------------------------- reading


def open_published(index_uri: str, s3: S3Settings | None = None) -> tuple[object, dict]:
    """The published products table (checked out at its version) and its ``runs`` row."""
    opened = tables.open_published(tables.connect(index_uri, s3))
    if opened is None:
        raise NothingPublished(
            f"no published index at {index_uri}: run `python -m pipelines.index_catalog` first "
            "(negatives are mined from the published version only)"
        )
    return opened


def _require_split(names: Sequence[str], where: str) -> None:
    if SPLIT_COLUMN not in names:
        raise MiningInputError(
            f"{where} has no {SPLIT_COLUMN!r} column (columns: {list(names)}), so test products "
            f"cannot be told apart from train ones; index with {SPLIT_COLUMN!r} in "
            "source.metadata_columns"
        )


def train_rows(data: pa.Table, where: str = "the products table") -> tuple[list[str], np.ndarray]:
    """The ``train`` rows of ``data`` (product_id, split, image_embedding): ids (N,) and (N, D)
    L2-normalised float32 embeddings, in table order."""
    _require_split(data.column_names, where)
    for name in ("product_id", VECTOR):
        if name not in data.column_names:
            raise MiningInputError(f"{where} has no {name!r} column")
    import pyarrow.compute as pc

    data = data.filter(pc.equal(data.column(SPLIT_COLUMN), TRAIN_SPLIT))
    ids = [str(i) for i in data.column("product_id").to_pylist()]
    if len(set(ids)) != len(ids):
        raise MiningInputError(f"{where} holds duplicate train product_ids")
    vectors = data.column(VECTOR)
    if vectors.null_count:
        raise MiningInputError(f"{where}: {vectors.null_count} train rows have no {VECTOR}")
    if not ids:
        return ids, np.zeros((0, 0), np.float32)
    flat = pc.list_flatten(vectors.combine_chunks()).to_numpy(zero_copy_only=False)
    emb = np.asarray(flat, np.float32).reshape(len(ids), -1)  # (N, D)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)  # (N, 1)
    if not np.all(np.isfinite(emb)) or bool((norms == 0).any()):
        raise MiningInputError(f"{where}: train embeddings with zero norm or non-finite values")
    return ids, emb / norms  # stored normalised; again here so a drift cannot skew the cosine


def read_published_train(index_uri: str, s3: S3Settings | None = None):
    """(ids, embeddings (N, D), runs row) of the published table's train split."""
    table, run = open_published(index_uri, s3)
    where = f"{run['products_table']} version {run['products_version']}"
    _require_split(table.schema.names, where)  # before reading any embedding
    data = table.search().select(["product_id", SPLIT_COLUMN, VECTOR]).limit(None).to_arrow()
    ids, emb = train_rows(data, where)
    return ids, emb, run, data.num_rows


# --------------------------------------------------------------------------- search


def nearest_neighbours(
    emb: np.ndarray, k: int, *, chunk_rows: int = 1024, progress_s: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine neighbours of every row among the other rows (never itself).

    ``emb`` (N, D) is L2-normalised. Returns indices (N, k') int64 and cosines (N, k') float32,
    nearest first, k' = min(k, N - 1); equal cosines among the kept ones: lower row index first.
    """
    n = emb.shape[0]
    k = max(0, min(k, n - 1))
    idx = np.zeros((n, k), np.int64)
    sims = np.zeros((n, k), np.float32)
    if k == 0:
        return idx, sims
    started = last_log = time.perf_counter()
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        s = emb[lo:hi] @ emb.T  # (c, N) cosine
        s[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # never itself
        if k < n - 1:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]  # (c, k) the top k, unordered
        else:
            part = np.broadcast_to(np.arange(n), (hi - lo, n))  # all; itself sorts last
        got = np.take_along_axis(s, part, axis=1)  # (c, k or N)
        order = np.lexsort((part, -got), axis=1)[:, :k]  # by cosine desc, then row index
        idx[lo:hi] = np.take_along_axis(part, order, axis=1)
        sims[lo:hi] = np.take_along_axis(got, order, axis=1)
        now = time.perf_counter()
        if now - last_log >= progress_s:
            logger.info("scored %d / %d products (%.0fs)", hi, n, now - started)
            last_log = now
    return idx, sims


# --------------------------------------------------------------------------- mining


def mine(cfg: AppConfig) -> dict:
    """Mine ``cfg.mine.per_product`` negatives per train product of the published table of
    ``cfg.index.uri``; write the Parquet (and the resolved config beside it); return a summary."""
    started = time.perf_counter()
    s3 = S3Settings.from_config(cfg.s3)
    ids, emb, run, table_rows = read_published_train(cfg.index.uri, s3)
    if not ids:
        raise MiningInputError(
            f"{run['products_table']} version {run['products_version']} has no products of split "
            f"{TRAIN_SPLIT!r} ({table_rows} rows)"
        )
    read_s = time.perf_counter() - started
    idx, sims = nearest_neighbours(emb, cfg.mine.per_product, chunk_rows=cfg.mine.chunk_rows)
    search_s = time.perf_counter() - started - read_s
    version = int(run["products_version"])
    out = cfg.mine.out or default_out(cfg.index.uri, run["model_id"], version)
    metadata = _provenance(cfg, run, version)
    config_out = write_negatives(
        negatives_table(ids, idx, sims, metadata), out, dump_config(cfg), s3
    )
    return {
        **metadata,
        "out": out,
        "config": config_out,
        "table_rows": table_rows,
        "train_products": len(ids),
        "neighbours": int(idx.size),
        "per_product_written": int(idx.shape[1]),
        "nearest_mean": float(sims[:, 0].mean()) if sims.size else None,
        "farthest_mean": float(sims[:, -1].mean()) if sims.size else None,
        "read_seconds": round(read_s, 3),
        "search_seconds": round(search_s, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _provenance(cfg: AppConfig, run: dict, version: int) -> dict[str, str]:
    """The file's metadata: which published table, model and settings the neighbours come from."""
    return {
        "model_id": run["model_id"],
        "products_table": run["products_table"],
        "table_version": str(version),
        "run_id": run["run_id"],
        "index_uri": cfg.index.uri,
        "split": TRAIN_SPLIT,
        "per_product": str(cfg.mine.per_product),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
