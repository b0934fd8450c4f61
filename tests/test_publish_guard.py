"""The publish guard (``index.max_reject_fraction``): a run that rejects too much of its input, or
accepts nothing, writes its ``rejects`` and ``runs`` rows but leaves ``published`` where it was and
exits 4; ``index.max_reject_fraction=1.0`` publishes it anyway, except a run with no accepted row.

Real components only: the index command's ``main`` on the session's local Ray, real LanceDB
tables, the manual publish command and the search service's own pointer to the published run.
One base catalog (12 products in 2 files), indexed once; each test starts from a copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.indexing import tables
from pipelines.search.snapshot import published_pointer
from tests.conftest import index_config
from tests.test_faults import PinnedReader, _parts, check_invariants
from tests.test_faults import _titles as source_titles

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

N_PRODUCTS = 12
ROWS_PER_FILE = 6  # 2 files
FAST = ("encode.batch_size=4", "index.stage_flush_rows=4")
RETITLED = (2, 3)  # rows of each file with a new title: encoded
CORRUPT = (4, 5)  # rows of each file whose image bytes are no image: rejected at decode
UNTITLED = (1,)  # rows of each file with an empty title: rejected at validation
# ... and the first file's row 0 loses its title too: 7 of 12 rejected (58%, over the default 0.5;
# 6 of 12 would be exactly 0.5, which the guard lets through: it holds only past the fraction).
MOSTLY_BAD = {"in": N_PRODUCTS, "indexed": 4, "unchanged": 1, "rejected": 7}
FIXED = {"in": N_PRODUCTS, "indexed": 4, "unchanged": 8, "rejected": 0}


def _edit(t: pa.Table, column: str, rows: dict[int, object]) -> pa.Table:
    values = t.column(column).to_pylist()
    for i, v in rows.items():
        values[i] = v
    field = t.schema.field(column)
    return t.set_column(t.schema.get_field_index(column), field, pa.array(values, field.type))


def _derive(base: Path, dst: Path, *, bad_rows: bool, every_image_bad: bool = False) -> Path:
    """``base``'s files with the RETITLED rows retitled; ``bad_rows``: the rejected rows above;
    ``every_image_bad``: no retitling, and every image cut short (a broken export)."""
    dst.mkdir(parents=True)
    for n, part in enumerate(_parts(base)):
        t = pq.read_table(part)
        if every_image_bad:
            t = _edit(t, "image", {i: b"\x89PNG\r\n\x1a\n cut short" for i in range(t.num_rows)})
            pq.write_table(t, dst / part.name)
            continue
        titles = t.column("title").to_pylist()
        t = _edit(t, "title", {i: f"{titles[i]} (new season)" for i in RETITLED})
        if bad_rows:
            t = _edit(t, "image", {i: b"not an image at all" for i in CORRUPT})
            t = _edit(t, "title", {i: "" for i in (*UNTITLED, *((0,) if n == 0 else ()))})
        pq.write_table(t, dst / part.name)
    return dst


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory) -> dict[str, Path]:
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("guard_catalog")
    make_catalog(str(root / "base"), N_PRODUCTS, seed=11, rows_per_file=ROWS_PER_FILE, workers=1)
    base = root / "base" / "products"
    assert len(_parts(base)) == N_PRODUCTS // ROWS_PER_FILE
    return {
        "base": base,
        "mostly_bad": _derive(base, root / "mostly_bad", bad_rows=True),
        "fixed": _derive(base, root / "fixed", bad_rows=False),
        "all_bad": _derive(base, root / "all_bad", bad_rows=False, every_image_bad=True),
    }


@pytest.fixture(scope="module")
def base_index(ray_local, tiny_model_dir, catalogs, tmp_path_factory) -> Path:
    from pipelines.indexing.job import run_index

    path = tmp_path_factory.mktemp("guard_base") / "index"
    s = run_index(index_config(catalogs["base"], path, tiny_model_dir, *FAST))
    assert (s["indexed"], s["rejected"]) == (N_PRODUCTS, 0), s
    return path


def index_command(source: Path, index_dir: Path, model: Path, run_id: str, *settings: str):
    """``python -m pipelines.index_catalog`` in this process, on the session's Ray:
    (exit code, stdout, stderr)."""
    from pipelines.index_catalog import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(
            [
                "--config", "configs/local.yaml", f"source.uri={source}", f"index.uri={index_dir}",
                f"model.name_or_path={model}", "--run-id", run_id, *FAST, *settings,
            ]
        )  # fmt: skip
    return rc, out.getvalue(), err.getvalue()


def _printed_reasons(out: str) -> dict[str, int]:
    line = next(ln for ln in out.splitlines() if "rejected by reason:" in ln)
    return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", line.split(":", 1)[1])}


def _rejects_of(index_dir: Path, run_id: str) -> Counter:
    """The reasons of ``run_id``'s rows in ``rejects`` at its newest version (not published)."""
    rejects = tables.connect(str(index_dir)).open_table(tables.REJECTS_TABLE).to_arrow()
    return Counter(r["reason"] for r in rejects.to_pylist() if r["run_id"] == run_id)


