"""benchmarks/model_throughput.py on the tiny model: figures, both attentions, JSON output, errors,
imports; the random-model factory it shares with gpu_check.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.model_throughput import FIGURES, format_report, main, run_bench
from blip_ops.tiny_model import make_random_model, make_tiny_model, synthetic_titles

QUICK = ["--batch-size", "2", "3", "--warmup", "1", "--iters", "1", "--itm-candidates", "5"]
REPO = Path(__file__).resolve().parents[1]


def _assert_figures(rows):
    assert rows
    for row in rows:
        assert "error" not in row, row.get("error")
        for key in FIGURES:
            value = row[key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)


def test_run_bench_tiny_both_attentions():
    rows = run_bench("tiny", batch_sizes=[2, 3], device="cpu", attention="both", warmup=1, iters=1, itm_candidates=5)
    _assert_figures(rows)
    assert [(r["attention"], r["batch_size"]) for r in rows] == [("eager", 2), ("eager", 3), ("sdpa", 2), ("sdpa", 3)]
    r = rows[0]
    assert (r["model"], r["device"], r["dtype"], r["image_size"], r["itm_candidates"]) == ("tiny", "cpu", "float32", 64, 5)
    assert r["image_tokens"] == 65 and r["gflop_per_image"] > 0 and r["peak_share"] is None  # CPU: no share of the H200
    report = format_report(rows)
    assert "preprocessing and decoding excluded" in report and "eager" in report and "sdpa" in report


def test_main_checkpoint_dir_writes_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench" / "rows.json"
    assert main(["--model", str(tiny_model_dir), "--device", "cpu", "--attention", "both", *QUICK, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    _assert_figures(rows)
    assert {(r["attention"], r["batch_size"]) for r in rows} == {(a, b) for a in ("eager", "sdpa") for b in (2, 3)}
    assert all(r["model"] == str(tiny_model_dir) and r["random_weights"] is False for r in rows)
    table = capsys.readouterr().out
    assert "images/s" in table and "ITM pairs/s" in table and "torch" in table
    # One table line per JSON row, in the same order.
    lines = [ln.split() for ln in table.splitlines() if ln.startswith(("eager ", "sdpa "))]
    assert [(ln[0], int(ln[1])) for ln in lines] == [(r["attention"], r["batch_size"]) for r in rows]


def test_main_tiny_default_attention(capsys):
    assert main(["--model", "tiny", "--device", "cpu", "--batch-size", "2", "--warmup", "0", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "sdpa" in out and "\neager " not in out


def test_run_bench_on_a_loaded_model_restores_its_attention(tiny_model):
    rows = run_bench(tiny_model, batch_sizes=[2], attention="eager", warmup=0, iters=1, itm_candidates=3)
    _assert_figures(rows)
    assert rows[0]["attention"] == "eager" and tiny_model.attention == "sdpa"
    attn = tiny_model.model.vision_model.encoder.layers[0].self_attn
    assert "forward" in attn.__dict__  # the SDPA patch is back


@pytest.mark.parametrize("bad", ["no-such-model", "blip-huge"])
def test_bad_model_exits_2_naming_it(bad, capsys):
    assert main(["--model", bad, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert repr(bad) in err and "blip-base" in err


def test_bad_settings_exit_2(capsys):
    assert main(["--model", "tiny", "--device", "cpu", "--compile"]) == 2
    assert "CUDA only" in capsys.readouterr().err
    assert main(["--model", "tiny", "--device", "cpu", "--image-size", "60"]) == 2
    assert "60" in capsys.readouterr().err
    assert main(["--model", "tiny", "--device", "cpu", "--batch-size", "0"]) == 2
    assert "got 0" in capsys.readouterr().err


def test_synthetic_titles_are_ascii_and_seeded():
    titles = synthetic_titles(50, seed=1)
    assert titles == synthetic_titles(50, seed=1) and len(set(titles)) > 40
    assert all(t.isascii() and 5 <= len(t.split()) <= 20 for t in titles)


def test_random_model_factory_names_and_sizes():
    tiny = make_random_model("tiny", seed=0)
    assert tiny.model_id == make_tiny_model(seed=0).model_id  # one factory, the same weights
    assert (tiny.device.type, tiny.image_settings.size) == ("cpu", 64)
    with pytest.raises(ValueError, match="patch size 8, got 60"):
        make_random_model("tiny", image_size=60)
    with pytest.raises(ValueError, match="'blip-huge'"):
        make_random_model("blip-huge")


def test_import_pulls_in_no_pipeline_dependencies():
    code = (
        "import sys, benchmarks.model_throughput, blip_ops.tiny_model; "
        "bad = [m for m in ('ray', 'pydantic', 'yaml', 'pypinyin', 'lancedb', 'pyarrow') "
        "if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_check_smoke_runs_every_section_without_ray_or_lancedb(tmp_path):
    """benchmarks/gpu_check.py --smoke: every code path of the GPU check once on the CPU (CUDA-only
    rows say 'skipped'), one JSON, and none of the modules the GPU machine lacks imported."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["section"] for r in rows} >= {"encode", "text", "itm", "decode", "graphs", "imports"}
    for r in rows:
        if r["section"] == "imports":
            assert r["note"].startswith("ok"), r
        elif r["value"] is None:
            assert "skipped" in r["note"], r
        else:
            assert math.isfinite(r["value"]) and r["value"] > 0, r
    assert report["machine"] and report["command"] and report["date"]


def test_gpu_check_records_nvml_facts_from_the_gpu_extra(monkeypatch):
    """gpu_check's NVML facts (the ``[gpu]`` extra): read through pynvml when it is installed, a
    note saying how to install it when not. A stand-in pynvml: this machine has no GPU."""
    import importlib
    import types

    import torch

    tomllib = importlib.import_module("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("nvidia-ml-py") for req in extras["gpu"])
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        gpu_check = importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert "pip install -e '.[gpu]'" in gpu_check.nvml_facts(torch.device("cuda", 0))["note"]

    fake = types.SimpleNamespace(
        NVMLError=RuntimeError, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}", nvmlSystemGetDriverVersion=lambda: "580.1",
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetMaxClockInfo=lambda h, kind: {1: 1980, 2: 2619}[kind],
        nvmlDeviceGetMigMode=lambda h: (0, 0),
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = gpu_check.nvml_facts(torch.device("cuda", 0))
    assert facts == {"driver": "580.1", "power_limit_w": 700.0, "sm_clock_max_mhz": 1980,
                     "mem_clock_max_mhz": 2619, "mig_mode": 0}  # fmt: skip
