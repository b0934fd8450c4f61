"""Mined hard negatives on disk, and what fine-tuning takes from them.

The file (``mine.out``, local or ``s3://``): one row per train product of the mined table,
``product_id``, ``negative_ids`` (list<string>, nearest first) and ``similarities``
(list<float32>, their cosines), with the provenance in the Parquet file metadata
(``METADATA_KEYS``) and the resolved config beside it. :func:`load_mined_neighbours` restricts it
to a catalog's train products and refuses any other split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipelines.storage import S3Settings, filesystem_for, join
from pipelines.training.splits import TRAIN_SPLIT, TrainSplitError, catalog_splits

if TYPE_CHECKING:
    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)

NEGATIVES_DIR = "_negatives"
COLUMNS = ("product_id", "negative_ids", "similarities")
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


# --------------------------------------------------------------------------- the file


def default_out(index_uri: str, model_id: str, version: int) -> str:
    return join(index_uri, NEGATIVES_DIR, f"negatives-{model_id}-v{version}.parquet")


def config_path(out: str) -> str:
    """Where the resolved config of a negatives file goes: beside it."""
    return out.removesuffix(".parquet") + ".config.resolved.yaml"


def negatives_table(
    ids: Sequence[str], idx: np.ndarray, sims: np.ndarray, metadata: dict[str, str]
) -> pa.Table:
    """The file's table: ``idx`` / ``sims`` (N, k) row indices into ``ids`` and their cosines."""
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


def write_negatives(
    table: pa.Table, out: str, config_yaml: str, s3: S3Settings | None = None
) -> str:
    """Write ``table`` to ``out`` and the resolved config beside it; returns the config's path."""
    import pyarrow.parquet as pq

    config_out = config_path(out)
    fs, path = filesystem_for(out, s3)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
    with fs.open_output_stream(filesystem_for(config_out, s3)[1]) as f:
        f.write(config_yaml.encode("utf-8"))
    return config_out


@dataclass
class MinedNegatives:
    """A negatives file read back: product id → its mined neighbours, nearest first."""

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
    missing = set(COLUMNS) - set(table.column_names)
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


# --------------------------------------------------------------------------- for fine-tuning


def load_mined_neighbours(cfg: AppConfig, rows: Sequence[dict], model_id: str) -> dict:
    """The mined neighbours of ``finetune.mined_negatives`` restricted to the train ``rows``:
    ``{"neighbours": {product_id: [neighbour ids]}, ...stats}``.

    Refuses (TrainSplitError) a file mined from another split or naming any product that the
    catalog has outside the train split; ids the catalog lacks (indexed but since removed) are
    dropped with a warning; a model_id other than ``model_id`` is warned about.
    """
    path = cfg.finetune.mined_negatives
    mined = read_negatives(path, S3Settings.from_config(cfg.s3))
    _check_provenance(mined, model_id)
    train = {str(r["product_id"]) for r in rows}
    unknown = _check_named(mined, train, cfg)
    neighbours = _train_neighbours(mined, train, cfg.finetune.catalog)
    return {
        "neighbours": neighbours,
        "path": path,
        "model_id": mined.model_id,
        "table_version": mined.metadata.get("table_version"),
        "anchors_with_neighbours": len(neighbours),
        "dropped_unknown": len(unknown),
    }


def _check_provenance(mined: MinedNegatives, model_id: str) -> None:
    """Refuse a file mined from another split; warn when another model mined it."""
    split = mined.metadata.get("split", TRAIN_SPLIT)
    if split != TRAIN_SPLIT:
        raise TrainSplitError(
            f"mined negatives {mined.path} come from split {split!r}, not {TRAIN_SPLIT!r}"
        )
    if mined.model_id != model_id:
        logger.warning(
            "mined negatives %s were mined in the embedding space of model %s, but fine-tuning "
            "starts from %s: the neighbours are another model's (still usable as negatives; "
            "index with this model and mine again for its own hard negatives)",
            mined.path, mined.model_id, model_id,
        )  # fmt: skip


def _check_named(mined: MinedNegatives, train: set[str], cfg: AppConfig) -> list[str]:
    """Refuse ids the catalog has outside the train split; returns (and warns about) the ids
    the catalog lacks."""
    catalog = cfg.finetune.catalog
    splits = catalog_splits(catalog, cfg)
    named = set(mined.neighbours) | {n for ns in mined.neighbours.values() for n in ns}
    outside = sorted(i for i in named if i not in train and i in splits)
    if outside:
        raise TrainSplitError(
            f"mined negatives {mined.path} name {len(outside)} products outside split "
            f"{TRAIN_SPLIT!r} of catalog {catalog}, e.g. {outside[:5]} (split "
            f"{splits[outside[0]]!r}); mine again from an index of this catalog"
        )
    unknown = sorted(named - set(splits))
    if unknown:
        logger.warning(
            "mined negatives %s name %d products the catalog lacks (e.g. %s): dropped",
            mined.path, len(unknown), unknown[:5],
        )  # fmt: skip
    return unknown


def _train_neighbours(mined: MinedNegatives, train: set[str], catalog) -> dict[str, list[str]]:
    """{anchor: its train neighbours} for the train anchors that have any."""
    neighbours = {
        a: [n for n in ns if n in train and n != a]
        for a, ns in mined.neighbours.items()
        if a in train
    }
    neighbours = {a: ns for a, ns in neighbours.items() if ns}
    if not neighbours:
        raise ValueError(
            f"mined negatives {mined.path} hold no pair of train products of catalog {catalog}"
        )
    if len(neighbours) < len(train):
        logger.warning(
            "%d of %d train products have no mined neighbours in %s (not indexed when it was "
            "mined?): they are anchors without mined negatives",
            len(train) - len(neighbours), len(train), mined.path,
        )  # fmt: skip
    return neighbours
