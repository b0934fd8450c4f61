"""Compare `pipelines.evaluate` results: one markdown table and one bar chart for several models.

    python benchmarks/compare_evals.py NAME=eval.json [NAME=eval.json ...] --k-test 16
        [--markdown table.md] [--plot recall.png] [--title TEXT]

Per model: text→product and product→text R@1/5/10 with ITC alone and ITC→ITM at ``--k-test`` (which
every JSON must hold), and text→product R@1 per query language. The chart: text→product R@1 per
language and overall, ITC vs ITC→ITM, one group per model (drawn with PIL; no plotting library).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LANG_NAMES = {"en": "English", "zh": "汉字→pinyin", "pinyin": "pinyin"}
PLOT_LANG_NAMES = {"en": "English", "zh": "zh chars->pinyin", "pinyin": "pinyin"}  # Latin font


def load(specs: list[str]) -> dict[str, dict]:
    runs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"expected NAME=eval.json, got {spec!r}")
        runs[name] = json.loads(Path(path).read_text(encoding="utf-8"))
    return runs


def _itm(metrics: dict, k: int, name: str) -> dict:
    block = metrics["itm"].get(str(k))
    if block is None:
        raise ValueError(f"{name}: no ITC→ITM figures at k_test {k}; has {sorted(metrics['itm'])}")
    return block


def _triple(block: dict, direction: str) -> str:
    d = block[direction]
    return " / ".join(f"{100 * d[f'R@{r}']:.1f}" for r in (1, 5, 10))


def markdown(runs: dict[str, dict], k: int) -> str:
    lines = [
        "| model | ranking | text→product R@1 / R@5 / R@10 | product→text R@1 / R@5 / R@10 | mean |",
        "|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        m = r["metrics"]
        for label, block in (("ITC", m["itc"]), (f"ITC→ITM k_test {k}", _itm(m, k, name))):
            lines.append(
                f"| {name} | {label} | {_triple(block, 'text_to_product')} | "
                f"{_triple(block, 'product_to_text')} | {100 * block['mean']:.1f} |"
            )
    langs = list(next(iter(runs.values()))["metrics"]["by_lang"])
    lines += [
        "",
        "Text→product R@1 / R@5 / R@10 per query language, ITC → ITC→ITM:",
        "",
        "| model | " + " | ".join(LANG_NAMES.get(lang, lang) for lang in langs) + " |",
        "|---|" + "---|" * len(langs),
    ]
    for name, r in runs.items():
        cells = []
        for lang in langs:
            b = r["metrics"]["by_lang"][lang]
            itc = _triple(b["itc"], "text_to_product")
            itm = _triple(_itm(b, k, name), "text_to_product")
            cells.append(f"{itc} → {itm}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], k: int, out: Path, title: str) -> Path:
    from PIL import Image, ImageDraw

    from pipelines.evaluation.charts import load_font as _font

    langs = list(next(iter(runs.values()))["metrics"]["by_lang"])
    groups = [*langs, "all"]
    w, h = 1000, 520
    left, right, top, bottom = 60, 200, 50, 60
    pw, ph = w - left - right, h - top - bottom
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    font, small = _font(15), _font(12)
    d.text((left, 15), title, fill="black", font=font)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in range(0, 11, 2):
        y = top + ph * (1 - t / 10)
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        d.text((left - 35, y - 7), f"{t / 10:.1f}", fill="black", font=small)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    bars_per_group = 2 * len(runs)
    group_w = pw / len(groups)
    bar_w = group_w * 0.8 / bars_per_group
    for g, group in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for i, (name, r) in enumerate(runs.items()):
            m = r["metrics"] if group == "all" else r["metrics"]["by_lang"][group]
            for j, block in enumerate((m["itc"], _itm(m, k, name))):
                value = block["text_to_product"]["R@1"]
                x = x0 + (2 * i + j) * bar_w
                color = palette[i % len(palette)]
                fill = color if j == 1 else tuple(int(c + (255 - c) * 0.55) for c in color)
                d.rectangle([x, top + ph * (1 - value), x + bar_w - 2, top + ph], fill=fill)
        label = PLOT_LANG_NAMES.get(group, group)
        d.text((left + g * group_w + group_w / 2 - 4 * len(label), top + ph + 10), label,
               fill="black", font=small)  # fmt: skip
    y = top
    for i, name in enumerate(runs):
        color = palette[i % len(palette)]
        light = tuple(int(c + (255 - c) * 0.55) for c in color)
        d.rectangle([left + pw + 15, y + 2, left + pw + 35, y + 14], fill=light)
        d.text((left + pw + 40, y), f"{name} ITC", fill="black", font=small)
        d.rectangle([left + pw + 15, y + 22, left + pw + 35, y + 34], fill=color)
        d.text((left + pw + 40, y + 20), f"{name} ITC->ITM {k}", fill="black", font=small)
        y += 46
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=eval.json")
    parser.add_argument("--k-test", type=int, required=True, help="the ITC→ITM depth to compare")
    parser.add_argument("--markdown", type=Path, help="write the tables here too")
    parser.add_argument("--plot", type=Path, help="bar chart PNG")
    parser.add_argument("--title", default="text->product R@1 on held-out products")
    args = parser.parse_args(argv)
    try:
        runs = load(args.runs)
        table = markdown(runs, args.k_test)
        if args.plot:
            plot(runs, args.k_test, args.plot, args.title)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
