"""The search-quality tasks (pipelines.quality): metric assembly on hand-made inputs and fake models,
then tasks A, B and the ITM diagnostics on a small demo catalog with the tiny random BLIP, and Task C
through the service's search on the session's published index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blip_ops.evaluate import rank_positives, retrieval_metrics
from pipelines.quality import tasks

LOCAL_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "local.yaml")
LANGS = {"en", "zh", "pinyin"}


def _check_summary(s: dict, low: float = 0.0, high: float = 1.0) -> None:
    assert set(s) == {"value", "ci", "n"}, s
    lo, hi = s["ci"]
    assert low <= lo <= s["value"] <= hi <= high, s


def _check_delta(s: dict) -> None:
    lo, hi = s["ci"]
    assert -1.0 <= lo <= s["value"] <= hi <= 1.0, s


# --------------------------------------------------------------------------- evaluate additions


def test_retrieval_metrics_intervals_ranks_and_itm_weight():
    rng = np.random.default_rng(0)
    n_t, n_p = 30, 12
    sims = rng.uniform(-1, 1, (n_t, n_p)).astype(np.float32)
    itm = rng.normal(0, 3, (n_t, n_p)).astype(np.float32)
    text_product = rng.integers(0, n_p, n_t)
    scorers = {"itm_t2p": lambda q, c: itm[q, c], "itm_p2t": lambda p, t: itm[t, p]}
    plain = retrieval_metrics(sims, text_product, k_test=[1, 5], **scorers)
    full = retrieval_metrics(
        sims, text_product, k_test=[1, 5], with_ci=True, with_ranks=True, **scorers
    )
    assert "ci" not in plain["itc"] and "ranks" not in plain
    pairs = [(full["itc"], plain["itc"])] + [(full["itm"][k], plain["itm"][k]) for k in ("1", "5")]
    for fig, same in pairs:
        for d in ("text_to_product", "product_to_text"):
            assert fig[d] == same[d]  # the intervals add keys, never change a figure
            for name, value in fig[d].items():
                lo, hi = fig["ci"][d][name]
                assert lo <= value <= hi
    ranks = rank_positives(
        sims, text_product, np.arange(n_p), k_test=[1, 5], itm=scorers["itm_t2p"]
    )
    assert full["ranks"]["itc"]["text_to_product"].tolist() == ranks.itc.tolist()
    assert full["ranks"]["itm"]["5"]["text_to_product"].tolist() == ranks.itm[5].tolist()
    # Weight 0: the head is ordered by cosine alone, so re-ranking changes nothing.
    flat = retrieval_metrics(sims, text_product, k_test=[5], itm_weight=0.0, **scorers)
    assert flat["itm"]["5"]["text_to_product"] == flat["itc"]["text_to_product"]
    assert flat["itm"]["5"]["product_to_text"] == flat["itc"]["product_to_text"]
    # A huge weight: the head is ordered by the logit alone.
    heavy = rank_positives(
        sims, text_product, np.arange(n_p), k_test=[n_p], itm=scorers["itm_t2p"], itm_weight=1e6
    )
    by_logit = np.argsort(-itm, axis=1, kind="stable")
    want = [int(np.flatnonzero(by_logit[q] == text_product[q])[0]) for q in range(n_t)]
    assert heavy.itm[n_p].tolist() == want


# --------------------------------------------------------------------------- ranking metrics


def test_per_query_metrics_by_hand():
    relevant = np.array(
        [
            [True, False, True, False],  # query 0: products 0 and 2 answer it; labelled 2
            [False, False, False, True],  # query 1: only product 3, its own
        ]
    )
    labelled = np.array([2, 3])
    top = np.array([[0, 1, 2, -1], [1, 0, 2, -1]])  # query 1's product never shows up
    got = tasks.per_query_metrics(top, labelled, relevant)
    assert got["success@1"].tolist() == [1.0, 0.0]
    assert got["R@1"].tolist() == [0.0, 0.0] and got["R@5"].tolist() == [1.0, 0.0]
    ideal = 1 + 1 / np.log2(3)
    assert got["ndcg@10"] == pytest.approx([(1 + 1 / np.log2(4)) / ideal, 0.0])


def _rows(kind_color_by_id: dict[str, tuple[str, str]]) -> list[dict]:
    return [
        {"product_id": pid, "kind": k, "color": c, "pattern": None, "material": None, "brand": None}
        for pid, (k, c) in kind_color_by_id.items()
    ]


def test_task_c_report_from_hand_made_answers():
    products = _rows({"a": ("sofa", "red"), "b": ("sofa", "red"), "c": ("sofa", "blue")})
    queries = [
        {"query_id": "q1", "product_id": "a", "lang": "en", "query": "red sofa",
         "kind": "sofa", "color": "red", "pattern": None, "material": None, "brand": None},
        {"query_id": "q2", "product_id": "c", "lang": "zh", "query": "蓝色沙发",
         "kind": "sofa", "color": "blue", "pattern": None, "material": None, "brand": None},
    ]  # fmt: skip
    ranked = {
        ("off", False): [["b", "a"], ["a", "b", "c"]],  # q1: a relevant sibling first; q2: 3rd
        ("off", True): [["a", "b"], ["c"]],  # both labelled products first
        ("rrf", True): [["zz", "a"], []],  # an id outside the pool, and no answer at all
    }

    def relevance(qs, ps):  # the catalog's rule for kind + colour, written out
        return np.array(
            [[p["kind"] == q["kind"] and p["color"] == q["color"] for p in ps] for q in qs]
        )

    out = tasks.task_c_report(ranked, queries, products, relevance=relevance, n_boot=200)
    off, rrf = out["modes"]["off"], out["modes"]["rrf"]
    assert set(off) == {"rerank_off", "rerank_on", "rerank_on_minus_off"}
    assert set(rrf) == {"rerank_on", "minus_hybrid_off"} and set(rrf["minus_hybrid_off"]) == {
        "rerank_on"
    }
    no_rr = off["rerank_off"]["overall"]
    assert no_rr["success@1"]["value"] == 0.5  # q1 yes (b answers "red sofa"), q2 no
    assert no_rr["R@1"]["value"] == 0.0 and no_rr["R@5"]["value"] == 1.0
    assert off["rerank_off"]["by_lang"]["en"]["ndcg@10"]["value"] == pytest.approx(1.0)
    assert off["rerank_off"]["by_lang"]["zh"]["ndcg@10"]["value"] == pytest.approx(0.5)
    assert off["rerank_on"]["overall"]["success@1"]["value"] == 1.0
    delta = off["rerank_on_minus_off"]["overall"]
    assert delta["R@1"]["value"] == 1.0 and delta["success@1"]["value"] == 0.5
    assert rrf["rerank_on"]["overall"]["success@1"]["value"] == 0.0
    assert rrf["rerank_on"]["overall"]["R@5"]["value"] == 0.5
    assert list(off["rerank_off"]["by_lang"]) == ["en", "zh"]
    assert out["counts"] == {"queries": 2, "products": 3}
    with pytest.raises(ValueError, match="answers"):
        tasks.task_c_report({("off", False): [["a"]]}, queries, products, relevance=relevance)


# --------------------------------------------------------------------------- ITM AUC assembly


class _FakeItm:
    """A model whose ITM knows each image's own title: logit 5 for it, a small number otherwise."""

    def __init__(self, own: dict[int, set[str]], own_logit: float = 5.0):
        self.own = own
        self.own_logit = own_logit

    def encode_images(self, images, return_tokens=False):
        tokens = torch.tensor([float(i) for i in images]).reshape(-1, 1, 1)  # (b, 1, 1)
        return type("Enc", (), {"tokens": tokens})()

    def itm_scores(self, texts, image_tokens):
        ids = image_tokens[:, 0, 0].long().tolist()
        texts = [texts] * len(ids) if isinstance(texts, str) else texts
        return torch.tensor(
            [
                self.own_logit if t in self.own[i] else (len(t) % 7) / 7
                for t, i in zip(texts, ids, strict=True)
            ]
        )


