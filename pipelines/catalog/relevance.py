"""Which products answer a shopper query: every product the query's words describe.

A query such as "red sofa" is written for one product, but every red sofa of the catalog answers
it. Scoring only the product it was written for would call a model wrong for ranking another red
sofa first; scoring nothing but that id also hides whether the model confuses a red sofa with a
blue one. Here a product is relevant to a query when it is of the query's kind and has every
attribute value the query names (the ``kind``, ``color``, ``pattern``, ``material`` and ``brand``
columns of ``queries.parquet``, null where the query does not name the attribute), compared with
the same columns of the products table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

ATTRIBUTES = ("color", "pattern", "material", "brand")
_NOT_NAMED = -1  # a query's code for an attribute it does not name
_MISSING = -2  # a product's code for a missing value: equals no named value


def _kind(row: Mapping, what: str, index: int | None = None) -> object:
    where = "" if index is None else f" {index}"
    if not isinstance(row, Mapping):
        raise ValueError(f"{what}{where} must be a mapping of column -> value, got {row!r}")
    if row.get("kind") is None:
        raise ValueError(
            f"{what}{where} has no 'kind' (every {what} must say what it is), got {row!r}"
        )
    return row["kind"]


def is_relevant(query: Mapping, product: Mapping) -> bool:
    """True when ``product`` is of the query's kind and has every attribute value it names."""
    if _kind(product, "product") != _kind(query, "query"):
        return False
    return all(query.get(attr) is None or product.get(attr) == query[attr] for attr in ATTRIBUTES)


def _codes(
    queries: Sequence[Mapping], products: Sequence[Mapping], column: str
) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of one column's values, shared by queries and products (nulls: see above)."""
    vocabulary: dict[object, int] = {}
    q = [
        _NOT_NAMED
        if row.get(column) is None
        else vocabulary.setdefault(row[column], len(vocabulary))
        for row in queries
    ]
    p = [
        _MISSING if row.get(column) is None else vocabulary.setdefault(row[column], len(vocabulary))
        for row in products
    ]
    return np.asarray(q, dtype=np.int64), np.asarray(p, dtype=np.int64)


def relevance_matrix(queries: Sequence[Mapping], products: Sequence[Mapping]) -> np.ndarray:
    """``(len(queries), len(products))`` bool: ``[q, p]`` is ``is_relevant(queries[q], products[p])``.

    Queries that name the same kind and values share one row of work: the distinct query
    signatures are compared with every product by broadcasting, then expanded back.
    """
    for i, row in enumerate(queries):
        _kind(row, "query", i)
    for i, row in enumerate(products):
        _kind(row, "product", i)
    n_q, n_p = len(queries), len(products)
    if n_q == 0 or n_p == 0:
        return np.zeros((n_q, n_p), dtype=bool)
    columns = ("kind", *ATTRIBUTES)
    codes = [_codes(queries, products, column) for column in columns]
    signatures = np.stack([q for q, _ in codes], axis=1)  # (Q, 5)
    unique, inverse = np.unique(signatures, axis=0, return_inverse=True)
    kind_q, kind_p = unique[:, 0], codes[0][1]
    relevant = kind_q[:, None] == kind_p[None, :]
    for j, (_, attr_p) in enumerate(codes[1:], start=1):
        named = unique[:, j]
        relevant &= (named[:, None] == _NOT_NAMED) | (named[:, None] == attr_p[None, :])
    return relevant[inverse.reshape(-1)]
