"""pipelines.catalog.relevance: every product a query's words describe answers it."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipelines import make_catalog as mc
from pipelines.catalog.plan import ProductPlan, plan_catalog
from pipelines.catalog.relevance import ATTRIBUTES, is_relevant, relevance_matrix
from pipelines.catalog.vocab import BRANDS


def _product(pid: str, kind: str, color: str, pattern="solid", material="linen", brand="M & D"):
    return dict(product_id=pid, kind=kind, color=color, pattern=pattern, material=material,
                brand=brand)  # fmt: skip


def _query(kind: str | None, **named) -> dict:
    return {"kind": kind, **{a: named.get(a) for a in ATTRIBUTES}}


PRODUCTS = [
    _product("red-linen-sofa", "sofa", "red"),
    _product("red-velvet-sofa", "sofa", "red", material="velvet"),
    _product("red-striped-sofa", "sofa", "red", pattern="striped", brand="UPIN"),
    _product("blue-linen-sofa", "sofa", "blue"),
    _product("red-linen-armchair", "armchair", "red"),
]


def _ids(query: dict) -> set[str]:
    return {p["product_id"] for p in PRODUCTS if is_relevant(query, p)}


def test_a_colour_query_matches_every_product_of_that_kind_and_colour():
    assert _ids(_query("sofa", color="red")) == {
        "red-linen-sofa",
        "red-velvet-sofa",
        "red-striped-sofa",
    }
    assert _ids(_query("sofa", color="blue")) == {"blue-linen-sofa"}
    assert _ids(_query("sofa", color="green")) == set()


def test_a_product_of_another_kind_never_matches():
    armchair = PRODUCTS[-1]
    for query in (
        _query("sofa"),
        _query("sofa", color="red"),
        _query("sofa", color="red", material="linen"),
    ):
        assert not is_relevant(query, armchair)
    assert _ids(_query("armchair", color="red", material="linen")) == {"red-linen-armchair"}


def test_a_query_naming_two_attributes_needs_both():
    assert _ids(_query("sofa", color="red", material="linen")) == {
        "red-linen-sofa",
        "red-striped-sofa",
    }
    assert _ids(_query("sofa", color="red", brand="UPIN")) == {"red-striped-sofa"}
    assert _ids(_query("sofa", color="blue", material="velvet")) == set()


def test_nulls_name_nothing_and_a_missing_product_value_matches_nothing():
    assert _ids(_query("sofa")) == {p["product_id"] for p in PRODUCTS if p["kind"] == "sofa"}
    assert _ids({"kind": "sofa"}) == _ids(_query("sofa"))  # absent columns are not named either
    unknown = {**PRODUCTS[0], "pattern": None}
    assert is_relevant(_query("sofa", color="red"), unknown)
    assert not is_relevant(_query("sofa", pattern="solid"), unknown)
    got = relevance_matrix([_query("sofa", pattern="solid"), _query("sofa")], [unknown])
    assert got.tolist() == [[False], [True]]


def test_a_query_without_kind_is_refused_with_what_was_received():
    with pytest.raises(ValueError, match=r"query has no 'kind'.*'color': 'red'"):
        is_relevant({"color": "red"}, PRODUCTS[0])
    with pytest.raises(ValueError, match=r"query 1 has no 'kind'.*'kind': None"):
        relevance_matrix([_query("sofa"), _query(None, color="red")], PRODUCTS)
    with pytest.raises(ValueError, match=r"product 0 has no 'kind'"):
        relevance_matrix([_query("sofa")], [{"color": "red"}])
    with pytest.raises(ValueError, match="must be a mapping"):
        relevance_matrix(["red sofa"], PRODUCTS)


def test_matrix_of_hand_made_rows_and_empty_inputs():
    queries = [_query("sofa", color="red"), _query("armchair"), _query("sofa", brand="UPIN")]
    expected = [
        [True, True, True, False, False],
        [False] * 4 + [True],
        [False, False, True, False, False],
    ]
    assert relevance_matrix(queries, PRODUCTS).tolist() == expected
    assert relevance_matrix([], PRODUCTS).shape == (0, 5)
    assert relevance_matrix(queries, []).shape == (3, 0)


def _plan_product(p: ProductPlan) -> dict:
    return {"product_id": p.product_id, "kind": p.kind, "color": p.color, "pattern": p.pattern,
            "material": p.material, "brand": BRANDS[p.brand].en}  # fmt: skip


def _plan_queries(plan: list[ProductPlan]) -> list[dict]:
    return [
        {"product_id": p.product_id, "lang": lang, "kind": p.kind, **p.query_attributes}
        for p in plan
        for lang in p.queries
    ]


@pytest.mark.parametrize("seed", [0, 7])
def test_matrix_equals_is_relevant_pairwise_on_a_generated_plan(seed):
    plan = plan_catalog(300, seed)
    products = [_plan_product(p) for p in plan]
    queries = _plan_queries(plan)
    got = relevance_matrix(queries, products)
    expected = np.array([[is_relevant(q, p) for p in products] for q in queries])
    assert got.dtype == bool and got.shape == (900, 300)
    np.testing.assert_array_equal(got, expected)
    assert got.sum(axis=1).max() > 1  # queries match more than the product they were written for
    own = [int(q["product_id"][1:]) for q in queries]
    assert got[np.arange(len(queries)), own].all()


def test_matrix_is_fast_for_thousands_of_queries():
    plan = plan_catalog(1000, 2)
    queries = _plan_queries(plan)
    products = [_plan_product(p) for p in plan[:600]]
    started = time.perf_counter()
    got = relevance_matrix(queries, products)
    assert got.shape == (3000, 600)
    assert time.perf_counter() - started < 2.0  # a Python double loop takes far longer


def test_every_query_of_a_real_catalog_is_answered_by_its_own_product(tmp_path):
    manifest = mc.make_catalog(str(tmp_path / "catalog"), 40, seed=4, workers=1)
    products = (
        ds.dataset(str(tmp_path / "catalog" / "products"), format="parquet")
        .to_table(columns=["product_id", "kind", *ATTRIBUTES])
        .to_pylist()
    )
    queries = pq.read_table(tmp_path / "catalog" / "queries.parquet").to_pylist()
    assert len(queries) == manifest["queries"] > 0
    column = {p["product_id"]: i for i, p in enumerate(products)}
    got = relevance_matrix(queries, products)
    assert got[np.arange(len(queries)), [column[q["product_id"]] for q in queries]].all()
    for q, row in zip(queries, got, strict=True):
        for p, relevant in zip(products, row, strict=True):
            assert relevant == is_relevant(q, p)
