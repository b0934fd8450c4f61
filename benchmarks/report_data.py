"""The result files docs/performance.md is filled from, and the formatting its tables share.

Every figure comes from a JSON file written by a benchmark here; a missing file gives
:data:`NOT_YET`, never a number from elsewhere. The one exception is labelled wherever it appears:
the H200 reference figures (:data:`ANCHORS`: measured outside this repository and given to the
project), used when no ``gpu_check.py`` result exists, always named "H200 reference".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

NOT_YET = "not measured yet"
# One H200 node of the GPU machine this project is lent; two cores go to the driver and Ray.
NODE_CORES = 16

# "Measured on one H200 (torch 2.11 + transformers 5.17, bf16, random weights, November 2026)":
# the reference figures this project was given, not measured by this repository.
ANCHORS = {
    "source": "H200 reference (one H200, torch 2.11 + transformers 5.17, bf16, random weights, "
    "November 2026; measured by the project's reference, not by these benchmarks)",
    "encode_eager": 1485.0,
    "encode_sdpa": 3363.0,
    "encode_compiled": 3557.0,
    "large_eager": 530.0,
    "large_sdpa": 1150.0,
    "text_b1_ms": 8.1,
    "text_b64_ms": 9.9,
    "itm32_cached_ms": 16.6,
    "itm32_recompute_extra_ms": 9.6,
    "itm128_cached_ms": 19.2,
    "itm128_recompute_extra_ms": 37.6,
    "itm_batched_64x32_ms": 265.0,
    "itm_batched_qps": 242.0,
    "pil_plain_16": 690.0,
    "pil_draft_16": 1254.0,
    "nvjpeg_128": 5026.0,
}


# ---- loading -------------------------------------------------------------------------------------
def load(results: Path, name: str) -> dict | None:
    path = results / name
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) and "benchmark" in data else None


def load_gpu(results: Path) -> dict | None:
    """The newest non-smoke gpu_check result (gpu-*.json)."""
    found = []
    for path in sorted(results.glob("gpu*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (
            isinstance(data, dict)
            and data.get("benchmark") == "gpu_check"
            and not data.get("smoke")
        ):
            found.append((data.get("date", ""), path.name, data))
    if not found:
        return None
    date, name, data = max(found)
    data["_file"] = name
    return data


def load_all(results: Path) -> dict:
    """Every result file the page uses, keyed by role (None where missing)."""
    return {
        "model": load(results, "model-cpu.json"),
        "index": load(results, "index-cpu.json"),
        "ann": load(results, "ann-cpu.json"),
        "serve": load(results, "serve-cpu.json"),
        "gpu": load_gpu(results),
        # section 6's before/after: the code before the fixes, and this checkout, back to back
        "before_index": load(results / "before", "index-cpu.json"),
        "before_query": load(results / "before", "ann-query.json"),
        "query": load(results, "ann-query.json"),
        "serve_fixed_wait": load(results, "serve-cpu-fixed-wait.json"),
    }


# ---- formatting ----------------------------------------------------------------------------------
def num(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, float)) and abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def where(d: dict | None, results_name: str = "") -> str:
    """One line: command, machine, date (and the load average: other work disturbs timings)."""
    if not d:
        return NOT_YET
    m = d.get("machine", {})
    machine = m.get("gpu") or m.get("cpu_model", "?")
    if m.get("gpu"):
        machine = f"{m['gpu']} + {m.get('cpu_model', '?')} ({m.get('cores')} cores)"
    else:
        machine = f"{machine}, {m.get('cores')} cores, {m.get('memory_gb')} GB"
    load_avg = ""
    if m.get("loadavg_start"):
        load_avg = f"; load average {m['loadavg_start'][0]} at start, {m.get('loadavg_end', ['?'])[0]} at end"
    pk = m.get("packages", {})
    versions = ", ".join(
        f"{k} {v}" for k, v in pk.items() if v and k in ("torch", "transformers", "ray", "lancedb")
    )
    file = f" → `benchmarks/results/{results_name}`" if results_name else ""
    commit = f" at commit {d['commit']}" if d.get("commit") else ""
    note = f" ({d['note']})" if d.get("note") else ""
    return (
        f"`{d.get('command', '?')}`{file}{commit}{note} — {machine}, {m.get('uname', '?')}, python {m.get('python', '?')}"
        f" ({versions}) — {d.get('date', '?')}{load_avg}"
    )


def table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def image(results: Path, name: str, alt: str, out_dir: Path) -> str:
    path = results / name
    if not path.is_file():
        return f"*(plot {name}: {NOT_YET})*"
    return f"![{alt}]({os.path.relpath(path, out_dir)})"


def search_label(setting: dict) -> str:
    return ", ".join(f"{a}={b}" for a, b in setting.items()) or "LanceDB defaults (as the service)"


def rec(cfg: dict, k: int) -> float:
    return cfg[f"recall@{k}"]


def verdict(ok: bool | None, projected: bool = False) -> str:
    if ok is None:
        return "–"
    word = "**met**" if ok else "**missed**"
    return f"{word} (projected)" if projected else word


# ---- the figures the targets and the projection use ----------------------------------------------
def gpu_rows(gpu: dict | None, pred) -> list[dict]:
    return [r for r in (gpu or {}).get("rows", []) if r.get("value") is not None and pred(r)]


def gpu_name(gpu: dict | None) -> str:
    return ((gpu or {}).get("machine") or {}).get("gpu") or "GPU"


def gpu_best_encode(gpu):
    rows = gpu_rows(
        gpu, lambda r: r["section"] in ("encode", "compile") and r["what"].startswith("blip-base")
    )
    return max(rows, key=lambda r: r["value"]) if rows else None


def gpu_decode(gpu, label):
    rows = gpu_rows(gpu, lambda r: r["section"] == "decode" and label in r["variant"])
    return max(rows, key=lambda r: r["value"]) if rows else None


def gpu_query(gpu):
    rows = gpu_rows(gpu, lambda r: "whole query" in r["what"] and r.get("ms") is not None)
    return min(rows, key=lambda r: r["ms"]) if rows else None


def gpu_batched(gpu):
    rows = gpu_rows(gpu, lambda r: "ITM batched" in r["what"])
    return max(rows, key=lambda r: r["value"]) if rows else None


def ann_best(ann: dict | None, rows_wanted: int | None = None, min_recall: float = 0.95):
    """(size entry, fastest config with recall >= min_recall) at ``rows_wanted`` (default: the
    largest size measured), or (size, None)."""
    if not ann or not ann.get("sizes"):
        return None, None
    sizes = ann["sizes"]
    size = next((s for s in sizes if s["rows"] == rows_wanted), None) if rows_wanted else sizes[-1]
    if size is None:
        return None, None
    k = ann["k"]
    ok = [c for c in size["configs"] if c[f"recall@{k}"] >= min_recall]
    return size, (min(ok, key=lambda c: c["p50_ms"]) if ok else None)


def model_entry(index: dict | None, name: str) -> dict | None:
    """``bench_index.py``'s entry for one model, or None."""
    return next((m for m in (index or {}).get("models", []) if m["model"] == name), None)
