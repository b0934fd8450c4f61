"""Retrieval evaluation: recall on hand-made matrices, then end to end on the tiny model.

The end-to-end runs go through ``pipelines.evaluate.main`` on a Karpathy-format file (what BLIP
and ALBEF publish for COCO/Flickr30K) and on the demo catalog's held-out queries.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_ops.evaluate import rank_positives, recall_vs_k_test, retrieval_metrics
from blip_ops.rerank import combine_scores
from pipelines import evaluate
from pipelines.evaluation.data import EvalInputError
from pipelines.evaluation.karpathy import pre_caption
from tests.conftest import draw_product

LOCAL_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "local.yaml")


# --------------------------------------------------------------------------- hand-made matrices


def _dense_scorer(itm: np.ndarray):
    return lambda q, cands: itm[q, cands]


def test_text_to_product_recall_from_known_ranks():
    # 4 texts x 3 products; the true product of text t is text_product[t].
    sims = np.array(
        [
            [0.9, 0.1, 0.0],  # text 0 -> product 0 at rank 0
            [0.9, 0.8, 0.0],  # text 1 -> product 1 at rank 1
            [0.5, 0.6, 0.1],  # text 2 -> product 2 at rank 2
            [0.2, 0.3, 0.4],  # text 3 -> product 0 at rank 2
        ]
    )
    text_product = np.array([0, 1, 2, 0])
    ranks = rank_positives(sims, text_product, np.arange(3))
    assert ranks.itc.tolist() == [0, 1, 2, 2]
    m = retrieval_metrics(sims, text_product, recall_at=(1, 2, 3))
    assert m["itc"]["text_to_product"] == {"R@1": 0.25, "R@2": 0.5, "R@3": 1.0}


def test_product_to_text_hit_when_any_of_its_texts_is_in_top_k():
    # Product 0 owns texts 0 and 3, product 1 owns text 1, product 2 owns text 2.
    sims = np.array(
        [
            [0.1, 0.9, 0.2],  # text 0
            [0.8, 0.2, 0.3],  # text 1
            [0.7, 0.1, 0.6],  # text 2
            [0.6, 0.0, 0.1],  # text 3
        ]
    )
    text_product = np.array([0, 1, 2, 0])
    # Product 0's texts by cosine: t1 .8, t2 .7, t3 .6, t0 .1 -> its best text (t3) at rank 2.
    # Product 1: t0 .9 first -> its text t1 (.2) at rank 1. Product 2: t2 .6 at rank 0.
    ranks = rank_positives(sims.T, np.arange(3), text_product)
    assert ranks.itc.tolist() == [2, 1, 0]
    m = retrieval_metrics(sims, text_product, recall_at=(1, 2, 3))
    assert m["itc"]["product_to_text"] == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0})
    assert m["counts"] == {"texts": 4, "products_with_texts": 3, "products": 3}


def test_products_without_texts_are_candidates_but_not_queries():
    sims = np.array([[0.2, 0.9, 0.1], [0.3, 0.1, 0.9]])  # product 1 has no text
    m = retrieval_metrics(sims, np.array([0, 2]), recall_at=(1, 2))
    assert m["counts"]["products_with_texts"] == 2
    assert m["itc"]["text_to_product"] == {"R@1": 0.5, "R@2": 1.0}  # product 1 still distracts
    # Product 0 sees text 1 (.3) above its own text 0 (.2); product 2 finds text 1 first.
    assert m["itc"]["product_to_text"] == {"R@1": 0.5, "R@2": 1.0}


def _reference_rank(sims_row, itm_row, positive, k):
    """The service's rule applied to the whole candidate list, as the search API does."""
    ann = np.argsort(-sims_row, kind="stable")
    order = ann[combine_scores(sims_row[ann], itm_row[ann[:k]]).order]
    return int(np.flatnonzero(positive[order])[0]) if positive.any() else len(order)