def _family_products() -> list[dict]:
    """Families: f1 by colour (3), f2 by brand (2), f3 alone; titles per language."""
    spec = [("f1", "color"), ("f1", "color"), ("f1", "color"), ("f2", "brand"), ("f2", "brand"),
            ("f3", None)]  # fmt: skip
    return [
        {
            "product_id": f"p{i}",
            "family_id": fam,
            "differs_by": axis,
            "titles": {lang: f"{lang} title of p{i}" for lang in ("en", "zh", "pinyin")},
        }
        for i, (fam, axis) in enumerate(spec)
    ]


def test_itm_auc_of_a_scorer_that_knows_the_own_title_is_one():
    products = _family_products()
    own = {i: set(p["titles"].values()) for i, p in enumerate(products)}
    out = tasks.itm_auc_from_products(
        _FakeItm(own), list(range(len(products))), products, batch_size=2, n_boot=100
    )
    assert out["auc_sibling"] == 1.0 and out["auc_random"] == 1.0
    assert out["auc_sibling_by_attribute"] == {
        "color": 1.0, "pattern": None, "material": None, "brand": 1.0,
    }  # fmt: skip
    assert out["ci"]["auc_sibling"] == [1.0, 1.0]
    # 5 products have siblings (p5 has none): 3 languages each; f1 has 2 siblings per product.
    assert out["pairs"] == {
        "products": 5, "own": 15, "sibling": {"color": 18, "pattern": 0, "material": 0, "brand": 6},
        "random": 15, "sibling_same_text": 0,
    }  # fmt: skip
    assert set(out["by_lang"]) == LANGS


