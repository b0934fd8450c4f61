"""The recall-vs-k_test chart, drawn with PIL (no plotting dependency)."""

from __future__ import annotations

from pathlib import Path

from pipelines.evaluation.report import DIRECTION_SHORT

_COLORS = {"R@1": (214, 39, 40), "R@5": (31, 119, 180), "R@10": (44, 160, 44)}


def load_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _dashed(draw, points, color, width=2, dash=8) -> None:
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        length = max(1.0, ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5)
        steps = int(length // dash)
        for s in range(0, steps + 1, 2):
            a, b = s / (steps + 1), min(1.0, (s + 1) / (steps + 1))
            draw.line(
                [(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                fill=color, width=width,
            )  # fmt: skip


def plot_recall_vs_k_test(series: dict, out: Path, title: str) -> Path:
    """Recall vs k_test with PIL (no plotting dependency): the x axis is categorical, ITC first."""
    from PIL import Image, ImageDraw

    w, h = 900, 560
    left, right, top, bottom = 70, 190, 50, 70
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    font, small = load_font(15), load_font(12)
    xs_labels = ["ITC", *[str(k) for k in series["k_test"]]]
    n = len(xs_labels)
    pw, ph = w - left - right, h - top - bottom

    def x_at(i: int) -> float:
        return left + (pw * (i + 0.5) / n)

    def y_at(v: float) -> float:
        return top + ph * (1.0 - v)

    d.text((left, 15), title, fill="black", font=font)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in range(0, 11, 2):
        y = y_at(t / 10)
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        d.text((left - 40, y - 7), f"{t / 10:.1f}", fill="black", font=small)
    for i, label in enumerate(xs_labels):
        d.line([(x_at(i), top + ph), (x_at(i), top + ph + 5)], fill="black")
        d.text((x_at(i) - 4 * len(label), top + ph + 10), label, fill="black", font=small)
    d.text((left + pw / 2 - 90, h - 28), "k_test (ITC->ITM re-rank depth)", fill="black", font=font)
    d.text((8, top - 22), "recall", fill="black", font=font)

    legend_y = top
    for direction, style in (("text_to_product", "solid"), ("product_to_text", "dashed")):
        for name, values in series[direction].items():
            ys = [series["itc"][direction][name], *values]
            pts = [(x_at(i), y_at(v)) for i, v in enumerate(ys) if v is not None]
            color = _COLORS.get(name, (90, 90, 90))
            if style == "solid":
                d.line(pts, fill=color, width=2)
            else:
                _dashed(d, pts, color)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            lx = left + pw + 15
            if style == "solid":
                d.line([(lx, legend_y + 8), (lx + 30, legend_y + 8)], fill=color, width=2)
            else:
                _dashed(d, [(lx, legend_y + 8), (lx + 30, legend_y + 8)], color, dash=6)
            # PIL's default font has no arrow.
            label = f"{DIRECTION_SHORT[direction]} {name}".replace("→", "->")
            d.text((lx + 36, legend_y), label, fill="black", font=small)
            legend_y += 20
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    return out
