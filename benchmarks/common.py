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
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


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


# ---- charts ------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _nice_max(v: float) -> float:
    if v <= 0 or not math.isfinite(v):
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return m * e
    return 10 * e


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def _light(color: tuple[int, int, int], f: float = 0.55) -> tuple[int, ...]:
    return tuple(int(c + (255 - c) * f) for c in color)


def _canvas(title: str, series: dict, width: int, height: int, *, bottom: int):
    """A white chart with its title; the plot area (left, top, width, height) leaves room on the
    right for the legend of ``series``' names."""
    from PIL import Image, ImageDraw

    font, small = _font(15), _font(11)
    right = 40 + max((int(small.getlength(n)) for n in series), default=100)
    left, top = 80, 62
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    d.text((left, 12), title, fill="black", font=font)
    return im, d, font, small, (left, top, width - left - right, height - top - bottom)


def bar_chart(
    title: str,
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    *,
    ylabel: str = "",
    log: bool = False,
    width: int = 1100,
    height: int = 420,
    hline: tuple[float, str] | None = None,
):
    """Grouped vertical bars (one colour per series, one group per x label), values on the bars;
    None draws no bar. ``log``: a log10 y axis (for figures spanning orders of magnitude)."""
    im, d, font, small, (left, top, pw, ph) = _canvas(title, series, width, height, bottom=70)
    values = [v for vs in series.values() for v in vs if v is not None and v > 0]
    vmax = max(values, default=1.0)
    if hline:
        vmax = max(vmax, hline[0])
    if log:
        vmin = min(values, default=1.0)
        lo, hi = math.floor(math.log10(vmin)), math.ceil(math.log10(vmax * 1.05))
        hi = max(hi, lo + 1)

        def y_of(v: float) -> float:
            return top + ph * (1 - (math.log10(max(v, 10**lo)) - lo) / (hi - lo))

        ticks = [10**e for e in range(lo, hi + 1)]
    else:
        top_v = _nice_max(vmax * 1.05)

        def y_of(v: float) -> float:
            return top + ph * (1 - v / top_v)

        ticks = [top_v * i / 5 for i in range(6)]
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in ticks:
        y = y_of(t)
        d.line([(left, y), (left + pw, y)], fill=(228, 228, 228))
        label = _fmt(t)
        d.text((left - 8 - d.textlength(label, font=small), y - 7), label, fill="black", font=small)
    if ylabel:
        d.text((8, top - 22), ylabel, fill=(80, 80, 80), font=small)
    names = list(series)
    gw = pw / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(names))
    for g, group in enumerate(groups):
        x0 = left + g * gw + gw * 0.1
        for i, name in enumerate(names):
            vs = series[name]
            v = vs[g] if g < len(vs) else None
            if v is None or (log and v <= 0):
                continue
            x = x0 + i * bw
            y = y_of(v)
            d.rectangle([x, y, x + bw - 2, top + ph], fill=PALETTE[i % len(PALETTE)])
            label = _fmt(v)
            tw = d.textlength(label, font=small)
            if tw < bw + 14:
                d.text((x + (bw - tw) / 2, y - 14), label, fill="black", font=small)
        words = group.split("\n")
        for j, w in enumerate(words):
            tw = d.textlength(w, font=small)
            d.text(
                (left + g * gw + (gw - tw) / 2, top + ph + 8 + 14 * j), w, fill="black", font=small
            )
    if hline:
        y = y_of(hline[0])
        for x in range(left, left + pw, 12):
            d.line([(x, y), (min(x + 6, left + pw), y)], fill=(200, 0, 0), width=2)
        d.text((left + pw + 10, y - 7), hline[1], fill=(200, 0, 0), font=small)
    y = top + (30 if hline else 0)
    for i, name in enumerate(names):
        d.rectangle([left + pw + 12, y + 2, left + pw + 28, y + 14], fill=PALETTE[i % len(PALETTE)])
        d.text((left + pw + 34, y), name, fill="black", font=small)
        y += 20
    return im


