"""The quality benchmark end to end on a small catalog, the val-only weight sweep, and the
generated tables of docs/results.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality_report import BEGIN, END, targets_table, write_results_md  # noqa: E402


def test_weight_sweep_reads_val_only_and_weight_zero_is_itc(tiny_model, tmp_path):
    from pipelines.catalog.writer import make_catalog
    from pipelines.config import load_config
    from pipelines.evaluation.catalog import load_catalog
    from pipelines.quality.selection import sweep_itm_weight

    root = tmp_path / "catalog"
    make_catalog(str(root), 60, seed=1, workers=1)
    cfg = load_config(None)
    out = sweep_itm_weight(tiny_model, str(root), cfg, weights=(0.0, 1.0, 50.0), k_test=4)
    assert out["split"] == "val" and set(out["r1"]) == {0.0, 1.0, 50.0}
    assert out["best"] in out["r1"] and out["r1"][out["best"]] == max(out["r1"].values())
    # weight 0 re-ranks nothing: it is ITC's own R@1 on the val titles
    from blip_ops.evaluate import embed_images, embed_texts

    data = load_catalog(str(root), "val", cfg, target_size=tiny_model.image_settings.size, texts="titles")
    sims = embed_texts(tiny_model, data.texts) @ embed_images(tiny_model, data.images).T
    hit = sims.argmax(axis=1) == np.asarray(data.text_product)
    langs = np.asarray(data.languages)
    itc = np.mean([hit[langs == g].mean() for g in dict.fromkeys(data.languages)])
    assert out["r1"][0.0] == pytest.approx(itc)
    with pytest.raises(ValueError, match="never test"):
        sweep_itm_weight(tiny_model, str(root), cfg, split="test")


def _summary(v):
    return {"value": v, "ci": [max(0.0, v - 0.05), min(1.0, v + 0.05)], "n": 100}


def _task_a(itc, itm):
    fig = lambda v: {"text_to_product": {"R@1": _summary(v)}}  # noqa: E731
    delta = {"text_to_product": {"R@1": _summary(itm - itc)}}
    return {"itc": fig(itc), "itm": {"16": fig(itm)}, "itm_minus_itc": {"16": delta},
            "itc_r1": itc, "itm_r1": itm}  # fmt: skip


def _result(itc, itm, twin_itm, auc):
    def row(itm_r1):
        return {
            "command": "python -m pipelines.finetune ...", "k_test": 16, "itm_weight": 0.2,
            "train": {"steps": 3}, "itm_auc_sibling": auc,
            "task_a": {g: _task_a(itc, itm_r1) for g in ("en", "zh", "pinyin")},
        }  # fmt: skip

    return {"settings": {"best": row(itm), "random": row(twin_itm)}, "best": "best",
            "random": "random", "products": 10, "seed": 0, "minutes": 1.0}  # fmt: skip


def test_targets_table_says_met_and_missed():
    met = "\n".join(targets_table(_result(0.70, 0.82, 0.75, 0.90)))
    assert "**no**" not in met and met.count("| yes |") == 4
    missed = "\n".join(targets_table(_result(0.70, 0.73, 0.72, 0.60)))
    # +3 ITM gain < 5, +1 over random < 3, AUC 0.6 < 0.85, English 73 < 80
    assert missed.count("**no**") == 4 and "+3.0" in missed


def test_results_page_keeps_its_prose_and_replaces_the_tables(tmp_path):
    page = tmp_path / "results.md"
    page.write_text(f"# Results\n\nhand-written intro\n\n{BEGIN}\nold table\n{END}\n\nafterword\n")
    write_results_md(_result(0.70, 0.82, 0.75, 0.90), page)
    text = page.read_text()
    assert "hand-written intro" in text and "afterword" in text and "old table" not in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and "### Targets" in text


@pytest.mark.timeout(900)
def test_bench_quality_end_to_end(tmp_path):
    """Catalog → two fine-tuned settings → val choice → test Tasks A/B, AUCs → index job →
    Task C → quality.json with the keys the issue names, and the tables."""
    import subprocess

    out = tmp_path / "q"
    page = tmp_path / "results.md"
    cmd = [
        sys.executable, "benchmarks/bench_quality.py", "--products", "60", "--seed", "1",
        "--steps", "2", "--settings", "random,family_swap", "--task-c", "best",
        "--work-dir", str(out), "--json", str(out / "quality.json"),
        "--results-md", str(page), "--plot", str(out / "quality.png"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    q = json.loads((out / "quality.json").read_text())
    assert q["products"] == 60 and q["seed"] == 1 and q["minutes"] > 0
    assert q["best"] == "family_swap" and q["random"] == "random"
    for name in ("random", "family_swap"):
        s = q["settings"][name]
        for lang in ("en", "zh", "pinyin"):
            a = s["task_a"][lang]
            assert 0 <= a["itc_r1"] <= 1 and 0 <= a["itm_r1"] <= 1
        assert set(s["itm_auc_sibling_by_attribute"]) == {"color", "pattern", "material", "brand"}
        assert "--config configs/quality.yaml" in s["command"]
        assert s["val"]["split"] == "val"
        assert str(s["itm_weight"]) in {str(w) for w in s["val"]["r1"]}
    c = q["settings"]["family_swap"]["task_c"]
    assert set(c) == {"en", "zh", "pinyin"} and all(0 <= c[g]["success_at_1"] <= 1 for g in c)
    text = page.read_text()
    assert BEGIN in text and "family_swap" in text and (out / "quality.png").stat().st_size > 0


def test_a_stopped_run_renders_with_best_chosen_on_val(tmp_path):
    from benchmarks.quality_report import complete_partial

    result = _result(0.70, 0.82, 0.75, 0.90)
    del result["best"], result["random"]
    result["settings"]["other"] = dict(result["settings"]["best"])
    result["settings"]["unfinished"] = {"command": "…", "train": {"steps": 1}}
    for name, r1 in (("best", 0.40), ("other", 0.45), ("random", 0.60)):
        result["settings"][name] = {**result["settings"][name], "val": {"r1": {"0.1": r1}, "best": 0.1}}
    done = complete_partial(result)
    assert done["best"] == "other" and done["random"] == "random"  # the twin is never "best"
    assert "unfinished" not in done["settings"] and done["partial"]
    page = tmp_path / "results.md"
    write_results_md(done, page)
    assert "Partial run" in page.read_text()
