"""`make demo` end to end, as a user runs it: a subprocess with its own Ray builds the catalog,
fine-tunes the compact pretrained model, runs the index job, starts the search service, answers
sample queries over HTTP and serves until SIGTERM (what `make demo-stop` sends)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "demo.yaml")
# Set in every demo's environment, which Ray's processes inherit (its workers rename their command
# lines, not their environments): a process that still has it after the demo exited was left behind.
RUN_MARKER = "BLIP_DEMO_TEST_RUN"
_COMPACT: dict[str, Path] = {}


def compact_model(tmp_path_factory) -> Path:
    """The compact pretrained model, built once per test session for every demo test (~6 s)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _COMPACT:
        from blip_ops.compact_model import CompactBlipModel

        _COMPACT[key] = CompactBlipModel.build(seed=0).save(
            tmp_path_factory.mktemp("demo_models") / "compact"
        )
    return _COMPACT[key]


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory):
    return compact_model(tmp_path_factory)


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


class Demo:
    """``python -m pipelines.demo`` in a subprocess with its own local Ray (in a temporary folder
    of its own) and a run marker in its environment; a thread reads its output line by line."""

    def __init__(self, overrides: list[str]) -> None:
        # Short, not under tmp_path: Ray's socket paths in it must fit in 107 bytes.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="bdemo"))
        self.token = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
        env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        env.update({"RAY_TMPDIR": str(self.ray_tmp), RUN_MARKER: self.token})
        cmd = [sys.executable, "-m", "pipelines.demo", "--config", DEMO_CONFIG, *overrides]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)  # end of output

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, marker: str, timeout: float) -> None:
        """Until a line with ``marker`` (the start of a step) is printed."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"the demo exited before {marker!r}:\n{self.output}")
            if marker in line:
                return
        raise AssertionError(f"no {marker!r} within {timeout}s; output:\n{self.output}")

    def leftovers(self, settle_s: float = 10.0) -> list[str]:
        """The demo's processes still there ``settle_s`` after it exited (Ray's workers go
        shortly after their raylet): by the run marker, or Ray's temp folder in the command."""
        deadline = time.monotonic() + settle_s
        while (found := _marked_processes(self.token, self.ray_tmp)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        return [f"{pid} {cmd[:150]}" for pid, cmd in found]

    def close(self) -> None:
        """Kill what is left (a failed test must not leave Ray running) and the temp folder."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for pid, _ in _marked_processes(self.token, self.ray_tmp):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _marked_processes(token: str, ray_tmp: Path) -> list[tuple[int, str]]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, waiting for its parent: nothing left running
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if f"{RUN_MARKER}={token}".encode() in env or str(ray_tmp) in cmd:
            found.append((int(proc.name), cmd))
    return found


def demo_stop(overrides: list[str]) -> subprocess.CompletedProcess:
    """`make demo-stop` with the demo's overrides (they name its output.dir, so its pid file)."""
    args = " ".join(o for o in overrides if o.startswith("output.dir="))
    if shutil.which("make") is None:  # the command the target runs
        cmd = [sys.executable, "-m", "pipelines.demo", "--stop", "--config", DEMO_CONFIG, args]
    else:
        cmd = ["make", "-s", "demo-stop", f"PY={sys.executable}", f"DEMO_ARGS={args}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)


@pytest.mark.timeout(420)
def test_make_demo_end_to_end_and_stop(compact_dir, tmp_path):
    overrides = _overrides(tmp_path, compact_dir)
    demo = Demo(overrides)
    try:
        demo.wait_for("serving until Ctrl-C", timeout=360)
        lines, printed = demo.lines, demo.output
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

        # `make demo-stop`: SIGTERM to the pid the demo wrote, and it waits until the demo shut
        # down: Serve and Ray gone, the pid file removed, exit 0 (serving is how a demo ends).
        pid_file = tmp_path / "out" / "demo" / "demo.pid"
        assert int(pid_file.read_text()) == demo.proc.pid
        stop = demo_stop(overrides)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert f"sent SIGTERM to the demo (pid {demo.proc.pid})" in stop.stdout
        assert demo.proc.wait(timeout=30) == 0
        assert "demo stopped (SIGTERM while serving; exit 0)" in demo.output
        assert not pid_file.exists()
        assert demo.leftovers() == []
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/healthz", timeout=5)
    finally:
        demo.close()

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
