"""Hard negatives mined from the published index: each train product's nearest other train products.

    python -m pipelines.mine_negatives --config FILE [key=value ...] [--index-uri URI]
        [--per-product N] [--out negatives.parquet]

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
prefilter would be the way.

Output (``mine.out``, default ``<index.uri>/_negatives/negatives-<model_id>-v<version>.parquet``,
local or ``s3://``): one row per train product of the table, ``product_id``, ``negative_ids``
(list<string>, nearest first) and ``similarities`` (list<float32>, their cosines), with the
provenance in the Parquet file metadata (``model_id``, ``products_table``, ``table_version``,
``run_id``, ``split``, ``per_product``, ``created_at``) and the resolved config beside it.
``pipelines.finetune`` reads it through ``finetune.mined_negatives``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipelines.config import AppConfig, ConfigError, add_config_arguments, dump_config, load_config
from pipelines.indexing import tables
from pipelines.storage import S3Settings, filesystem_for, join

logger = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
SPLIT_COLUMN = "split"
VECTOR = "image_embedding"  # the ITC image embedding of the products table (L2-normalised)
NEGATIVES_DIR = "_negatives"
# Provenance keys in the Parquet file metadata (all values are strings).
METADATA_KEYS = (
    "model_id",
    "products_table",
    "table_version",
    "run_id",
    "index_uri",
    "split",
    "per_product",
    "created_at",
)


class NothingPublished(ValueError):
    """The index has no published run: there is no version to mine from."""


class MiningInputError(ValueError):
    """The published table cannot be mined (no split column, no train rows, bad embeddings)."""


# --------------------------------------------------------------------------- reading


def open_published(index_uri: str, s3: S3Settings | None = None) -> tuple[object, dict]:
    """The published products table (checked out at its version) and its ``runs`` row."""
    db = tables.connect(index_uri, s3)
    run = tables.published_run(db)
    if run is None:
        raise NothingPublished(
            f"no published index at {index_uri}: run `python -m pipelines.index_catalog` first "
            "(negatives are mined from the published version only)"
        )
    table = db.open_table(run["products_table"])
    table.checkout(int(run["products_version"]))
    return table, run


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


# --------------------------------------------------------------------------- writing


def default_out(index_uri: str, model_id: str, version: int) -> str:
    return join(index_uri, NEGATIVES_DIR, f"negatives-{model_id}-v{version}.parquet")


def negatives_table(
    ids: Sequence[str], idx: np.ndarray, sims: np.ndarray, metadata: dict[str, str]
) -> pa.Table:
    n, k = idx.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k, pa.int32())  # k per product
    id_array = pa.array(list(ids), pa.string())
    negative_ids = pa.ListArray.from_arrays(offsets, id_array.take(pa.array(idx.reshape(-1))))
    similarities = pa.ListArray.from_arrays(offsets, pa.array(sims.reshape(-1), pa.float32()))
    schema = pa.schema(
        [
            pa.field("product_id", pa.string(), nullable=False),
            pa.field("negative_ids", pa.list_(pa.string())),  # nearest first
            pa.field("similarities", pa.list_(pa.float32())),  # their cosines
        ],
        metadata={key: str(metadata[key]) for key in METADATA_KEYS},
    )
    return pa.Table.from_arrays([id_array, negative_ids, similarities], schema=schema)


def mine(cfg: AppConfig) -> dict:
    """Mine ``cfg.mine.per_product`` negatives per train product of the published table of
    ``cfg.index.uri``; write the Parquet (and the resolved config beside it); return a summary."""
    import pyarrow.parquet as pq

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
    metadata = {
        "model_id": run["model_id"],
        "products_table": run["products_table"],
        "table_version": str(version),
        "run_id": run["run_id"],
        "index_uri": cfg.index.uri,
        "split": TRAIN_SPLIT,
        "per_product": str(cfg.mine.per_product),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    result = negatives_table(ids, idx, sims, metadata)
    config_out = out.removesuffix(".parquet") + ".config.resolved.yaml"
    fs, path = filesystem_for(out, s3)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(result, path, filesystem=fs)
    with fs.open_output_stream(filesystem_for(config_out, s3)[1]) as f:
        f.write(dump_config(cfg).encode("utf-8"))
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


# --------------------------------------------------------------------------- reading it back


@dataclass
class MinedNegatives:
    """A file of :func:`mine` read back: product id → its mined neighbours, nearest first."""

    neighbours: dict[str, list[str]]
    similarities: dict[str, list[float]]
    metadata: dict[str, str]
    path: str

    @property
    def model_id(self) -> str | None:
        return self.metadata.get("model_id")


def read_negatives(path: str, s3: S3Settings | None = None) -> MinedNegatives:
    """Read a negatives Parquet (local or ``s3://``); ValueError when it is not one."""
    import pyarrow.parquet as pq

    fs, local = filesystem_for(path, s3)
    try:
        table = pq.read_table(local, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as err:
        raise ValueError(f"cannot read mined negatives {path}: {err}") from err
    missing = {"product_id", "negative_ids", "similarities"} - set(table.column_names)
    if missing:
        raise ValueError(
            f"{path} is not a pipelines.mine_negatives file: no {sorted(missing)} column(s)"
        )
    raw = table.schema.metadata or {}
    metadata = {k.decode(): v.decode() for k, v in raw.items() if k.decode() in METADATA_KEYS}
    ids = [str(i) for i in table.column("product_id").to_pylist()]
    negs = table.column("negative_ids").to_pylist()
    sims = table.column("similarities").to_pylist()
    return MinedNegatives(
        neighbours={i: [str(x) for x in n or []] for i, n in zip(ids, negs, strict=True)},
        similarities={i: list(s or []) for i, s in zip(ids, sims, strict=True)},
        metadata=metadata,
        path=path,
    )


# --------------------------------------------------------------------------- CLI


def print_summary(s: dict) -> None:
    near = f"{s['nearest_mean']:.4f}" if s["nearest_mean"] is not None else "-"
    far = f"{s['farthest_mean']:.4f}" if s["farthest_mean"] is not None else "-"
    print("\nmined hard negatives")
    print(f"  table        {s['products_table']} version {s['table_version']} (run {s['run_id']})")
    print(f"  model        {s['model_id']}")
    print(
        f"  products     {s['train_products']} of split {s['split']!r} "
        f"({s['table_rows'] - s['train_products']} other rows never used)"
    )
    print(
        f"  per product  {s['per_product_written']} (asked {s['per_product']}; exact cosine of the "
        f"stored ITC image embeddings), {s['neighbours']} pairs"
    )
    print(f"  cosine       nearest mean {near}, last kept mean {far}")
    print(
        f"  time         {s['seconds']}s (read {s['read_seconds']}s, search {s['search_seconds']}s)"
    )
    print(f"  out          {s['out']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.mine_negatives", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("index_uri",))
    parser.add_argument("--per-product", type=int, default=None, help="alias of mine.per_product")
    parser.add_argument("--out", default=None, help="alias of mine.out (local path or s3://)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    try:
        cfg = load_config(
            args.config,
            args.overrides,
            {
                "index_uri": args.index_uri,
                "mine.per_product": args.per_product,
                "mine.out": args.out,
            },
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = mine(cfg)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
