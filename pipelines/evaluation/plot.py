"""The recall-vs-k_test chart (a categorical x axis: ITC, then each k_test), drawn with the shared
chart primitives of :mod:`pipelines.evaluation.charts`."""

from __future__ import annotations

from pathlib import Path

from pipelines.evaluation.charts import dashed_line, load_font
from pipelines.evaluation.report import DIRECTION_SHORT

_COLORS = {"R@1": (214, 39, 40), "R@5": (31, 119, 180), "R@10": (44, 160, 44)}


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
                dashed_line(d, pts, color)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            lx = left + pw + 15
            if style == "solid":
                d.line([(lx, legend_y + 8), (lx + 30, legend_y + 8)], fill=color, width=2)
            else:
                dashed_line(d, [(lx, legend_y + 8), (lx + 30, legend_y + 8)], color, dash=6)
            # PIL's default font has no arrow.
            label = f"{DIRECTION_SHORT[direction]} {name}".replace("→", "->")
            d.text((lx + 36, legend_y), label, fill="black", font=small)
            legend_y += 20
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    return out