def test_itm_auc_of_a_scorer_that_cannot_tell_is_a_half():
    products = _family_products()
    for p in products:  # every title of a family the same: siblings are not negatives
        p["titles"] = {lang: f"{lang} {p['family_id']}" for lang in ("en", "zh", "pinyin")}
    flat = _FakeItm({i: set() for i in range(len(products))})
    out = tasks.itm_auc_from_products(flat, list(range(len(products))), products, n_boot=50)
    assert out["auc_sibling"] is None and out["pairs"]["sibling_same_text"] == 24
    pairs, _ = tasks.itm_auc_pairs(products, seed=0)
    logits = np.zeros(len(pairs))
    assert tasks.itm_auc_report(pairs, logits, n_boot=50)["auc_random"] == 0.5


def test_itm_auc_pairs_never_pair_a_product_with_its_own_family_as_random():
    products = _family_products()
    family = {i: p["family_id"] for i, p in enumerate(products)}
    title_family = {t: p["family_id"] for p in products for t in p["titles"].values()}
    for seed in range(5):
        pairs, _ = tasks.itm_auc_pairs(products, seed=seed)
        for pair in pairs:
            if pair.role == "random":
                assert title_family[pair.text] != family[pair.product]
            if pair.role == "sibling":
                assert title_family[pair.text] == family[pair.product]
                assert pair.text not in products[pair.product]["titles"].values()


# --------------------------------------------------------------------------- on a real catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """60 products, seed 0: test families vary in colour, material and pattern (1.5 s)."""
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("quality") / "catalog"
    make_catalog(str(root), 60, seed=0, workers=1)
    return str(root)


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    from pipelines.config import load_config

    return load_config(LOCAL_CONFIG, [f"model.name_or_path={tiny_model_dir}"])


def test_task_a_on_a_tiny_catalog(tiny_model, catalog, cfg):
    out = tasks.task_a(tiny_model, catalog, cfg, k_tests=(1, 4), k_default=4, n_boot=200)
    assert set(out) == LANGS
    json.dumps(out, allow_nan=False)  # what the benchmark writes
    for block in out.values():
        assert set(block) == {"counts", "itc", "itm", "itm_minus_itc", "itc_r1", "itm_r1"}
        assert set(block["itm"]) == {"1", "4"}
        for fig in [block["itc"], *block["itm"].values()]:
            assert set(fig) == {"text_to_product", "product_to_text"}
            for recalls in fig.values():
                assert list(recalls) == ["R@1", "R@5", "R@10"]
                for s in recalls.values():
                    _check_summary(s)
                values = [s["value"] for s in recalls.values()]
                assert values == sorted(values)
        for d in ("text_to_product", "product_to_text"):
            # One re-ranked candidate cannot change the first place.
            assert block["itm"]["1"][d]["R@1"]["value"] == block["itc"][d]["R@1"]["value"]
            assert block["itm_minus_itc"]["1"][d]["R@1"]["ci"] == [0.0, 0.0]
            for s in block["itm_minus_itc"]["4"][d].values():
                _check_delta(s)
        assert block["itc_r1"] == block["itc"]["text_to_product"]["R@1"]["value"]
        assert block["itm_r1"] == block["itm"]["4"]["text_to_product"]["R@1"]["value"]
        assert block["counts"]["texts"] == block["counts"]["products_with_texts"] == 11


def test_itm_auc_on_a_tiny_catalog(tiny_model, catalog, cfg):
    out = tasks.itm_auc(tiny_model, catalog, cfg, split="test", n_boot=200)
    json.dumps(out, allow_nan=False)
    pairs = out["pairs"]
    # Test families of this catalog: colour (3), material (3), material (2), pattern (3).
    assert pairs["products"] == 11 and pairs["own"] == 33 and pairs["random"] == 33
    assert pairs["sibling"]["brand"] == 0 and pairs["sibling"]["color"] > 0
    assert sum(pairs["sibling"].values()) + pairs["sibling_same_text"] == 3 * (6 + 6 + 2 + 6)
    for name in ("auc_sibling", "auc_random"):
        lo, hi = out["ci"][name]
        assert 0.0 <= lo <= out[name] <= hi <= 1.0
    assert out["auc_sibling_by_attribute"]["brand"] is None
    assert 0.0 <= out["auc_sibling_by_attribute"]["color"] <= 1.0
    val = tasks.itm_auc(tiny_model, catalog, cfg, split="val", n_boot=50)
    assert val["auc_sibling_by_attribute"]["brand"] is not None  # val has a brand family


