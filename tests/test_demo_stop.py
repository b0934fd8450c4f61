"""`make demo-stop` (SIGTERM) stops the demo in every step, promptly and cleanly: the demo exits
128 + 15 before it serves (0 once serving: tests/test_demo.py), its Ray and Serve processes are
gone and its pid file, written when it starts, is removed.

Each run starts a demo, waits for the line that starts a step and stops it there: making the
catalog, fine-tuning, indexing (the SIGTERM lands in ray.init) and printing the sample queries;
serving is tests/test_demo.py's end-to-end run. Starting the service is left out: it needs the
same ~25 s of indexing and serving as the samples' run, for the same code path. The runs share
one catalog (the first that needs it generates it), and all but the fine-tuning run skip
fine-tuning (``demo.finetune=false``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import demo as demo_module
from pipelines.runtime.stopping import claim_pid_file
from tests.test_demo import DEMO_CONFIG, ROOT, Demo, _overrides, compact_model, demo_stop

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="finds the demo's processes through /proc"
)

# A clean stop, from the signal to the exit, on 2 busy CPUs: shutting Ray down takes 2-5 s. The
# watchdog's forced exit (STOP_GRACE_S) comes later, and says so; the test asserts it did not.
STOP_BOUND_S = 15.0
SKIP_FINETUNE = "demo.finetune=false"

# (the step, the line that starts it, extra overrides, how the SIGTERM is sent). `make demo-stop`
# where the step lasts seconds; the SIGTERM itself (what the target sends) where the step may be
# over before make and Python have started.
STEPS = [
    pytest.param(demo_module.CATALOG, "generating the demo catalog", [], "kill", id="catalog"),
    pytest.param(demo_module.FINETUNE, "fine-tuning ", [], "make", id="fine-tuning"),
    # The SIGTERM lands while ray.init runs, which would put in a SIGTERM handler of its own.
    pytest.param(demo_module.INDEX, "indexing ", [SKIP_FINETUNE], "make", id="indexing"),
    # 6 held-out products x 3 languages: 18 queries, so the step outlasts the signal's way there.
    pytest.param(
        demo_module.SAMPLES,
        "sample queries to",
        [SKIP_FINETUNE, "demo.sample_products=6"],
        "kill",
        id="samples",
    ),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path]:
    """(the compact model, the folder whose catalog every run uses)."""
    return compact_model(tmp_path_factory), tmp_path_factory.mktemp("demo_stop_catalog")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("step", "starts", "extra", "send"), STEPS)
def test_sigterm_stops_the_demo_in_every_step(shared, tmp_path, step, starts, extra, send):
    model, catalog_dir = shared
    shared_catalog = [
        f"source.uri={catalog_dir / 'catalog' / 'products'}",
        f"finetune.catalog={catalog_dir / 'catalog'}",
    ]
    own_catalog = step == demo_module.CATALOG  # for it to be generating one
    overrides = [*_overrides(tmp_path, model), *([] if own_catalog else shared_catalog), *extra]
    demo = Demo(overrides)
    try:
        demo.wait_for(starts, timeout=150)
        pid_file = tmp_path / "out" / "demo" / "demo.pid"
        # Written when the demo starts, so `make demo-stop` finds it in any step.
        assert int(pid_file.read_text()) == demo.proc.pid
        sent = time.monotonic()
        if send == "make":
            stop = demo_stop(overrides)
            assert stop.returncode == 0, stop.stdout + stop.stderr
            assert f"sent SIGTERM to the demo (pid {demo.proc.pid})" in stop.stdout
        else:
            os.kill(demo.proc.pid, signal.SIGTERM)
        rc = demo.proc.wait(timeout=STOP_BOUND_S + 30)
        took = time.monotonic() - sent
        print(f"{step}: exit {rc} {took:.1f}s after the stop was sent ({send})")
        assert rc == 128 + signal.SIGTERM, demo.output
        assert f"demo stopped (SIGTERM while {step}; exit 143)" in demo.output
        assert "without a clean shutdown" not in demo.output
        assert took < STOP_BOUND_S, f"stopped {took:.1f}s after SIGTERM:\n{demo.output}"
        assert not pid_file.exists()
        assert demo.leftovers() == []
    finally:
        demo.close()


# --------------------------------------------------------------------------- without Ray

# A step in a library that drops exceptions — the demo's stop among them — ``swallow`` times, as
# Python does with one raised in an at-fork hook (ray.init forks), then lets them through.
DROPPING_STEP = """
import sys, time
from pathlib import Path
from pipelines.demo import FINETUNE
from pipelines.runtime.stopping import DemoStopped, StopControl

