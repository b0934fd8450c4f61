"""`make demo` end to end, as a user runs it: a subprocess with its own Ray builds the catalog,
fine-tunes the compact pretrained model, runs the index job, starts the search service, answers
sample queries over HTTP and serves until SIGTERM (what `make demo-stop` sends)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory):
    from blip_ops.compact_model import CompactBlipModel

    return CompactBlipModel.build(seed=0).save(tmp_path_factory.mktemp("demo_models") / "compact")


def _overrides(tmp_path: Path, model: Path) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"source.uri={tmp_path / 'catalog' / 'products'}",
        f"index.uri={tmp_path / 'lancedb'}",
        f"finetune.catalog={tmp_path / 'catalog'}",
        f"finetune.out_dir={tmp_path / 'finetune'}",
        f"output.dir={tmp_path / 'out'}",
        "finetune.steps=2", "finetune.batch_size=4", "finetune.eval_every=0",
        "finetune.eval_k_test=4", "demo.products=40", "demo.seed=1", "serve.port=0",
        "serve.candidates=20", "serve.rerank_k=8",
    ]  # fmt: skip


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    proc.kill()
    raise AssertionError(f"no {marker!r} within {timeout}s; output:\n" + "\n".join(lines))


@pytest.mark.timeout(420)
def test_make_demo_end_to_end_and_stop(compact_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pipelines.demo", "--config", DEMO_CONFIG,
           *_overrides(tmp_path, compact_dir)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = _read_until(proc, "serving until Ctrl-C", timeout=360)
        printed = "\n".join(lines)
        assert "generating the demo catalog (40 products" in printed
        assert "fine-tuning" in printed and "2 steps" in printed
        page = next(ln for ln in lines if ln.startswith("search page: "))
        url = page.split()[2].rstrip("/")

        summary = json.loads((tmp_path / "out" / "demo" / "demo_summary.json").read_text())
        assert summary["url"] == url
        assert summary["model"] == str(tmp_path / "finetune" / "best")
        assert summary["index"]["in"] == 40 and summary["index"]["indexed"] == 40
        # Sample queries: 2 held-out products x 3 languages, each answered by the service.
        samples = summary["samples"]
        assert len(samples) == 6 and {s["lang"] for s in samples} == {"en", "zh", "pinyin"}
        for s in samples:
            assert f"[{s['lang']}] {s['query']!r}" in printed
            # every hit says whether it is relevant (kind and named attributes match)
            assert s["relevant"] and all(isinstance(r, bool) for r in s["relevant"])
            if s["rank"] is not None:  # the labelled product is always relevant to its query
                assert s["relevant"][s["rank"] - 1] is True
        assert "hits relevant" in printed
        assert set(summary["seconds"]) >= {"catalog", "fine-tune", "index", "serve", "total"}

        # The service the demo started is real: the page, health, and a search over HTTP.
        assert httpx.get(url + "/", timeout=10).status_code == 200
        health = httpx.get(url + "/healthz", timeout=10).json()
        assert health["rows"] == 40 and health["model_id"].startswith("compact_blip-")
        found = httpx.post(url + "/search", json={"text": samples[0]["query"], "k": 3}, timeout=30)
        assert found.status_code == 200 and len(found.json()["results"]) == 3

        # `make demo-stop`: SIGTERM to the pid the demo wrote; it shuts down and removes the file.
        pid_file = tmp_path / "out" / "demo" / "demo.pid"
        assert int(pid_file.read_text()) == proc.pid
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()

    # A second demo reuses the fine-tuned model: same catalog, base model and settings.
    from pipelines.config import load_config
    from pipelines.training.cached import finetuned_model

    cfg = load_config(DEMO_CONFIG, _overrides(tmp_path, compact_dir))
    path, info = finetuned_model(cfg, tmp_path / "catalog")
    assert info["cached"] is True and path == str(tmp_path / "finetune" / "best")
    changed = cfg.model_copy(
        update={"finetune": cfg.finetune.model_copy(update={"negatives": "random"})}
    )
    from pipelines.training.cached import cache_key

    assert cache_key(changed, tmp_path / "catalog", "x") != cache_key(
        cfg, tmp_path / "catalog", "x"
    )


def test_demo_refuses_a_source_it_cannot_generate(tmp_path, capsys):
    from pipelines import demo

    rc = demo.main(["--config", DEMO_CONFIG, "source.uri=s3://bucket/products", "--no-wait"])
    assert rc == 2
    assert "local source.uri ending in /products" in capsys.readouterr().err
