"""The demo end to end on the tiny model and a generated catalog: what `make demo` prints, checked."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import demo
from pipelines.config import load_config

LOCAL_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "local.yaml")


def _args(tiny_model_dir, tmp_path, *extra):
    return [
        "--config",
        LOCAL_CONFIG,
        f"model.name_or_path={tiny_model_dir}",
        f"output.dir={tmp_path / 'out'}",
        f"source.uri={tmp_path / 'catalog' / 'products'}",
        "--products",
        "40",
        *extra,
    ]


def test_demo_generates_catalog_ranks_queries_and_writes_outputs(tiny_model_dir, tmp_path, capsys):
    assert demo.main(_args(tiny_model_dir, tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "generating the demo catalog (40 products" in printed
    summary = json.loads((tmp_path / "out" / "demo" / "demo_results.json").read_text())
    manifest = json.loads((tmp_path / "catalog" / "manifest.json").read_text())
    assert summary["products_searched"] == manifest["splits"]["test"]
    assert summary["queries"] == 3 * manifest["splits"]["test"]
    samples = summary["samples"]
    assert {q["lang"] for q in samples} == {"en", "zh", "pinyin"}
    for q in samples:
        rows = q["results"]
        assert 1 <= q["expected_rank"] <= summary["products_searched"]
        assert (
            len({r["product_id"] for r in rows})
            == len(rows)
            == min(5, summary["products_searched"])
        )
        reranked = [r["score"] for r in rows if r["itm_score"] is not None]
        assert reranked == sorted(reranked, reverse=True)
        assert f"query [{q['lang']}] {q['query']!r}" in printed
    # A 汉字 query and its pinyin normalise to the same text, so they rank identically.
    by = {(q["expected"], q["lang"]): q for q in samples}
    for pid in {q["expected"] for q in samples}:
        assert by[pid, "zh"]["normalised"] == by[pid, "pinyin"]["normalised"].lower()
        assert by[pid, "zh"]["results"] == by[pid, "pinyin"]["results"]
    for lang, rec in summary["recall_itc"].items():
        assert 0.0 <= rec["R@1"] <= rec["R@5"] <= rec["R@10"] <= 1.0, lang
    resolved = load_config(tmp_path / "out" / "demo" / "config.resolved.yaml")
    assert resolved.model.name_or_path == str(tiny_model_dir)
    # A second run reuses the catalog instead of generating it again.
    assert demo.main(_args(tiny_model_dir, tmp_path)) == 0
    assert "generating the demo catalog" not in capsys.readouterr().out


def test_demo_unreachable_model_exits_2_with_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = demo.main(
        [
            "--config",
            LOCAL_CONFIG,
            "--model",
            "Salesforce/blip-itm-base-coco",
            f"output.dir={tmp_path}",
        ]
    )
    assert rc == 2
    assert "model.name_or_path" in capsys.readouterr().err


def test_demo_refuses_a_source_it_cannot_generate(tiny_model_dir, tmp_path, capsys):
    rc = demo.main(
        [
            "--config",
            LOCAL_CONFIG,
            f"model.name_or_path={tiny_model_dir}",
            "source.uri=s3://bucket/cat",
        ]
    )
    assert rc == 2
    assert "ending in /products" in capsys.readouterr().err


def test_demo_bad_config_exits_2_naming_the_key(capsys):
    assert demo.main(["--config", LOCAL_CONFIG, "encode.batchsize=3"]) == 2
    err = capsys.readouterr().err
    assert "encode.batchsize" in err and "did you mean 'encode.batch_size'" in err