pid_file, grace_s, swallow = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
stopper = StopControl(pid_file, grace_s=grace_s)
stopper.start()
stopper.enter(FINETUNE)
ready = False
try:
    while True:
        try:
            if not ready:  # in here: the SIGTERM the test sends then may come at once
                print("ready", flush=True)
                ready = True
            time.sleep(0.05)
        except BaseException:
            if swallow == 0:
                raise
            swallow -= 1
            print("dropped", flush=True)
except DemoStopped as stopped:
    stopper.begin_shutdown()
    stopper.finish()
    print(f"stopped: {stopped}", flush=True)
    sys.exit(stopped.exit_code)
"""


def _dropping_step(pid_file: Path, grace_s: float, swallow: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", DROPPING_STEP, str(pid_file), str(grace_s), str(swallow)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=30)
    assert int(pid_file.read_text()) == proc.pid
    return proc


def _stop(proc: subprocess.Popen, *signals: int) -> tuple[str, str, float]:
    sent = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.3)
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    return out, err, time.monotonic() - sent


@pytest.mark.timeout(60)
def test_a_dropped_stop_is_raised_again_and_a_hung_one_ends_anyway(tmp_path):
    pid_file = tmp_path / "demo.pid"
    procs = []
    try:
        # Dropped once: raised again a second later, and the demo shuts down as usual.
        procs.append(proc := _dropping_step(pid_file, grace_s=60.0, swallow=1))
        out, err, took = _stop(proc, signal.SIGTERM)
        assert proc.returncode == 143 and "stopped: SIGTERM while fine-tuning" in out, err
        assert "dropped" in out and took < 10
        assert not pid_file.exists()

        # Dropped every time: the watchdog exits grace_s after the signal.
        procs.append(proc := _dropping_step(pid_file, grace_s=1.0, swallow=10**9))
        out, err, took = _stop(proc, signal.SIGTERM)
        assert proc.returncode == 143
        assert "still running 1s after SIGTERM: exiting without a clean shutdown (exit 143)" in err
        assert 0.9 < took < 10 and not pid_file.exists()

        # A second signal does not wait for the watchdog.
        procs.append(proc := _dropping_step(pid_file, grace_s=60.0, swallow=10**9))
        out, err, took = _stop(proc, signal.SIGTERM, signal.SIGINT)
        assert proc.returncode == 143 and "second SIGINT" in err
        assert took < 10 and not pid_file.exists()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(60)
def test_demo_stop_finds_only_a_live_demo(tmp_path, capsys):
    pid_file = tmp_path / "out" / "demo" / "demo.pid"
    stop = ["--stop", "--config", DEMO_CONFIG, f"output.dir={tmp_path / 'out'}"]
    assert demo_module.main(stop) == 0
    assert "no demo running" in capsys.readouterr().out

    # A pid file left by a killed demo, its pid now another process's: not signalled, removed.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # A stand-in demo: `pipelines.demo` in its command line, and SIGTERM ends it.
    standin = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "pipelines.demo"]
    )
    try:
        pid_file.parent.mkdir(parents=True)
        pid_file.write_text(f"{other.pid}\n")
        assert demo_module.main(stop) == 0
        assert "removed the stale" in capsys.readouterr().out
        assert not pid_file.exists() and other.poll() is None

        pid_file.write_text(f"{standin.pid}\n")
        with pytest.raises(ValueError, match=f"a demo is already running \\(pid {standin.pid}"):
            claim_pid_file(pid_file)
        # It waits until the demo exited (a zombie until this test reaps it counts as exited).
        assert demo_module.main(stop) == 0
        assert f"the demo (pid {standin.pid}) stopped" in capsys.readouterr().out
        assert standin.wait(timeout=10) == -signal.SIGTERM
    finally:
        for proc in (other, standin):
            proc.kill()
            proc.wait()