def line_chart(
    title: str,
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    width: int = 1100,
    height: int = 420,
    dashed: Sequence[str] = (),
    xrange: tuple[float, float] | None = None,
):
    """Lines with markers, one per series of (x, y) points."""
    im, d, font, small, (left, top, pw, ph) = _canvas(title, series, width, height, bottom=60)
    pts = [p for s in series.values() for p in s if all(math.isfinite(c) for c in p)]
    xs = [p[0] for p in pts if not logx or p[0] > 0] or [0.0, 1.0]
    ys = [p[1] for p in pts if not logy or p[1] > 0] or [0.0, 1.0]

    def axis(vals: list[float], log: bool, exact: bool = False):
        if log and exact:  # the measured values span the axis (a few x values: 1, 2, 4 ... 32)
            lo, hi = math.log10(min(vals)), math.log10(max(vals))
            pad = max(hi - lo, 1.0) * 0.04
            lo, hi = lo - pad, hi + pad
            return (lambda v: (math.log10(max(v, 1e-300)) - lo) / (hi - lo)), sorted(set(vals))
        if log:
            lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
            hi = max(hi, lo + 1)
            return (lambda v: (math.log10(max(v, 10**lo)) - lo) / (hi - lo)), [
                10**e for e in range(lo, hi + 1)
            ]
        hi = _nice_max(max(vals) * 1.05)
        return (lambda v: v / hi), [hi * i / 5 for i in range(6)]

    if xrange is not None:  # a fixed linear x axis, e.g. recall from its lowest value to 1
        x0, x1 = xrange
        step = _nice_max((x1 - x0) / 5) if x1 > x0 else 1.0
        first = math.ceil(x0 / step) * step

        def fx(v: float) -> float:
            return (v - x0) / ((x1 - x0) or 1.0)

        xticks = [first + i * step for i in range(int((x1 - first) / step + 1e-9) + 1)]
    else:
        fx, xticks = axis(xs, logx, exact=logx and len(set(xs)) <= 8)
    fy, yticks = axis(ys, logy)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + pw * fx(x), top + ph * (1 - fy(y))

    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in yticks:
        _, y = xy(xs[0], t)
        d.line([(left, y), (left + pw, y)], fill=(228, 228, 228))
        label = _fmt(t)
        d.text((left - 8 - d.textlength(label, font=small), y - 7), label, fill="black", font=small)
    for t in xticks:
        x, _ = xy(t, ys[0])
        d.line([(x, top + ph), (x, top + ph + 4)], fill="black")
        label = _fmt(t)
        d.text(
            (x - d.textlength(label, font=small) / 2, top + ph + 8), label, fill="black", font=small
        )
    if xlabel:
        d.text(
            (left + pw / 2 - d.textlength(xlabel, font=small) / 2, top + ph + 28),
            xlabel,
            fill=(80, 80, 80),
            font=small,
        )
    if ylabel:
        d.text((8, top - 22), ylabel, fill=(80, 80, 80), font=small)
    y_leg = top
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        good = sorted(p for p in s if all(math.isfinite(c) for c in p))
        points = [xy(*p) for p in good]
        if len(points) > 1:
            if name in dashed:
                for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
                    n = max(1, int(math.hypot(x1 - x0, y1 - y0) // 8))
                    for k in range(0, n, 2):
                        a, b = k / n, min(1.0, (k + 1) / n)
                        d.line(
                            [
                                (x0 + (x1 - x0) * a, y0 + (y1 - y0) * a),
                                (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b),
                            ],
                            fill=color,
                            width=2,
                        )
            else:
                d.line(points, fill=color, width=2)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.line([(left + pw + 12, y_leg + 8), (left + pw + 28, y_leg + 8)], fill=color, width=3)
        d.text((left + pw + 34, y_leg), name, fill="black", font=small)
        y_leg += 20
    return im


def stack(images: Sequence[Any], out: str | Path) -> Path:
    """Panels one above the other in one PNG."""
    from PIL import Image

    images = [im for im in images if im is not None]
    w = max(im.width for im in images)
    h = sum(im.height for im in images)
    sheet = Image.new("RGB", (w, h), "white")
    y = 0
    for im in images:
        sheet.paste(im, (0, y))
        y += im.height
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
