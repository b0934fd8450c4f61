"""Refill the generated tables of docs/performance.md from the result files in benchmarks/results/.

    python benchmarks/report.py [--results benchmarks/results] [--out docs/performance.md]

The page is written by hand. Only the regions between markers such as

    <!-- table:index begin -->
    ...
    <!-- table:index end -->

are rewritten, from the JSON files the benchmarks here write; every other line stays as it is, so
rewording the prose is an edit of the page, not of this script. Regions come in three kinds:
``table:NAME`` (a Markdown table), ``source:NAME`` (the command, machine and date a table was
measured with) and ``plot:NAME`` (a link to the PNG beside the JSON). ``table:ann-rows-N`` holds
the ANN table at N rows. A missing result file gives "not measured yet", never a number from
elsewhere; the one exception is labelled wherever it appears: the H200 reference figures
(``report_data.ANCHORS``), used when no ``gpu_check.py`` result exists.

Inputs (any may be missing): model-cpu.json (bench_model.py), index-cpu.json (bench_index.py),
ann-cpu.json (bench_ann.py), serve-cpu.json (bench_serve.py), gpu-*.json (gpu_check.py --json,
not --smoke); for section 6's before/after: before/index-cpu.json and before/ann-query.json (the
code before the fixes, run from a git worktree), ann-query.json and serve-cpu-fixed-wait.json.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import report_tables as tables  # noqa: E402
from benchmarks.common import replace_between  # noqa: E402
from benchmarks.report_data import NOT_YET, image, load_all, where  # noqa: E402
from benchmarks.report_fixed import fixed_table  # noqa: E402
from benchmarks.report_targets import targets_table  # noqa: E402

REGION = re.compile(r"<!-- (table|source|plot):([a-z0-9-]+) begin -->")
ANN_ROWS = re.compile(r"ann-rows-(\d+)")

TABLES: dict[str, Callable[[dict], str | None]] = {
    "targets": targets_table,
    "index": tables.index_table,
    "index-phases": tables.index_phases_table,
    "index-stages": tables.index_stages_table,
    "index-ablation": tables.index_ablation_table,
    "index-naive": tables.index_naive_table,
    "index-decode": tables.index_decode_table,
    "model": tables.model_table,
    "ann-text-query": tables.text_query_table,
    "ann-batched-itm": tables.batched_itm_table,
    "serve": tables.serve_table,
    "gpu": tables.gpu_table,
    "projection-index": tables.projection_index_table,
    "projection-query": tables.projection_query_table,
    "fixed": fixed_table,
}
# source:NAME -> (result key, file name shown (None: the file found), what produces it)
SOURCES = {
    "index": ("index", "index-cpu.json", "make bench"),
    "model": ("model", "model-cpu.json", "make bench"),
    "ann": ("ann", "ann-cpu.json", "make bench"),
    "serve": ("serve", "serve-cpu.json", "make bench"),
    "gpu": ("gpu", None, "make bench-gpu"),
}
# plot:NAME -> (PNG beside the JSON files, alt text)
PLOTS = {
    "index-cpu": ("index-cpu.png", "indexing on CPU"),
    "ann-cpu": ("ann-cpu.png", "ANN and query latency on CPU"),
    "serve-cpu": ("serve-cpu.png", "service throughput and p99 vs clients"),
}
KNOWN = [f"table:{n}" for n in TABLES] + [f"source:{n}" for n in SOURCES] + [f"plot:{n}" for n in PLOTS]


def markers(region: str) -> tuple[str, str]:
    """The begin and end markers of ``region`` (``kind:name``)."""
    return f"<!-- {region} begin -->", f"<!-- {region} end -->"


def _source(name: str, d: dict) -> str:
    key, file, how = SOURCES[name]
    data = d[key]
    if not data:
        return f"*{NOT_YET}: run `{how}`.*"
    return f"Measured: {where(data, file or data['_file'])}."


def _table(name: str, d: dict) -> str:
    rows = ANN_ROWS.fullmatch(name)
    if rows:
        got = tables.ann_size_table(d, int(rows.group(1)))
    else:
        got = TABLES[name](d)
    return f"*{NOT_YET}.*" if got is None else got


def fill(kind: str, name: str, d: dict, results: Path, out_dir: Path) -> str:
    """The generated text of one region (without its markers)."""
    known = {"table": TABLES, "source": SOURCES, "plot": PLOTS}[kind]
    if name not in known and not (kind == "table" and ANN_ROWS.fullmatch(name)):
        raise ValueError(
            f"unknown region '{kind}:{name}'; known: {', '.join(KNOWN)}, table:ann-rows-N"
        )
    if kind == "source":
        return _source(name, d)
    if kind == "plot":
        return image(results, *PLOTS[name], out_dir)
    return _table(name, d)


def regions(page: str) -> list[tuple[str, str]]:
    """(kind, name) of every region the page marks, in order; a region marked twice is an error."""
    found = REGION.findall(page)
    seen: set[tuple[str, str]] = set()
    for r in found:
        if r in seen:
            raise ValueError(f"region {r[0]}:{r[1]} is marked more than once")
        seen.add(r)
    return found


def render(results: Path, out: Path, page: str | None = None) -> str:
    """``page`` (default: the file at ``out``) with every marked region refilled from the result
    files in ``results``; plot links are relative to ``out``'s folder."""
    page = out.read_text(encoding="utf-8") if page is None else page
    d = load_all(results)
    for kind, name in regions(page):
        begin, end = markers(f"{kind}:{name}")
        block = fill(kind, name, d, results, out.parent)
        page = replace_between(page, begin, end, f"{begin}\n{block}\n{end}")
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Regions: " + ", ".join(KNOWN) + ", table:ann-rows-N (N rows of bench_ann.py).",
    )  # fmt: skip
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md",
                   help="the hand-written page whose marked regions are refilled")  # fmt: skip
    args = p.parse_args(argv)
    if not args.out.is_file():
        print(f"report.py: error: {args.out} does not exist (the page is written by hand)", file=sys.stderr)
        return 2
    try:
        text = render(args.results, args.out)
    except ValueError as err:
        print(f"report.py: error: {args.out}: {err}", file=sys.stderr)
        return 2
    marked = {f"{k}:{n}" for k, n in regions(text)}
    left_out = [r for r in KNOWN if r not in marked]
    if left_out:  # the page may leave a table out on purpose; say so rather than fail
        print(f"note: {args.out.name} has no region for {', '.join(left_out)}")
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
