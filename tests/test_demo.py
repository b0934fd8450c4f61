"""The demo end to end on the tiny model: what `make demo` prints, checked."""

from __future__ import annotations

import json
from pathlib import Path

from blip_ops.decode import decode_image
from pipelines import demo
from pipelines.config import load_config

LOCAL_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "local.yaml")


def test_demo_ranks_every_query_and_writes_outputs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = demo.main(
        [
            "--config",
            LOCAL_CONFIG,
            f"model.name_or_path={tiny_model_dir}",
            f"output.dir={out}",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo" / "demo_results.json").read_text())
    assert summary["products"] == len(demo.PRODUCTS)
    langs = {q["lang"] for q in summary["queries"]}
    assert langs == {"en", "zh", "pinyin"}
    by_query = {q["query"]: q for q in summary["queries"]}
    # 汉字 and its pinyin normalise to the same text, so they must rank identically.
    assert by_query["红色沙发"]["normalised"] == "hong se sha fa"
    assert by_query["红色沙发"]["results"] == by_query["hong se sha fa"]["results"]
    for q in summary["queries"]:
        rows = q["results"]
        assert len(rows) == 5 and len({r["product_id"] for r in rows}) == 5
        reranked = [r["score"] for r in rows if r["itm_score"] is not None]
        assert reranked == sorted(reranked, reverse=True)
        for r in rows:
            if r["itm_score"] is not None:
                assert abs(r["score"] - (r["itm_score"] + r["itc_score"])) < 2e-4
        assert f"query [{q['lang']}] {q['query']!r}" in printed
    resolved = load_config(out / "demo" / "config.resolved.yaml")
    assert resolved.model.name_or_path == str(tiny_model_dir)


def test_demo_catalog_is_deterministic_and_decodable():
    a, b = demo.demo_catalog(), demo.demo_catalog()
    assert [p.image for p in a] == [p.image for p in b]
    assert {p.title_lang for p in a} == {"en", "zh", "pinyin"}
    assert all(decode_image(p.image).size == (480, 480) for p in a)


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
