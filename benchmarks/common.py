"""What every CPU benchmark in ``benchmarks/`` shares: the JSON header (command, machine, date),
percentiles, and PNG charts drawn with PIL (no plotting library is installed here).

Not imported by ``gpu_check.py``, which must run on a GPU machine with nothing but torch,
transformers, PIL, numpy and ``blip_ops``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# ---- header ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """uname, CPU model, cores, memory, package versions, and the load average when asked (other
    work on the machine disturbs every timing: the doc shows it)."""
    u = platform.uname()
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    return {
        "uname": f"{u.system} {u.release} {u.machine}",
        "hostname": u.node,
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": None if mem_gb is None else round(mem_gb, 1),
        "python": platform.python_version(),
        "packages": {
            name: _version(name)
            for name in ("torch", "transformers", "ray", "lancedb", "pylance", "pyarrow", "pillow")
        },
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def git_commit() -> str | None:
    """The checkout's commit (short), with "+changes" when tracked code files differ from it."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "-uno", "--", "blip_ops", "pipelines", "benchmarks")
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (a copied tree on the GPU machine)
    # The result files and the page renderer (report*.py) are not code any benchmark runs.
    changed = [
        ln
        for ln in changed.splitlines()
        if "benchmarks/results/" not in ln and "benchmarks/report" not in ln
    ]
    return commit + ("+changes" if changed else "")


def header(benchmark: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """The first keys of every result file: what ran, where, when."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO))
    except ValueError:
        shown = script.name
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "benchmark": benchmark,
        "command": shlex.join(["python", shown, *args]),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "started": time.time(),
    }


def finish(result: dict[str, Any]) -> dict[str, Any]:
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.time() - result.pop("started", time.time()), 1)
    return result


def save(result: dict[str, Any], json_path, plot=None, plot_path=None) -> None:
    """The end of every benchmark: finish the header, write the JSON, draw ``plot(result, path)``
    when a plot path is given, and say where they went."""
    finish(result)
    plot_path = plot_path if plot is not None and str(plot_path or "") not in ("", ".") else None
    if json_path:
        write_json(json_path, result)
    if plot_path:  # ("--plot ''" arrives as Path(".") from a Path-typed option: no plot)
        plot(result, Path(plot_path))
    print("wrote " + " and ".join(str(p) for p in (json_path, plot_path) if p))


def decode_grid(decode: dict[str, Any]) -> tuple[list[int], dict[str, list[float | None]]]:
    """``bench_index.py``'s decode options as (target sizes, {option: images/s per size})."""
    sizes = sorted({r["target_px"] for r in decode["rows"]})
    by = {(r["option"], r["target_px"]): r["images_per_s"] for r in decode["rows"]}
    options = dict.fromkeys(r["option"] for r in decode["rows"])
    return sizes, {o: [by.get((o, s)) for s in sizes] for o in options}


# ---- generated regions of hand-written pages ----------------------------------------------------
def replace_between(page: str, begin: str, end: str, block: str) -> str:
    """``page`` with the text from the ``begin`` marker through the ``end`` marker (both included)
    replaced by ``block``, which brings its own markers; every other character is left as it is.
    A missing or misplaced marker raises ValueError naming it (a page is never half rewritten)."""
    start = page.find(begin)
    if start < 0:
        raise ValueError(f"marker {begin!r} not found in the page")
    stop = page.find(end, start + len(begin))
    if stop < 0:
        raise ValueError(f"marker {end!r} not found after {begin!r}")
    return page[:start] + block + page[stop + len(end) :]


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


# ---- statistics --------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds of durations in seconds."""
    ms = [x * 1000 for x in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(sum(ms) / len(ms), 3) if ms else float("nan"),
    }
