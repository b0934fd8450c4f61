"""The deterministic split of a catalog that has no split column: a hash of a group column.

Every value of the group column (a product id, or a family id so that near-duplicates stay in one
split) maps to a point in [0, 1) by SHA-256, and the points are cut by the split shares in a fixed
order (train, val, test). The same value gets the same split on every machine and in every run,
and adding products never moves an existing one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

SPLIT_ORDER = ("train", "val", "test")


def hash_point(value: object) -> float:
    """A point in [0, 1) for ``value``, the same everywhere (not Python's salted ``hash``)."""
    digest = hashlib.sha256(str(value).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_splits(values: Iterable[object], fractions: Mapping[str, float]) -> list[str]:
    """The split of each value: the share of ``fractions`` its :func:`hash_point` falls in."""
    bounds, total = [], 0.0
    for name in SPLIT_ORDER:
        if name in fractions:
            total += fractions[name]
            bounds.append((total, name))
    last = bounds[-1][1]  # rounding never leaves a point past the end
    return [
        next((name for bound, name in bounds if p < bound), last) for p in map(hash_point, values)
    ]
