"""benchmarks/report.py: docs/performance.md is what the committed result files render to, and
section 6's before/after rows come from the result files, not from the script."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def test_committed_doc_is_what_the_committed_results_render_to(tmp_path):
    out = REPO / "docs" / "performance.md"
    assert report.render(RESULTS, out) == out.read_text(), (
        "docs/performance.md differs from `python benchmarks/report.py`: regenerate it"
    )


@pytest.fixture
def results(tmp_path) -> Path:
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    return copy


def _set_steady(path: Path, model: str, value: float) -> None:
    data = json.loads(path.read_text())
    for m in data["models"]:
        if m["model"] == model:
            m["job"]["steady_images_per_s"] = value
    path.write_text(json.dumps(data))


def test_before_after_rows_come_from_the_files(results, tmp_path):
    _set_steady(results / "before" / "index-cpu.json", "compact", 12.5)
    _set_steady(results / "index-cpu.json", "compact", 50.0)
    page = report.render(results, tmp_path / "perf.md")
    row = next(ln for ln in page.splitlines() if "all indexing fixes" in ln and "compact" in ln)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["12.5 img/s", "50.0 img/s", "4.00×"], cells

    shutil.rmtree(results / "before")  # no before files: no before/after claims, no crash
    page = report.render(results, tmp_path / "perf.md")
    assert "all indexing fixes" not in page
    assert "## 6. Bottlenecks" in page and "### Open" in page


def test_missing_results_say_not_measured(tmp_path):
    page = report.render(tmp_path / "empty", tmp_path / "perf.md")
    assert page.count(report.NOT_YET) >= 5
    assert "### Fixed" not in page


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
    assert report._ba_row("x", 10.0, 5.0, "ms", 1, "here")[1:4] == ["10.0 ms", "5.0 ms", "0.50×"]
    assert report._ba_row("x", None, 5.0, "ms", 1, "here")[3] == "–"