def test_rerank_equals_the_service_rule_and_moves_ranks_only_within_the_head():
    rng = np.random.default_rng(0)
    n_t, n_p = 60, 25
    sims = rng.uniform(-1, 1, (n_t, n_p)).astype(np.float32)
    itm = rng.normal(0, 3, (n_t, n_p)).astype(np.float32)
    text_product = rng.integers(0, n_p, n_t)
    ks = (1, 3, 8, 25, 40)
    ranks = rank_positives(sims, text_product, np.arange(n_p), k_test=ks, itm=_dense_scorer(itm))
    for k in ks:
        kk = min(k, n_p)
        for q in range(n_t):
            positive = np.arange(n_p) == text_product[q]
            assert ranks.itm[k][q] == _reference_rank(sims[q], itm[q], positive, kk)
            if ranks.itc[q] >= kk:  # outside the head: untouched
                assert ranks.itm[k][q] == ranks.itc[q]
            else:  # inside the head: stays inside it
                assert ranks.itm[k][q] < kk
    assert (ranks.itm[1] == ranks.itc).all()  # one re-ranked candidate cannot change first place
    assert (ranks.itm[40] == ranks.itm[25]).all()  # k beyond the pool = the whole pool
    # A full re-rank orders by ITM + cosine over every product.
    full = np.argsort(-(itm + sims), axis=1, kind="stable")
    expected = [int(np.flatnonzero(full[q] == text_product[q])[0]) for q in range(n_t)]
    assert ranks.itm[25].tolist() == expected


def test_rerank_can_lift_a_positive_to_first_place_inside_the_head_only():
    sims = np.array([[0.9, 0.8, 0.7, 0.6]])  # cosine order 0, 1, 2, 3
    itm = np.array([[0.0, 0.0, 5.0, 9.0]])  # ITM loves products 2 and 3
    for target, k, expected in [(2, 2, 2), (2, 3, 0), (3, 3, 3), (3, 4, 0)]:
        r = rank_positives(
            sims, np.array([target]), np.arange(4), k_test=[k], itm=_dense_scorer(itm)
        )
        assert r.itm[k][0] == expected, (target, k)


def test_p2t_rerank_with_several_texts_per_product_and_languages():
    rng = np.random.default_rng(1)
    n_p = 10
    text_product = np.repeat(np.arange(n_p), 3)  # 3 texts per product
    languages = ["en", "zh", "pinyin"] * n_p
    sims = rng.uniform(-1, 1, (len(text_product), n_p)).astype(np.float32)
    itm = rng.normal(0, 2, sims.shape).astype(np.float32)  # (T, P) logit of each pair
    calls = []

    def p2t(p, texts):
        calls.append(len(texts))
        return itm[texts, p]

    m = retrieval_metrics(
        sims, text_product, k_test=[1, 5, 30], itm_t2p=_dense_scorer(itm), itm_p2t=p2t,
        languages=languages,
    )  # fmt: skip
    # Reference for product -> text over all texts, and per language over that language's texts.
    for pool_lang in (None, "en", "zh", "pinyin"):
        pool = np.array([i for i, lang in enumerate(languages) if pool_lang in (None, lang)])
        for k in (1, 5, 30):
            ranks = [
                _reference_rank(
                    sims[pool, p], itm[pool, p], text_product[pool] == p, min(k, len(pool))
                )
                for p in range(n_p)
            ]
            got = (m if pool_lang is None else m["by_lang"][pool_lang])["itm"][str(k)]
            assert got["product_to_text"]["R@1"] == pytest.approx(np.mean(np.array(ranks) < 1))
            assert got["product_to_text"]["R@5"] == pytest.approx(np.mean(np.array(ranks) < 5))
    assert set(m["by_lang"]) == {"en", "zh", "pinyin"}
    assert m["by_lang"]["zh"]["counts"] == {"texts": n_p, "products_with_texts": n_p}
    for block in [m, *m["by_lang"].values()]:
        assert block["itm"]["1"]["text_to_product"]["R@1"] == block["itc"]["text_to_product"]["R@1"]
        assert block["itm"]["1"]["product_to_text"]["R@1"] == block["itc"]["product_to_text"]["R@1"]
    # Per-language pools reuse the pairs scored for the whole pool: at most T x P pairs in all.
    assert sum(calls) <= sims.size
    series = recall_vs_k_test(m)
    assert series["k_test"] == [1, 5, 30]
    assert series["text_to_product"]["R@1"][0] == m["itc"]["text_to_product"]["R@1"]
    assert len(series["mean"]) == 3


def test_bad_inputs_raise_with_context():
    sims = np.zeros((2, 3))
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(sims, np.array([0, 5]))
    with pytest.raises(ValueError, match="itm_t2p and itm_p2t"):
        retrieval_metrics(sims, np.array([0, 1]), k_test=[2])
    with pytest.raises(ValueError, match="returned"):
        rank_positives(sims, np.array([0, 1]), np.arange(3), k_test=[2], itm=lambda q, c: [1.0])


# --------------------------------------------------------------------------- end to end


