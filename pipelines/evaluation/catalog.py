"""A catalog as evaluation input: the products of one split are the pool, and its held-out
queries (``source.queries`` or the catalog's ``queries.parquet``: shopper queries in English, 汉字
and pinyin for the demo catalog) or the products' own titles (``source.title_columns``, one text
per column) are the texts, so the figures come per language too. A catalog without a queries file
is ranked by its titles."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from pipelines.catalog.reader import CatalogReader
from pipelines.evaluation.data import EvalData, EvalInputError, LazyImages

if TYPE_CHECKING:
    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)

TEXT_SOURCES = ("queries", "titles")


def load_catalog(
    root: str, split: str, cfg: AppConfig, *, target_size: int | None, texts: str = "queries"
) -> EvalData:
    """The catalog's held-out queries (or the products' titles) over the products of ``split``.

    Images inline (``image``) or by ``image_uri`` (relative to the Parquet folder, absolute, or
    ``s3://``), read only when an image is decoded.
    """
    if texts not in TEXT_SOURCES:
        raise EvalInputError(f"texts must be one of {TEXT_SOURCES}, got {texts!r}")
    reader = CatalogReader(root, cfg)
    reader.require_products()
    if texts == "queries" and reader.queries_path() is None:
        logger.info("catalog %s has no queries file: its titles are the queries", root)
        texts = "titles"
    rows = reader.product_rows(split)
    ids = [r["product_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise EvalInputError(f"catalog {root}: duplicate product ids in split {split!r}")
    queries = _split_texts(reader, texts, ids, split)
    index_of = {pid: i for i, pid in enumerate(ids)}
    return EvalData(
        product_ids=ids,
        images=LazyImages(
            ids,
            [reader.image_loader(r) for r in rows],
            target_size=target_size,
            max_bytes=cfg.source.max_image_bytes,
        ),  # fmt: skip
        texts=[q["query"] for q in queries],
        text_product=np.asarray([index_of[q["product_id"]] for q in queries], dtype=np.int64),
        languages=[q["lang"] for q in queries],
        inputs={
            "kind": "catalog",
            "catalog": reader.location,
            "split": split,
            "split_rule": reader.split_rule(),
            "texts": texts,
            "text_source": reader.queries_path() if texts == "queries" else cfg.source.titles(),
            "products": len(ids),
            "queries": len(queries),
        },
    )


def _split_texts(reader: CatalogReader, texts: str, ids: list[str], split: str) -> list[dict]:
    """The ``{product_id, lang, query}`` rows whose product is in the pool ``ids``."""
    if texts == "titles":
        return reader.title_rows(split)
    queries = reader.query_rows()
    pool = set(ids)
    kept = [q for q in queries if q["product_id"] in pool]
    if not kept:
        raise EvalInputError(
            f"none of the {len(queries)} queries of {reader.queries_path()} is for a product "
            f"of split {split!r} ({len(ids)} products)"
        )
    if len(kept) < len(queries):
        logger.info(
            "ignored %d queries for products outside split %r", len(queries) - len(kept), split
        )
    return kept
