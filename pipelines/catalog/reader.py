"""Reading a catalog back: the products the index job reads, local or ``s3://``.

One reader for every consumer (fine-tuning, evaluation, the quality tasks). A catalog is a folder
of Parquet files in the catalog contract (``source.columns``: a product id, a title, and the image
inline or by ``image_uri``), or a folder whose ``products/`` holds them (what
``pipelines.make_catalog`` writes, with ``queries.parquet`` beside it). ``image_uri`` is relative to
the Parquet folder, absolute, or ``s3://``.

- Splits: the ``source.split_column`` when the files have it, otherwise a hash of
  ``source.split_by`` (:mod:`pipelines.catalog.splitting`), so any catalog has a train, a val and a
  test split without a file to say so.
- Titles: ``source.title_columns``, each one a text of the product's image; a column's language is
  its name less a ``title_`` prefix (``title_zh`` -> ``zh``).
- Queries: ``source.queries``, else the catalog folder's ``queries.parquet`` when it has one.

The rows it returns use the canonical names (``product_id``, ``image``, ``image_uri``, ``split``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.catalog.splitting import hash_splits
from pipelines.storage import S3Settings, filesystem_for, is_s3, join, parquet_files

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as pads

    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)

PRODUCTS_DIR = "products"
PAIRS_FILE = "pairs.parquet"
QUERIES_FILE = "queries.parquet"
SPLIT_COLUMN = "split"  # the canonical name of a row's split


class CatalogInputError(ValueError):
    """The catalog folder is missing a part or holds malformed data; the message says which."""


def title_language(column: str) -> str:
    """The language label of a title column: ``title_zh`` -> ``zh``; any other name as it is."""
    return column.removeprefix("title_") if column.startswith("title_") else column


class CatalogReader:
    """One catalog. Nothing but the folder's layout is read until a method asks for it."""

    def __init__(self, root: str | Path, cfg: AppConfig):
        self.root = str(root)
        self.s3 = S3Settings.from_config(cfg.s3)
        self.fs, self.base = filesystem_for(self.root, self.s3)
        self.source = cfg.source
        self.columns = cfg.source.columns
        nested = join(self.base, PRODUCTS_DIR)
        self.nested = self._is_dir(nested)  # the make_catalog layout: products/ + side tables
        self.products_dir = nested if self.nested else self.base
        self._dataset: pads.Dataset | None = None  # listed once per reader (S3 LIST calls)

    def __getstate__(self) -> dict:
        # Ray ships the reader to its tasks; they list the files again if they need the dataset.
        return {**self.__dict__, "_dataset": None}

    @property
    def location(self) -> str:
        """The catalog as reports name it: the ``s3://`` URI, or the absolute local folder."""
        return self.root if is_s3(self.root) else self.base

    def path(self, name: str) -> str:
        return join(self.base, name)

    def _is_dir(self, path: str) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(path).type == FileType.Directory

    def has_file(self, name: str) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.path(name)).type == FileType.File

    def require_products(self) -> None:
        if not self._is_dir(self.products_dir):
            raise CatalogInputError(
                f"catalog {self.root} not found: expected a folder of Parquet files in the "
                f"catalog contract ({self.columns.product_id!r}, {self.columns.title!r}, and "
                f"{self.columns.image!r} or {self.columns.image_uri!r}), or a folder whose "
                "products/ holds them"
            )

    def read_table(self, name: str) -> pa.Table:
        """A Parquet file of the catalog folder (``pairs.parquet``, ``queries.parquet``)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.path(name), filesystem=self.fs)

    def products_dataset(self) -> pads.Dataset:
        """The products' Parquet files as one dataset (``*.parquet``; ``_*`` and ``.*`` skipped)."""
        import pyarrow.dataset as pads

        if self._dataset is not None:
            return self._dataset
        self.require_products()
        files = parquet_files(self.fs, self.products_dir)
        if not files:
            raise CatalogInputError(f"catalog {self.root}: no Parquet files in {self.products_dir}")
        dataset = pads.dataset(files, format="parquet", filesystem=self.fs)
        if self.columns.product_id not in dataset.schema.names:
            raise CatalogInputError(
                f"{self.products_dir}: no product id column {self.columns.product_id!r}; "
                f"columns: {sorted(dataset.schema.names)}"
            )
        self._dataset = dataset
        return dataset

    # ---- splits -----------------------------------------------------------------------------------
    def split_rule(self) -> str:
        """How products get their split, as reports say it."""
        names = self.products_dataset().schema.names
        if self.source.split_column in names:
            return f"column {self.source.split_column!r}"
        shares = "/".join(
            f"{name} {share:g}" for name, share in self.source.split_fractions.items()
        )
        return f"hash of {self._split_by()!r} ({shares})"

    def _split_by(self) -> str:
        return self.source.split_by or self.columns.product_id

    def split_source(self) -> tuple[str, bool]:
        """``(column, hashed)``: the split column, or the column whose hash gives the split."""
        if self.source.split_column in self.products_dataset().schema.names:
            return self.source.split_column, False
        return self._split_by(), True

    def splits_of(self, values: Sequence[object], hashed: bool) -> list[str]:
        """The splits of rows whose :meth:`split_source` column holds ``values``."""
        if hashed:
            return hash_splits(values, self.source.split_fractions)
        return [str(v) for v in values]

    def parquet_files(self) -> list[str]:
        """The products' Parquet files (paths on :attr:`fs`)."""
        return list(self.products_dataset().files)

    def splits(self) -> dict[str, str]:
        """{product_id: split} of every product (no images read)."""
        dataset = self.products_dataset()
        pid, column = self.columns.product_id, self.source.split_column
        if column in dataset.schema.names:
            table = dataset.to_table(columns=[pid, column])
            ids, splits = table.column(pid).to_pylist(), table.column(column).to_pylist()
            return {str(p): str(s) for p, s in zip(ids, splits, strict=True)}
        by = self._split_by()
        if by not in dataset.schema.names:
            raise CatalogInputError(
                f"{self.products_dir}: no split column {column!r} and no column {by!r} to split "
                f"by (source.split_by); columns: {sorted(dataset.schema.names)}"
            )
        table = dataset.to_table(columns=sorted({pid, by}))
        splits = hash_splits(table.column(by).to_pylist(), self.source.split_fractions)
        return {str(p): s for p, s in zip(table.column(pid).to_pylist(), splits, strict=True)}

    def _split_filter(self, dataset: pads.Dataset, split: str) -> pads.Expression:
        import pyarrow.dataset as pads

        if self.source.split_column in dataset.schema.names:
            return pads.field(self.source.split_column) == split
        ids = [pid for pid, s in self.splits().items() if s == split]
        return pads.field(self.columns.product_id).isin(ids)

    # ---- rows -------------------------------------------------------------------------------------
    def product_rows(
        self, split: str, extra: Sequence[str] = (), *, images: bool = True
    ) -> list[dict]:
        """The products of ``split`` sorted by id: ``{product_id, split, image, image_uri}``
        plus the ``extra`` columns the files have (absent ones are None); with ``images=False``
        the image columns are not read."""
        dataset = self.products_dataset()
        names = set(dataset.schema.names)
        cols = self.columns
        sources = {"product_id": cols.product_id, "image": cols.image, "image_uri": cols.image_uri}
        present = {key: c for key, c in sources.items() if c in names}
        if len(present) < 2:
            raise CatalogInputError(
                f"{self.products_dir}: expected column {cols.image!r} or {cols.image_uri!r}, "
                f"got {sorted(names)}"
            )
        if not images:
            present = {"product_id": cols.product_id}
        more = [c for c in extra if c in names and c not in present.values()]
        table = dataset.to_table(
            columns=[*present.values(), *more], filter=self._split_filter(dataset, split)
        )
        if table.num_rows == 0:
            splits = sorted(set(self.splits().values()) - {"None"})
            raise CatalogInputError(
                f"catalog {self.root} has no products in split {split!r}; splits: {splits}"
            )
        rows = [
            {key: r.get(c) for key, c in sources.items()}
            | {SPLIT_COLUMN: split}
            | {c: r.get(c) for c in extra}
            for r in table.to_pylist()
        ]
        return sorted(rows, key=lambda r: r["product_id"])

    def require_columns(self, wanted: Sequence[str], what: str) -> None:
        names = set(self.products_dataset().schema.names)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise CatalogInputError(
                f"{self.products_dir}: {what} {missing} not found; columns: {sorted(names)}"
            )

    def image_loader(self, row: dict) -> Callable[[], bytes]:
        """A callable giving the image bytes of a :meth:`product_rows` row (read on call)."""
        data = row.get("image")
        if data:
            return lambda: data
        uri = row.get("image_uri")
        if not uri:
            raise CatalogInputError(
                f"product {row['product_id']!r} has neither image nor image_uri"
            )
        if not is_s3(uri) and not uri.startswith("/"):
            file_fs, path = self.fs, join(self.products_dir, uri)  # relative to products/
        else:
            file_fs, path = filesystem_for(uri, self.s3)

        def read() -> bytes:
            with file_fs.open_input_stream(path) as f:
                return f.read()

        return read

    # ---- texts ------------------------------------------------------------------------------------
    def title_rows(self, split: str) -> list[dict]:
        """One ``{product_id, lang, query}`` row per non-empty title of each product of ``split``
        (``source.title_columns``; ``lang`` from :func:`title_language`)."""
        columns = self.source.titles()
        self.require_columns(columns, "title columns (source.title_columns)")
        rows = self.product_rows(split, extra=columns, images=False)
        return [
            {"product_id": row["product_id"], "lang": title_language(c), "query": row[c]}
            for row in rows
            for c in columns
            if row[c]
        ]

    def queries_path(self) -> str | None:
        """The held-out queries file: ``source.queries``, else the catalog folder's
        ``queries.parquet`` (the make_catalog layout), else None (titles serve as queries)."""
        if self.source.queries:
            return self.source.queries
        if self.nested and self.has_file(QUERIES_FILE):
            return self.root.rstrip("/") + "/" + QUERIES_FILE
        return None

    def query_rows(self) -> list[dict]:
        """The queries file as ``{product_id, lang, query}`` rows (``lang`` "query" when absent)."""
        import pyarrow.parquet as pq

        path = self.queries_path()
        if path is None:
            raise CatalogInputError(f"catalog {self.root} has no queries file")
        fs, file_path = filesystem_for(path, self.s3)
        try:
            table = pq.read_table(file_path, filesystem=fs)
        except (OSError, ValueError) as err:
            raise CatalogInputError(f"queries file {path} cannot be read: {err}") from err
        names = table.column_names
        missing = {"product_id", "query"} - set(names)
        if missing:
            raise CatalogInputError(
                f"queries file {path}: missing columns {sorted(missing)}; got {names}"
            )
        ids, texts = table.column("product_id").to_pylist(), table.column("query").to_pylist()
        langs = table.column("lang").to_pylist() if "lang" in names else ["query"] * len(ids)
        return [
            {"product_id": str(p), "lang": lang, "query": q}
            for p, lang, q in zip(ids, langs, texts, strict=True)
            if q
        ]
