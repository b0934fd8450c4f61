"""What the quality tasks share: languages, attributes, cut-offs, and small helpers."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

LANGS = ("en", "zh", "pinyin")
ATTRIBUTES = ("color", "pattern", "material", "brand")
SIBLING_AXES = ("color", "pattern", "material")  # auc_sibling: what the photo itself shows
PRODUCT_COLUMNS = ("product_id", "family_id", "split", "differs_by", "kind", *ATTRIBUTES)
QUERY_COLUMNS = ("query_id", "product_id", "split", "lang", "query", "kind", *ATTRIBUTES)
RECALL_AT = (1, 5, 10)
NDCG_AT = 10
DEPTH = max(*RECALL_AT, NDCG_AT)  # results looked at per query
TOKEN_CACHE_BYTES = 1 << 30
# (queries, products) -> (Q, P) bool: pipelines.catalog.relevance.relevance_matrix's signature
Relevance = Callable[[Sequence[Mapping], Sequence[Mapping]], np.ndarray]


def num(x: float) -> float | None:
    """JSON-safe figure: None for a missing or NaN value."""
    return None if x is None or math.isnan(x) else float(x)


def lang_order(langs: Sequence[str]) -> list[str]:
    """The languages present, the catalog's own (``LANGS``) first, others after in order seen."""
    seen = list(dict.fromkeys(langs))
    return [lang for lang in LANGS if lang in seen] + [lang for lang in seen if lang not in LANGS]