def _row_counts(row: dict) -> dict:
    return {"in": row["rows_in"], **{k: row[k] for k in ("indexed", "unchanged", "rejected")}}


def _titles(rows: pa.Table) -> dict[str, str]:
    return dict(
        zip(rows.column("product_id").to_pylist(), rows.column("title").to_pylist(), strict=True)
    )


def _published_titles(index_dir: Path) -> dict[str, str]:
    products, _run = tables.open_published(tables.connect(str(index_dir)))
    return _titles(products.search().select(["product_id", "title"]).limit(None).to_arrow())


@pytest.fixture(scope="module")
def held(base_index, catalogs, tiny_model_dir, tmp_path_factory) -> dict:
    """A copy of the base index after a run of the mostly-bad catalog under the default guard,
    with what readers saw before it."""
    index_dir = tmp_path_factory.mktemp("guard_held") / "index"
    shutil.copytree(base_index, index_dir)
    before = published_pointer(str(index_dir))
    pinned = PinnedReader(tables.connect(str(index_dir)))
    rc, out, err = index_command(catalogs["mostly_bad"], index_dir, tiny_model_dir, "guard-held")
    return {"dir": index_dir, "rc": rc, "out": out, "err": err, "before": before, "pinned": pinned}


# ---- the tests ------------------------------------------------------------------------------
def test_a_mostly_rejected_run_is_held_back_and_says_why(held, base_index, tiny_model_dir):
    from pipelines.indexing.publishing import HELD

    index_dir = held["dir"]
    assert held["rc"] == 4, held["out"] + held["err"]
    assert "held back" in held["err"] and "index.max_reject_fraction=1.0" in held["err"]
    assert "rejected 7 of 12 input rows (58.3%)" in held["out"], held["out"]
    # The counts by reason are printed, and are what the committed rejects rows say.
    reasons = _rejects_of(index_dir, "guard-held")
    assert sum(reasons.values()) == MOSTLY_BAD["rejected"]
    assert reasons["empty_title"] == 3, reasons  # the rest failed to decode
    assert _printed_reasons(held["out"]) == dict(reasons)
    # The runs row is committed and says the run was held, with the same counts.
    db = tables.connect(str(index_dir))
    row = tables.find_run(db, "guard-held")
    assert row["status"] == HELD and "58.3%" in row["held_reason"], row
    assert _row_counts(row) == MOSTLY_BAD and row["products_version"] is None
    assert json.loads(row["rejected_by_reason"]) == dict(reasons)
    # Nothing moved: the service's pointer, the tags, the pinned reader; no run tag anywhere.
    assert published_pointer(str(index_dir)) == held["before"]
    held["pinned"].assert_unchanged()
    for name in (held["before"]["products_table"], tables.RUNS_TABLE, tables.REJECTS_TABLE):
        assert tables.run_tag("guard-held") not in db.open_table(name).tags.list(), name
    products = db.open_table(held["before"]["products_table"])
    assert products.version == held["before"]["products_version"], "a held run merged rows"
    checked = check_invariants(str(index_dir))
    assert checked["incomplete_runs"] == 1 and checked["complete_runs"] == 1, checked
    # The run's report says it was held, and why.
    report = (index_dir / "_runs" / "guard-held" / "report.html").read_text()
    assert "held back because" in report and "58.3%" in report
    # Publishing the held run by hand is refused, saying why and what to do instead; the list of
    # runs shows it beside the published one.
    rc, out, err = _publish_command(index_dir, tiny_model_dir, "--to", "run-guard-held")
    assert rc == 2 and "held back by the publish guard" in err, out + err
    assert "index.max_reject_fraction=1.0" in err
    assert published_pointer(str(index_dir)) == held["before"]
    rc, out, err = _publish_command(index_dir, tiny_model_dir, "--list")
    assert rc == 0 and "run-guard-held" in out and f"* run-{held['before']['run_id']}" in out


