"""Charts drawn with PIL (no plotting dependency): bars, lines and stacked panels, one palette
and one font rule, for the evaluation's plots and the benchmarks' figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def load_font(size: int):
    from PIL import ImageFont

    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def nice_max(v: float) -> float:
    if v <= 0 or not math.isfinite(v):
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return m * e
    return 10 * e


def tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def lighten(color: tuple[int, int, int], f: float = 0.55) -> tuple[int, ...]:
    return tuple(int(c + (255 - c) * f) for c in color)


def canvas(title: str, series: dict, width: int, height: int, *, bottom: int):
    """A white chart with its title; the plot area (left, top, width, height) leaves room on the
    right for the legend of ``series``' names."""
    from PIL import Image, ImageDraw

    font, small = load_font(15), load_font(11)
    right = 40 + max((int(small.getlength(n)) for n in series), default=100)
    left, top = 80, 62
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    d.text((left, 12), title, fill="black", font=font)
    return im, d, font, small, (left, top, width - left - right, height - top - bottom)


def dashed_line(draw, points, color, *, width: int = 2, dash: int = 8) -> None:
    """A polyline through ``points`` drawn as dashes of ``dash`` pixels."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) // dash))
        for k in range(0, n, 2):
            a, b = k / n, min(1.0, (k + 1) / n)
            draw.line(
                [(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                fill=color, width=width,
            )  # fmt: skip


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
    im, d, font, small, (left, top, pw, ph) = canvas(title, series, width, height, bottom=70)
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
        top_v = nice_max(vmax * 1.05)

        def y_of(v: float) -> float:
            return top + ph * (1 - v / top_v)

        ticks = [top_v * i / 5 for i in range(6)]
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in ticks:
        y = y_of(t)
        d.line([(left, y), (left + pw, y)], fill=(228, 228, 228))
        label = tick_label(t)
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
            label = tick_label(v)
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
    im, d, font, small, (left, top, pw, ph) = canvas(title, series, width, height, bottom=60)
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
        hi = nice_max(max(vals) * 1.05)
        return (lambda v: v / hi), [hi * i / 5 for i in range(6)]

    if xrange is not None:  # a fixed linear x axis, e.g. recall from its lowest value to 1
        x0, x1 = xrange
        step = nice_max((x1 - x0) / 5) if x1 > x0 else 1.0
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
        label = tick_label(t)
        d.text((left - 8 - d.textlength(label, font=small), y - 7), label, fill="black", font=small)
    for t in xticks:
        x, _ = xy(t, ys[0])
        d.line([(x, top + ph), (x, top + ph + 4)], fill="black")
        label = tick_label(t)
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
                dashed_line(d, points, color)
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
