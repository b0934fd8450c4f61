"""The catalog's train split as fine-tuning reads it: products with their images, and titles.

Each product's titles come from ``pairs.parquet`` (English, 汉字, pinyin): positives of one image,
de-duplicated after the model's own text normalisation. Images are inline or by ``image_uri``
(:class:`pipelines.catalog.reader.CatalogReader`); the rows hold the bytes either way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.catalog.reader import PAIRS_FILE, CatalogReader
from pipelines.training.splits import TRAIN_SPLIT, check_train_only

if TYPE_CHECKING:
    from pipelines.config import AppConfig

TITLE_COLUMNS = ("title_en", "title_zh", "title_pinyin")
ATTRIBUTE_COLUMNS = ("kind", "color", "pattern", "material", "brand")
_LANG_OF = {"title_en": "en", "title_zh": "zh", "title_pinyin": "pinyin"}
_PUNCT_RE = re.compile(r"[^\w.&]+")


def read_pairs(catalog: str | Path, cfg: AppConfig | None = None) -> dict[str, dict]:
    """{product_id: {"titles": {lang: title}, "family_id", attributes...}} for the train split.

    Attributes (kind, colour, pattern, material, brand) come along when pairs.parquet has them;
    they drive the attribute-swapped negatives. ``cfg`` gives the S3 settings of an ``s3://``
    catalog (default: the configuration's defaults).
    """
    table = CatalogReader(catalog, cfg or _default_config()).read_table(PAIRS_FILE)
    names = set(table.column_names)
    pairs: dict[str, dict] = {}
    for row in table.to_pylist():
        if row["split"] != TRAIN_SPLIT:
            continue
        entry = {"titles": {_LANG_OF[c]: row[c] for c in TITLE_COLUMNS if row.get(c)}}
        entry["family_id"] = row.get("family_id")
        entry.update({a: row[a] for a in ATTRIBUTE_COLUMNS if a in names and row.get(a)})
        pairs[row["product_id"]] = entry
    if not pairs:
        raise ValueError(f"{catalog}/pairs.parquet has no titles for split {TRAIN_SPLIT!r}")
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
    """{product_id: its distinct titles (English, 汉字, pinyin)} for the train split."""
    return distinct_titles(read_pairs(catalog, cfg), normalize)


def read_train_products(catalog: str | Path, cfg: AppConfig) -> list[dict]:
    """The train split's rows ``{product_id, image, split, family_id}``, sorted by product id;
    ``image`` holds the bytes (read from ``image_uri`` when the catalog has no inline image)."""
    reader = CatalogReader(catalog, cfg)
    rows = [
        {
            "product_id": r["product_id"], "image": reader.image_loader(r)(), "split": r["split"],
            "family_id": r.get("family_id") or r["product_id"],
        }
        for r in reader.product_rows(TRAIN_SPLIT, extra=("family_id",))
    ]  # fmt: skip
    check_train_only(rows)
    if len(rows) < 2:
        raise ValueError(f"catalog {catalog}: {len(rows)} train products; need at least 2")
    return rows


def _default_config() -> AppConfig:
    from pipelines.config import AppConfig

    return AppConfig()