def _publish_command(index_dir: Path, model: Path, *args: str):
    """``python -m pipelines.publish`` in this process: (exit code, stdout, stderr)."""
    from pipelines.publish import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(
            [
                "--config", "configs/local.yaml", f"index.uri={index_dir}",
                f"model.name_or_path={model}", *args,
            ]
        )  # fmt: skip
    return rc, out.getvalue(), err.getvalue()


def test_the_override_publishes_a_mostly_rejected_run(
    base_index, catalogs, tiny_model_dir, tmp_path
):
    from pipelines.indexing.publishing import PASSED

    index_dir = tmp_path / "index"
    shutil.copytree(base_index, index_dir)
    base_titles = _published_titles(index_dir)
    rc, out, err = index_command(
        catalogs["mostly_bad"], index_dir, tiny_model_dir, "guard-override",
        "index.max_reject_fraction=1.0",
    )  # fmt: skip
    assert rc == 0, out + err
    db = tables.connect(str(index_dir))
    run = published_pointer(str(index_dir))
    assert run["run_id"] == "guard-override"
    row = tables.find_run(db, "guard-override")
    assert row["status"] == PASSED and row["held_reason"] is None
    assert _row_counts(row) == MOSTLY_BAD
    assert sum(_rejects_of(index_dir, "guard-override").values()) == MOSTLY_BAD["rejected"]
    # The accepted rows are published; every rejected product keeps its last good row.
    source = source_titles(catalogs["mostly_bad"])
    want = {p: (t if "(new season)" in t else base_titles[p]) for p, t in source.items()}
    assert _published_titles(index_dir) == want
    assert sum("(new season)" in t for t in want.values()) == MOSTLY_BAD["indexed"]
    check_invariants(str(index_dir))


def test_a_first_run_that_accepts_nothing_publishes_nothing(catalogs, tiny_model_dir, tmp_path):
    """All rows rejected on an empty index: held, even with the override; no published tag, no
    products table (an empty index is never published)."""
    from pipelines.indexing.publishing import HELD

    index_dir = tmp_path / "index"
    runs = {"guard-empty": (), "guard-empty-override": ("index.max_reject_fraction=1.0",)}
    for run_id, settings in runs.items():
        rc, out, err = index_command(
            catalogs["all_bad"], index_dir, tiny_model_dir, run_id, *settings
        )
        assert rc == 4, out + err
        assert "no row accepted: 12 of 12 input rows rejected" in out, out
        assert sum(_printed_reasons(out).values()) == N_PRODUCTS
        assert sum(_rejects_of(index_dir, run_id).values()) == N_PRODUCTS
        db = tables.connect(str(index_dir))
        row = tables.find_run(db, run_id)
        assert row["status"] == HELD and row["rejected"] == N_PRODUCTS and row["indexed"] == 0
        assert published_pointer(str(index_dir)) is None
        assert tables.open_published(db) is None
        assert [n for n in tables.table_names(db) if n.startswith("products")] == []
        for name in (tables.RUNS_TABLE, tables.REJECTS_TABLE):
            assert db.open_table(name).tags.list() == {}, name


def test_a_good_run_after_a_held_one_publishes_with_exact_accounting(
    held, catalogs, tiny_model_dir, tmp_path
):
    """The fixed catalog after the held run: published, in == indexed + unchanged + rejected, the
    held run's encoded rows reused from its staging table, every product once."""
    index_dir = tmp_path / "index"
    shutil.copytree(held["dir"], index_dir)
    rc, out, err = index_command(catalogs["fixed"], index_dir, tiny_model_dir, "guard-fixed")
    assert rc == 0, out + err
    db = tables.connect(str(index_dir))
    assert published_pointer(str(index_dir))["run_id"] == "guard-fixed"
    row = tables.find_run(db, "guard-fixed")
    assert _row_counts(row) == FIXED
    assert row["rows_in"] == row["indexed"] + row["unchanged"] + row["rejected"]
    assert "resumed 4)" in out, out  # the held run's 4 encoded rows came from its staging
    assert _published_titles(index_dir) == source_titles(catalogs["fixed"])
    checked = check_invariants(str(index_dir))
    assert checked["complete_runs"] == 2 and checked["incomplete_runs"] == 1, checked
    assert not [n for n in tables.table_names(db) if n.startswith("_staging")]
