"""Reading a catalog back: the folder ``pipelines.catalog.writer`` writes, local or ``s3://``.

One reader for every consumer (fine-tuning, evaluation, the quality tasks): ``products/`` by
split with each product's image inline (``image``) or by ``image_uri`` (relative to
``products/``, absolute, or ``s3://``), and the tables beside it (``pairs.parquet``,
``queries.parquet``). Column names follow ``source.columns``; the rows it returns use the
canonical names (``product_id``, ``image``, ``image_uri``, ``split``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.storage import S3Settings, filesystem_for, is_s3, join

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as pads

    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)

PRODUCTS_DIR = "products"
PAIRS_FILE = "pairs.parquet"
QUERIES_FILE = "queries.parquet"
SPLIT_COLUMN = "split"
# pairs.parquet's title columns by language: the products' own titles.
TITLE_COLUMNS = {"en": "title_en", "zh": "title_zh", "pinyin": "title_pinyin"}


class CatalogInputError(ValueError):
    """The catalog folder is missing a part or holds malformed data; the message says which."""


class CatalogReader:
    """One catalog folder. Nothing is read until a method asks for it."""

    def __init__(self, root: str | Path, cfg: AppConfig):
        self.root = str(root)
        self.s3 = S3Settings.from_config(cfg.s3)
        self.fs, self.base = filesystem_for(self.root, self.s3)
        self.columns = cfg.source.columns
        self.products_dir = join(self.base, PRODUCTS_DIR)

    @property
    def location(self) -> str:
        """The catalog as reports name it: the ``s3://`` URI, or the absolute local folder."""
        return self.root if is_s3(self.root) else self.base

    def path(self, name: str) -> str:
        return join(self.base, name)

    def has_file(self, name: str) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.path(name)).type == FileType.File

    def require_products(self) -> None:
        from pyarrow.fs import FileType

        if self.fs.get_file_info(self.products_dir).type != FileType.Directory:
            raise CatalogInputError(
                f"catalog {self.root} has no products/ folder (expected what "
                "pipelines.make_catalog writes: products/*.parquet and queries.parquet)"
            )

    def read_table(self, name: str) -> pa.Table:
        """A Parquet file of the catalog folder (``pairs.parquet``, ``queries.parquet``)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.path(name), filesystem=self.fs)

    def products_dataset(self) -> pads.Dataset:
        """``products/`` as a dataset; refused without a ``split`` column (no held-out set)."""
        import pyarrow.dataset as pads

        self.require_products()
        dataset = pads.dataset(self.products_dir, format="parquet", filesystem=self.fs)
        if SPLIT_COLUMN not in dataset.schema.names:
            raise CatalogInputError(
                f"{self.products_dir}: no 'split' column, so train and held-out products "
                "cannot be told apart"
            )
        return dataset

    def product_rows(self, split: str, extra: Sequence[str] = ()) -> list[dict]:
        """The products of ``split`` sorted by id: ``{product_id, split, image, image_uri}``
        plus the ``extra`` columns the files have (absent ones are None)."""
        import pyarrow.dataset as pads

        dataset = self.products_dataset()
        names = set(dataset.schema.names)
        cols = self.columns
        sources = {"product_id": cols.product_id, "image": cols.image, "image_uri": cols.image_uri}
        present = {key: c for key, c in sources.items() if c in names}
        if "product_id" not in present or len(present) < 2:
            raise CatalogInputError(
                f"{self.products_dir}: expected columns {cols.product_id!r} and {cols.image!r} "
                f"or {cols.image_uri!r}, got {sorted(names)}"
            )
        more = [c for c in extra if c in names and c not in present.values()]
        table = dataset.to_table(
            columns=[*present.values(), *more], filter=pads.field(SPLIT_COLUMN) == split
        )
        if table.num_rows == 0:
            every = dataset.to_table(columns=[SPLIT_COLUMN]).column(SPLIT_COLUMN).to_pylist()
            splits = sorted(set(every) - {None})
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

    def splits(self) -> dict[str, str]:
        """{product_id: split} of every product (no images read)."""
        pid = self.columns.product_id
        table = self.products_dataset().to_table(columns=[pid, SPLIT_COLUMN])
        ids, splits = table.column(pid).to_pylist(), table.column(SPLIT_COLUMN).to_pylist()
        return {str(p): str(s) for p, s in zip(ids, splits, strict=True)}

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

    def title_rows(self) -> list[dict]:
        """pairs.parquet as one ``{product_id, lang, query}`` row per title language."""
        table = self.read_table(PAIRS_FILE)
        missing = {"product_id", *TITLE_COLUMNS.values()} - set(table.column_names)
        if missing:
            raise CatalogInputError(f"{self.path(PAIRS_FILE)}: missing columns {sorted(missing)}")
        return [
            {"product_id": row["product_id"], "lang": lang, "query": row[column]}
            for row in table.to_pylist()
            for lang, column in TITLE_COLUMNS.items()
            if row[column]
        ]
