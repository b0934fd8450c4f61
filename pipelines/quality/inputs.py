"""The catalog's products and shopper queries as the quality tasks read them (pairs.parquet,
queries.parquet), checked against the pool ``load_catalog`` reads from products/."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.evaluation.data import EvalInputError
from pipelines.quality.common import PRODUCT_COLUMNS, QUERY_COLUMNS

if TYPE_CHECKING:
    from pipelines.config import AppConfig


def _read_catalog_table(root: str, cfg: AppConfig, name: str, columns: Sequence[str]) -> list[dict]:
    from pipelines.catalog.reader import CatalogReader

    reader = CatalogReader(root, cfg)
    try:
        table = reader.read_table(name)
    except OSError as err:
        raise EvalInputError(f"catalog {root}: cannot read {name}: {err}") from err
    missing = sorted(set(columns) - set(table.column_names))
    if missing:
        raise EvalInputError(
            f"{reader.path(name)}: missing columns {missing} (it has {table.column_names}); "
            "rewrite the catalog with the current pipelines.make_catalog"
        )
    return table.select(list(columns)).to_pylist()


def catalog_products(catalog_root: str, cfg: AppConfig, split: str) -> list[dict]:
    """The split's products (``PRODUCT_COLUMNS`` of pairs.parquet), sorted by product_id: the
    order of ``load_catalog``'s pool, and what :func:`task_c` and the relevance rule take."""
    rows = _read_catalog_table(catalog_root, cfg, "pairs.parquet", PRODUCT_COLUMNS)
    picked = sorted((r for r in rows if r["split"] == split), key=lambda r: r["product_id"])
    if not picked:
        splits = sorted({r["split"] for r in rows} - {None})
        raise EvalInputError(f"catalog {catalog_root} has no products in split {split!r}: {splits}")
    return picked


def catalog_queries(catalog_root: str, cfg: AppConfig, split: str) -> list[dict]:
    """The split's shopper queries (``QUERY_COLUMNS`` of queries.parquet), in file order."""
    rows = _read_catalog_table(catalog_root, cfg, "queries.parquet", QUERY_COLUMNS)
    picked = [r for r in rows if r["split"] == split]
    if not picked:
        splits = sorted({r["split"] for r in rows} - {None})
        raise EvalInputError(
            f"catalog {catalog_root} has no shopper queries in split {split!r}: {splits}"
        )
    return picked


def aligned(products: list[dict], product_ids: Sequence[str]) -> list[dict]:
    """``products`` when they are exactly the pool ``product_ids``, in that order."""
    ids = [p["product_id"] for p in products]
    if ids != list(product_ids):
        extra, absent = sorted(set(ids) - set(product_ids)), sorted(set(product_ids) - set(ids))
        raise EvalInputError(
            f"pairs.parquet and products/ disagree on the split's products: only in pairs "
            f"{extra[:3]}, only in products {absent[:3]} ({len(ids)} vs {len(product_ids)})"
        )
    return products