def test_task_b_on_a_tiny_catalog(tiny_model, catalog, cfg):
    out = tasks.task_b(tiny_model, catalog, cfg, k_test=4, n_boot=200)
    json.dumps(out, allow_nan=False)
    assert out["counts"]["queries"] == 33 and out["counts"]["products"] == 11
    assert out["counts"]["relevant_per_query"] >= 1.0
    names = ["success@1", "ndcg@10", "R@1", "R@5", "R@10"]
    for method in ("itc", "itm"):
        assert set(out[method]["by_lang"]) == LANGS
        for block in [out[method]["overall"], *out[method]["by_lang"].values()]:
            assert list(block) == names
            for s in block.values():
                _check_summary(s)
            # The labelled product is relevant: a first-place hit is a success.
            assert block["success@1"]["value"] >= block["R@1"]["value"]
            assert block["R@1"]["value"] <= block["R@5"]["value"] <= block["R@10"]["value"]
    for s in out["itm_minus_itc"]["overall"].values():
        _check_delta(s)
    once = tasks.task_b(tiny_model, catalog, cfg, k_test=1, n_boot=50)
    assert once["itm"]["overall"]["success@1"] == once["itc"]["overall"]["success@1"]
    assert once["itm"]["overall"]["R@1"] == once["itc"]["overall"]["R@1"]


def test_task_b_counts_what_the_relevance_rule_says(tiny_model, catalog, cfg):
    def only_labelled(queries, products):
        ids = [p["product_id"] for p in products]
        return np.array([[pid == q["product_id"] for pid in ids] for q in queries])

    def everything(queries, products):
        return np.ones((len(queries), len(products)), dtype=bool)

    strict = tasks.task_b(tiny_model, catalog, cfg, k_test=4, n_boot=50, relevance=only_labelled)
    for method in ("itc", "itm"):
        block = strict[method]["overall"]
        assert block["success@1"]["value"] == block["R@1"]["value"]
    assert strict["counts"]["relevant_per_query"] == 1.0
    loose = tasks.task_b(tiny_model, catalog, cfg, k_test=4, n_boot=50, relevance=everything)
    assert loose["itc"]["overall"]["success@1"]["value"] == 1.0
    assert loose["itc"]["overall"]["ndcg@10"]["value"] == pytest.approx(1.0)


def test_missing_catalog_columns_are_named(catalog, cfg, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from pipelines.evaluation.data import EvalInputError

    old = tmp_path / "old"
    shutil.copytree(catalog, old)
    table = pq.read_table(old / "queries.parquet")
    pq.write_table(table.drop_columns(["kind", "color"]), old / "queries.parquet")
    with pytest.raises(EvalInputError, match=r"missing columns \['color', 'kind'\]"):
        tasks.catalog_queries(str(old), cfg, "test")
    with pytest.raises(EvalInputError, match="no products in split 'dev'"):
        tasks.catalog_products(catalog, cfg, "dev")


# --------------------------------------------------------------------------- Task C


@pytest.mark.ray
def test_task_c_through_the_service_search(search_index, tiny_model):
    from blip_ops import load_model
    from pipelines.indexing import tables

    cfg, root = search_index
    run = tables.published_run(tables.connect(cfg.index.uri))
    model = tiny_model
    if model.model_id != run["model_id"]:  # another module republished with another checkpoint
        model = load_model(run["model_path"], device="cpu", dtype="float32")
    service = tasks.open_service(cfg, model)
    catalog = str(root / "catalog")
    # 8 products x 3 languages: the re-rank costs ~0.2 s a query on 2 CPU cores.
    queries = tasks.catalog_queries(catalog, cfg, "test")[:24]
    products = tasks.catalog_products(catalog, cfg, "test")
    test_ids = {p["product_id"] for p in products}
    answers = tasks.run_searches(
        service.snapshot, service.scorer, queries[:6], service.limits, hybrid="rrf", rerank=True
    )
    assert all(ids and set(ids) <= test_ids for ids in answers)  # the filter keeps to the split

    out = tasks.task_c(
        service.snapshot, service.scorer, queries, products, limits=service.limits, n_boot=200
    )
    json.dumps(out, allow_nan=False)
    assert set(out["modes"]) == {"off", "rrf"}
    assert out["settings"]["filter"] == "split = 'test'" and out["settings"]["k"] == 10
    assert out["counts"] == {"queries": len(queries), "products": len(products)}
    for block in out["modes"].values():
        for which in ("rerank_off", "rerank_on"):
            assert set(block[which]["by_lang"]) == LANGS
            for group in [block[which]["overall"], *block[which]["by_lang"].values()]:
                for s in group.values():
                    _check_summary(s)
                assert group["success@1"]["value"] >= group["R@1"]["value"]
                assert group["R@1"]["value"] <= group["R@5"]["value"] <= group["R@10"]["value"]
        for s in block["rerank_on_minus_off"]["overall"].values():
            _check_delta(s)
    assert set(out["modes"]["rrf"]["minus_hybrid_off"]) == {"rerank_off", "rerank_on"}
