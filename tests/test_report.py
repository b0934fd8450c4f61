"""benchmarks/report.py: docs/performance.md is written by hand and only its marked regions
(tables, "Measured:" lines, plot links) are regenerated, from the result files; every line outside
the markers is left as it is."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.common import replace_between  # noqa: E402
from benchmarks.report_fixed import _ba_row  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PAGE = REPO / "docs" / "performance.md"
REGION_BODY = re.compile(r"(<!-- (\S+) begin -->\n).*?(\n<!-- \2 end -->)", re.S)


def _outside(page: str) -> str:
    """The page with every region's generated text taken out: what report.py must not touch."""
    return REGION_BODY.sub(r"\1\3", page)


def _region(page: str, name: str) -> str:
    begin, end = report.markers(name)
    return page.split(begin, 1)[1].split(end, 1)[0].strip("\n")


@pytest.fixture
def results(tmp_path) -> Path:
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    return copy


def test_committed_doc_is_what_the_committed_results_render_to():
    assert report.render(RESULTS, PAGE) == PAGE.read_text(), (
        "docs/performance.md's tables differ from the result files: run `python benchmarks/report.py`"
    )


def test_tables_come_from_the_json_and_the_prose_is_left_alone(results, tmp_path):
    page = PAGE.read_text()
    # A reworded sentence and a stale table: the first must survive, the second be replaced.
    reworded = page.replace("## 2. ANN and the text query on CPU", "## 2. ANN, reworded by hand", 1)
    begin, end = report.markers("table:model")
    stale = replace_between(reworded, begin, end, f"{begin}\n| stale |\n{end}")
    data = json.loads((results / "model-cpu.json").read_text())
    data["rows"][0]["images_per_s"] = 123456.0
    (results / "model-cpu.json").write_text(json.dumps(data))

    out = report.render(results, tmp_path / "perf.md", page=stale)
    assert "## 2. ANN, reworded by hand" in out and "| stale |" not in out
    assert "| 123,456 |" in _region(out, "table:model")
    assert _outside(out) == _outside(stale)  # not one character outside the markers changed
    assert out.count("<!--") == page.count("<!--")


def test_before_after_rows_come_from_the_files(results, tmp_path):
    _set_steady(results / "before" / "index-cpu.json", "compact", 12.5)
    _set_steady(results / "index-cpu.json", "compact", 50.0)
    page = report.render(results, tmp_path / "perf.md", page=PAGE.read_text())
    fixed = _region(page, "table:fixed")
    row = next(ln for ln in fixed.splitlines() if "all indexing fixes" in ln and "compact" in ln)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["12.5 img/s", "50.0 img/s", "4.00×"], cells

    shutil.rmtree(results / "before")  # no before files: no before/after claims, no crash
    page = report.render(results, tmp_path / "perf.md", page=PAGE.read_text())
    assert "all indexing fixes" not in page
    assert _region(page, "table:fixed") != fixed and "## 6. Bottlenecks" in page


def _set_steady(path: Path, model: str, value: float) -> None:
    data = json.loads(path.read_text())
    for m in data["models"]:
        if m["model"] == model:
            m["job"]["steady_images_per_s"] = value
    path.write_text(json.dumps(data))


def test_missing_results_say_not_measured(tmp_path):
    page = PAGE.read_text()
    out = report.render(tmp_path / "empty", tmp_path / "perf.md", page=page)
    assert _outside(out) == _outside(page)
    names = [f"{kind}:{name}" for kind, name in report.regions(page)]
    # Every region but the H200 reference table (labelled as such) says so, not a stale number.
    quiet = [n for n in names if n != "table:gpu" and report.NOT_YET not in _region(out, n)]
    assert quiet == []
    assert "H200 reference" in _region(out, "table:gpu")


def test_bad_markers_are_named(tmp_path):
    with pytest.raises(ValueError, match="table:no-such-table"):
        report.render(RESULTS, tmp_path / "p.md", page="<!-- table:no-such-table begin -->\n")
    with pytest.raises(ValueError, match="table:model end"):
        report.render(RESULTS, tmp_path / "p.md", page="<!-- table:model begin -->\n| x |\n")
    twice = "<!-- table:model begin -->\n<!-- table:model end -->\n" * 2
    with pytest.raises(ValueError, match="more than once"):
        report.render(RESULTS, tmp_path / "p.md", page=twice)


def test_main_fills_a_page_and_leaves_the_rest(tmp_path, capsys):
    page = tmp_path / "perf.md"
    page.write_text("# Mine\n\nProse.\n\n<!-- table:ann-rows-10000 begin -->\nold\n<!-- table:ann-rows-10000 end -->\n")
    assert report.main(["--results", str(RESULTS), "--out", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Mine\n\nProse.\n\n<!-- table:ann-rows-10000 begin -->\n| index |")
    assert "old" not in text and text.endswith("<!-- table:ann-rows-10000 end -->\n")
    assert "no region for table:targets" in capsys.readouterr().out
    assert report.main(["--out", str(tmp_path / "missing.md")]) == 2
    assert "written by hand" in capsys.readouterr().err


def test_save_writes_the_json_and_skips_an_empty_plot_path(tmp_path, capsys):
    from benchmarks.common import decode_grid, header, save

    drawn = []
    result = header("t", ["--x"])
    save(result, tmp_path / "r.json", lambda r, p: drawn.append(p), Path(""))
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["benchmark"] == "t" and "seconds" in data and "started" not in data
    assert drawn == [] and capsys.readouterr().out.strip() == f"wrote {tmp_path / 'r.json'}"
    save(header("t", []), tmp_path / "s.json", lambda r, p: drawn.append(p), tmp_path / "s.png")
    assert drawn == [tmp_path / "s.png"]
    rows = [
        {"option": "a", "target_px": 64, "images_per_s": 1.0},
        {"option": "a", "target_px": 384, "images_per_s": 2.0},
        {"option": "b", "target_px": 384, "images_per_s": 3.0},
    ]
    assert decode_grid({"rows": rows}) == ([64, 384], {"a": [1.0, 2.0], "b": [None, 3.0]})


def test_before_after_ratio():
    assert _ba_row("x", 10.0, 5.0, "ms", 1, "here")[1:4] == ["10.0 ms", "5.0 ms", "0.50×"]
    assert _ba_row("x", None, 5.0, "ms", 1, "here")[3] == "–"