def _check_recalls(fig: dict) -> None:
    for direction in ("text_to_product", "product_to_text"):
        r = fig[direction]
        assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1.0, (direction, r)


def _check_outputs(results: dict, out: Path) -> None:
    assert out.is_file()
    assert results["outputs"]["json"] == str(out)
    md = Path(results["outputs"]["markdown"])
    assert md == out.with_suffix(".md") and "| ITC |" in md.read_text()
    plot = Path(results["outputs"]["plot"])
    assert plot.name.endswith("recall_vs_k_test.png")
    with Image.open(plot) as im:
        assert im.size == (900, 560)
        assert len(im.convert("RGB").getcolors(maxcolors=100_000)) > 3  # not a blank canvas
    assert Path(results["outputs"]["config"]).is_file()


def test_karpathy_file_end_to_end(tiny_model_dir, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "val2014").mkdir(parents=True)
    entries = []
    for i in range(5):
        name = f"val2014/img_{i}.jpg"
        draw_product(i).save(images / name, "JPEG", quality=90)
        entries.append({"image": name, "caption": [f"A Photo: of thing #{i}.", f"object {i}"]})
    annotation = tmp_path / "test.json"
    annotation.write_text(json.dumps(entries))
    out = tmp_path / "res" / "results.json"
    rc = evaluate.main(
        [
            "--config", LOCAL_CONFIG, f"model.name_or_path={tiny_model_dir}",
            "--karpathy", str(annotation), "--images", str(images),
            "--out", str(out), "--k-test", "1", "4", "64",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    results = json.loads(out.read_text())
    _check_outputs(results, out)
    m = results["metrics"]
    assert results["k_test"] == [1, 4, 10]  # 64 clipped to the largest pool (10 captions)
    assert results["inputs"]["kind"] == "karpathy" and results["inputs"]["pre_caption"]
    assert results["model_id"].startswith("hf_blip-")
    assert m["counts"] == {"texts": 10, "products_with_texts": 5, "products": 5}
    assert "by_lang" not in m
    for fig in [m["itc"], *m["itm"].values()]:
        _check_recalls(fig)
        # 5 images and 10 captions: every positive is within the first 10.
        assert fig["text_to_product"]["R@10"] == 1.0
        assert fig["product_to_text"]["R@10"] == 1.0
    assert m["itm"]["1"]["text_to_product"]["R@1"] == m["itc"]["text_to_product"]["R@1"]
    assert m["itm"]["1"]["product_to_text"]["R@1"] == m["itc"]["product_to_text"]["R@1"]
    assert "ITC→ITM k_test=10" in printed and "text→product" in printed


def test_pre_caption_is_blips():
    assert pre_caption("A Dog (brown)  runs: fast!\n") == "a dog brown runs fast"
    assert pre_caption(" ".join(["w"] * 40)).count("w") == 30


@pytest.fixture(scope="module")
def demo_catalog(tmp_path_factory):
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("eval_catalog") / "catalog"
    manifest = make_catalog(str(root), 40, seed=0, workers=1)
    return root, manifest


def test_demo_catalog_end_to_end(tiny_model_dir, demo_catalog, tmp_path, capsys):
    root, manifest = demo_catalog
    out = tmp_path / "eval.json"
    rc = evaluate.main(
        [
            "--config", LOCAL_CONFIG, f"model.name_or_path={tiny_model_dir}",
            "--catalog", str(root), "--out", str(out), "--k-test", "1", "4", "256",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results = json.loads(out.read_text())
    _check_outputs(results, out)
    m = results["metrics"]
    n_test = manifest["splits"]["test"]
    assert m["counts"] == {"texts": 3 * n_test, "products_with_texts": n_test, "products": n_test}
    assert results["k_test"] == [1, 4, 3 * n_test]
    assert set(m["by_lang"]) == {"en", "zh", "pinyin"}
    for block in [m, *m["by_lang"].values()]:
        for fig in [block["itc"], *block["itm"].values()]:
            _check_recalls(fig)
        # The rule cannot move the first place when only one candidate is re-ranked.
        for d in ("text_to_product", "product_to_text"):
            assert block["itm"]["1"][d]["R@1"] == block["itc"][d]["R@1"]
    assert m["by_lang"]["en"]["counts"] == {"texts": n_test, "products_with_texts": n_test}
    for lang in ("en", "zh", "pinyin"):
        assert f"  {lang}" in printed
    print(printed)  # the summary, for the record (pytest -s)

    # benchmarks/compare_evals.py turns such files into docs/results.md's tables and chart.
    import subprocess
    import sys

    compare = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_evals.py"
    run = subprocess.run(
        [sys.executable, str(compare), f"a={out}", f"b={out}", "--k-test", "4",
         "--plot", str(tmp_path / "cmp.png")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    itc = m["itc"]["text_to_product"]
    row = f"| a | ITC | {100 * itc['R@1']:.1f} / {100 * itc['R@5']:.1f} / {100 * itc['R@10']:.1f} |"
    assert row in run.stdout and "| b | ITC→ITM k_test 4 |" in run.stdout
    assert Image.open(tmp_path / "cmp.png").size == (1000, 520)
    bad = subprocess.run(
        [sys.executable, str(compare), f"a={out}", "--k-test", "7"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "no ITC→ITM figures at k_test 7" in bad.stderr

    # The ITC→ITM figures are the search service's rerank() applied to every query.
    from blip_ops import load_model, rerank
    from pipelines.config import load_config
    from pipelines.evaluation.catalog import load_catalog

    cfg = load_config(LOCAL_CONFIG, [f"model.name_or_path={tiny_model_dir}"])
    model = load_model(tiny_model_dir, **cfg.model.query_load_args())  # as evaluate loads it
    data = load_catalog(str(root), "test", cfg, target_size=model.image_settings.size)
    pixels = model.preprocess([data.images[i] for i in range(len(data.images))])
    image_emb = model.encode_images(pixels).embeddings.numpy()
    sims = model.encode_texts(data.texts).numpy() @ image_emb.T
    for k in (4,):  # a partial head; the whole-pool case is checked on hand-made numbers
        ranks = []
        for q, text in enumerate(data.texts):
            ann = np.argsort(-sims[q], kind="stable")
            ranked = rerank(model, text, sims[q][ann], images=pixels[ann], rerank_k=k)
            ranks.append(int(np.flatnonzero(ann[ranked.order] == data.text_product[q])[0]))
        expected = {f"R@{r}": float(np.mean(np.array(ranks) < r)) for r in (1, 5, 10)}
        assert m["itm"][str(k)]["text_to_product"] == pytest.approx(expected)


def test_missing_inputs_exit_2_with_a_clear_message(tiny_model_dir, tmp_path, capsys):
    base = [
        "--config",
        LOCAL_CONFIG,
        f"model.name_or_path={tiny_model_dir}",
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert (
        evaluate.main([*base, "--karpathy", str(tmp_path / "nope.json"), "--images", str(tmp_path)])
        == 2
    )
    assert "nope.json does not exist" in capsys.readouterr().err
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "a/b.jpg", "caption": ["x"]}]))
    assert (
        evaluate.main([*base, "--karpathy", str(tmp_path / "ann.json"), "--images", str(tmp_path)])
        == 2
    )
    assert "1 of 1 images" in capsys.readouterr().err
    assert evaluate.main([*base, "--karpathy", str(tmp_path / "ann.json")]) == 2
    assert "--images" in capsys.readouterr().err
    assert evaluate.main([*base, "--catalog", str(tmp_path / "empty")]) == 2
    assert "empty not found" in capsys.readouterr().err


def test_titles_over_the_train_split_are_the_products_own_titles(tiny_model_dir, demo_catalog):
    """--texts titles --split train: each train product's English, 汉字 and pinyin titles (the
    memorisation check of a fine-tune), never a test product's."""
    import pyarrow.parquet as pq

    from pipelines.config import load_config
    from pipelines.evaluation.catalog import load_catalog

    root, manifest = demo_catalog
    cfg = load_config(LOCAL_CONFIG, [f"model.name_or_path={tiny_model_dir}"])
    data = load_catalog(str(root), "train", cfg, target_size=64, texts="titles")
    pairs = {r["product_id"]: r for r in pq.read_table(root / "pairs.parquet").to_pylist()}
    n_train = manifest["splits"]["train"]
    assert len(data.product_ids) == n_train and len(data.texts) == 3 * n_train
    assert data.inputs["texts"] == "titles" and data.inputs["split"] == "train"
    column = {"en": "title_en", "zh": "title_zh", "pinyin": "title_pinyin"}
    for text, product, lang in zip(data.texts, data.text_product, data.languages, strict=True):
        row = pairs[data.product_ids[product]]
        assert row["split"] == "train"
        assert text == row[column[lang]]
    with pytest.raises(EvalInputError, match="texts must be one of"):
        load_catalog(str(root), "train", cfg, target_size=64, texts="captions")
