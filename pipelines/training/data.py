"""The catalog's train split as fine-tuning reads it: products with their images, and titles.

Any catalog the index job reads (:class:`pipelines.catalog.reader.CatalogReader`). Each product's
titles come from ``source.title_columns`` (for the demo catalog: English, 汉字, pinyin): positives
of one image, de-duplicated after the model's own text normalisation. Images are inline or by
``image_uri``; the rows hold the bytes either way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.catalog.reader import CatalogReader, title_language
from pipelines.training.splits import TRAIN_SPLIT, check_train_only

if TYPE_CHECKING:
    from pipelines.config import AppConfig

ATTRIBUTE_COLUMNS = ("kind", "color", "pattern", "material", "brand")
FAMILY_COLUMN = "family_id"  # near-duplicate families, when the catalog has them
_PUNCT_RE = re.compile(r"[^\w.&]+")


def read_pairs(catalog: str | Path, cfg: AppConfig | None = None) -> dict[str, dict]:
    """{product_id: {"titles": {lang: title}, "family_id", attributes...}} for the train split.

    Titles come from ``source.title_columns`` (one per column, keyed by :func:`title_language`).
    Attributes (kind, colour, pattern, material, brand) come along when the catalog has them;
    they drive the attribute-swapped negatives. ``cfg`` gives the columns and the S3 settings
    (default: the configuration's defaults).
    """
    reader = CatalogReader(catalog, cfg or _default_config())
    columns = reader.source.titles()
    reader.require_columns(columns, "title columns (source.title_columns)")
    rows = reader.product_rows(
        TRAIN_SPLIT, extra=[*columns, FAMILY_COLUMN, *ATTRIBUTE_COLUMNS], images=False
    )
    pairs: dict[str, dict] = {}
    for row in rows:
        entry = {"titles": {title_language(c): row[c] for c in columns if row[c]}}
        entry["family_id"] = row[FAMILY_COLUMN]
        entry.update({a: row[a] for a in ATTRIBUTE_COLUMNS if row[a]})
        pairs[row["product_id"]] = entry
    untitled = [pid for pid, entry in pairs.items() if not entry["titles"]]
    if untitled:
        raise ValueError(
            f"catalog {catalog}: {len(untitled)} train products have no title in {columns}, "
            f"e.g. {untitled[:5]}"
        )
    return pairs


def title_key(title: str, normalize: Callable[[str], str] | None = None) -> str:
    """What two titles must share to be one positive: the model's text rule (``normalize``),
    then punctuation and spacing dropped (【热销】 and "re xiao" read the same to a pinyin model)."""
    text = normalize(title) if normalize is not None else title
    return " ".join(_PUNCT_RE.sub(" ", text).split())


def distinct_titles(
    pairs: dict[str, dict], normalize: Callable[[str], str] | None = None
) -> dict[str, list[str]]:
    """{product_id: its titles, de-duplicated by :func:`title_key`} (with the model's own text
    rule, a 汉字 title and its pinyin spelling are one text to a pinyin model: one positive)."""
    out = {}
    for pid, entry in pairs.items():
        seen: dict[str, str] = {}
        for title in entry["titles"].values():
            seen.setdefault(title_key(title, normalize), title)
        out[pid] = list(seen.values())
    return out


def read_titles(
    catalog: str | Path,
    normalize: Callable[[str], str] | None = None,
    cfg: AppConfig | None = None,
) -> dict[str, list[str]]:
    """{product_id: its distinct titles (``source.title_columns``)} for the train split."""
    return distinct_titles(read_pairs(catalog, cfg), normalize)


def read_train_products(catalog: str | Path, cfg: AppConfig) -> list[dict]:
    """The train split's rows ``{product_id, image, split, family_id}``, sorted by product id;
    ``image`` holds the bytes (read from ``image_uri`` when the catalog has no inline image)."""
    reader = CatalogReader(catalog, cfg)
    rows = [
        {
            "product_id": r["product_id"], "image": reader.image_loader(r)(), "split": r["split"],
            "family_id": r.get(FAMILY_COLUMN) or r["product_id"],
        }
        for r in reader.product_rows(TRAIN_SPLIT, extra=(FAMILY_COLUMN,))
    ]  # fmt: skip
    check_train_only(rows)
    if len(rows) < 2:
        raise ValueError(f"catalog {catalog}: {len(rows)} train products; need at least 2")
    return rows


def _default_config() -> AppConfig:
    from pipelines.config import AppConfig

    return AppConfig()
