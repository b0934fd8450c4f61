"""SIGKILL the index job at moments spread over a whole run, then rerun it.

The job (``python -m pipelines.index_catalog``, a driver process of its own on the session's Ray,
as a submitted Ray job is) logs a ``phase: <name> ...`` line as it enters each step. The test reads
its output line by line and SIGKILLs its process group when the line of the kill point appears
(never after a fixed sleep): reading and encoding, staging commits, the merge, the index build,
the ``runs`` row, the tag moves. All kills hit one index, one after the other, so each killed run
starts from what the dead ones left (their staging table, a merged but untagged version, a stale
writer lease). After each kill:

- ``published`` (the service's pointer) is where it was, and a reader pinned to the published
  version before the first kill reads the same rows and top-k; only a kill among the tag moves may
  find the run published, and then as a complete run;
- every tagged products version opens, answers a vector query and holds each product_id once;
  every completed run's accounting holds (``tests.test_faults.check_invariants``).

At the end one rerun completes and publishes with exact accounting. The phase each kill actually
landed in (the driver's last phase line) and what it left are printed (``-s``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.indexing import tables
from pipelines.search.snapshot import published_pointer
from tests.conftest import index_config
from tests.test_faults import PinnedReader, _titles, check_invariants
from tests.test_index_catalog_runtime import REPO, _job_env, _kill_session

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]

N_PRODUCTS = 24
ROWS_PER_FILE = 8  # 3 files
RETITLED_PER_FILE = 4  # 12 rows to encode: 3 staging commits of 4
FAST = ("encode.batch_size=1", "index.stage_flush_rows=4")  # one file per encoder task
# (kill point, the log line that triggers it), in the order of a run.
KILL_POINTS = (
    ("encode", re.compile(r"phase: encode started")),  # reading, validating, encoding
    ("staging", re.compile(r"phase: staging committed")),
    ("merge", re.compile(r"phase: merge started")),
    ("indexes", re.compile(r"phase: indexes started")),
    ("record", re.compile(r"phase: record started")),
    ("tags", re.compile(r"tables: tag run-\S+ -> version")),  # after the first tag move
)
PHASE = re.compile(r"phase: (\w+)")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict:
    """(base catalog, changed catalog, the changed catalog's titles): the first 4 rows of every
    file retitled, plus a file with one new product whose image is no image (rejected)."""
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("kill_catalog")
    make_catalog(str(root / "base"), N_PRODUCTS, seed=5, rows_per_file=ROWS_PER_FILE, workers=1)
    base = root / "base" / "products"
    changed = root / "changed" / "products"
    changed.mkdir(parents=True)
    parts = sorted(base.glob("part-*.parquet"))
    for part in parts:
        t = pq.read_table(part)
        titles = t.column("title").to_pylist()
        n = RETITLED_PER_FILE
        titles[:n] = [f"{x} (kill-point edition)" for x in titles[:n]]
        pq.write_table(_with(t, "title", titles), changed / part.name)
    bad = pq.read_table(parts[0]).slice(0, 1)
    bad = _with(_with(bad, "product_id", ["pkill-corrupt"]), "image", [b"no image"])
    pq.write_table(bad, changed / f"part-{len(parts):05d}.parquet")
    expected = {"in": N_PRODUCTS + 1, "rejected": 1, "changed": RETITLED_PER_FILE * len(parts)}
    return {"base": base, "changed": changed, "expected": expected}


def _with(t: pa.Table, column: str, values: list) -> pa.Table:
    field = t.schema.field(column)
    return t.set_column(t.schema.get_field_index(column), field, pa.array(values, field.type))


def _kill_at(cmd: list[str], trigger: re.Pattern, timeout_s: float = 120) -> dict:
    """Start the job, SIGKILL its process group when a line matches ``trigger``; what it printed
    up to its death, and its last phase line."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    watchdog = threading.Timer(timeout_s, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    lines, trigger_line, started, seen = [], None, time.perf_counter(), {}
    try:
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace").rstrip())
            m = PHASE.search(lines[-1])
            if m:
                seen.setdefault(m.group(1), round(time.perf_counter() - started, 1))
            if trigger.search(lines[-1]):
                os.killpg(proc.pid, signal.SIGKILL)
                trigger_line = lines[-1]
                break
        lines += proc.stdout.read().decode(errors="replace").splitlines()  # written before death
    finally:
        watchdog.cancel()
        leaked = _kill_session(proc)
    assert not leaked, f"processes left behind by the job: {leaked}"
    assert trigger_line is not None, f"never reached {trigger.pattern!r}:\n" + "\n".join(
        lines[-60:]
    )
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    phases = [m.group(1) for m in map(PHASE.search, lines) if m]
    return {"trigger": trigger_line, "last_phase": phases[-1], "phases": phases, "seen_at": seen}


def _left_behind(index_dir: Path, run_id: str, products_name: str) -> dict:
    """What a killed run left: staged rows, the products table's newest version, its runs row,
    the tables its run tag is on."""
    db = tables.connect(str(index_dir))
    names = tables.table_names(db)
    staging = [n for n in names if n.startswith("_staging__")]
    return {
        "staged_rows": db.open_table(staging[0]).count_rows() if staging else 0,
        "products_latest_version": db.open_table(products_name).version,
        "runs_row": tables.find_run(db, run_id) is not None,
        "run_tag_on": sorted(
            n for n in names if tables.run_tag(run_id) in db.open_table(n).tags.list()
        ),
    }


def _check_after_kill(index_dir: Path, run_id: str, before: dict, pinned: PinnedReader) -> str:
    """The invariants after a kill; returns who is published (``before`` or ``killed run``)."""
    now = published_pointer(str(index_dir))
    checked = check_invariants(str(index_dir), pinned=pinned)
    assert checked["tagged_versions"] >= 2, checked  # published + the base run's run tag
    if now == before:
        return "before"
    # Only the tag moves may have switched readers, and then to the whole killed run.
    assert now["run_id"] == run_id, (now, before)
    db = tables.connect(str(index_dir))
    for name in (now["products_table"], tables.RUNS_TABLE, tables.REJECTS_TABLE):
        assert tables.run_tag(run_id) in db.open_table(name).tags.list(), name
    return "killed run"


def test_sigkill_at_every_phase_then_rerun(ray_local, tiny_model_dir, catalog, tmp_path):
    import ray

    from pipelines.indexing.job import run_index

    t0 = time.perf_counter()
    index_dir = tmp_path / "index"
    base = run_index(index_config(catalog["base"], index_dir, tiny_model_dir, *FAST))
    assert (base["indexed"], base["rejected"]) == (N_PRODUCTS, 0), base
    before = published_pointer(str(index_dir))
    pinned = PinnedReader(tables.connect(str(index_dir)))
    cmd = [
        sys.executable, "-m", "pipelines.index_catalog", "--config", "configs/local.yaml",
        f"source.uri={catalog['changed']}", f"index.uri={index_dir}",
        f"model.name_or_path={tiny_model_dir}",
        f"ray.address={ray.get_runtime_context().gcs_address}", *FAST,
    ]  # fmt: skip
    reached = {}
    for point, trigger in KILL_POINTS:
        run_id = f"kill-at-{point}"
        t = time.perf_counter()
        died = _kill_at([*cmd, "--run-id", run_id], trigger)
        published = _check_after_kill(index_dir, run_id, before, pinned)
        if point != "tags":
            assert published == "before", (point, died)
        reached[point] = {
            "landed_in": died["last_phase"],
            "published": published,
            **_left_behind(index_dir, run_id, before["products_table"]),
            "seconds": round(time.perf_counter() - t, 1),
            "phase_seen_at_s": died["seen_at"],
        }
        print(f"\n[kill] {point}: {reached[point]}")
        assert point in died["phases"], died  # the kill came at or after its phase's line

    # The rerun: exact accounting, every product once, the changed catalog's accepted rows.
    db = tables.connect(str(index_dir))
    products = db.open_table(before["products_table"])
    # A kill among the tag moves may have moved the products table's tag already: its rows are
    # then what the rerun compares with (nothing left to encode).
    baseline = products.tags.list()[tables.PUBLISHED]["version"]
    expected = catalog["expected"]
    changed = expected["changed"] if baseline == before["products_version"] else 0
    t = time.perf_counter()
    s = run_index(index_config(catalog["changed"], index_dir, tiny_model_dir, *FAST))
    assert (s["in"], s["indexed"], s["unchanged"], s["rejected"]) == (
        expected["in"], changed, expected["in"] - expected["rejected"] - changed,
        expected["rejected"],
    ), s  # fmt: skip
    assert s["in"] == s["indexed"] + s["unchanged"] + s["rejected"]
    assert s["indexed"] == s["encoded_this_run"] + s["resumed_from_staging"], s
    assert published_pointer(str(index_dir))["run_id"] == s["run_id"]
    products, _ = tables.open_published(tables.connect(str(index_dir)))
    rows = products.search().select(["product_id", "title"]).limit(None).to_arrow()
    got = dict(
        zip(rows.column("product_id").to_pylist(), rows.column("title").to_pylist(), strict=True)
    )
    want = {p: t for p, t in _titles(catalog["changed"]).items() if p != "pkill-corrupt"}
    assert rows.num_rows == len(got) == N_PRODUCTS and got == want
    checked = check_invariants(str(index_dir), pinned=pinned)
    print(
        f"\n[kill] rerun: indexed {s['indexed']} (encoded {s['encoded_this_run']}, resumed "
        f"{s['resumed_from_staging']}), {round(time.perf_counter() - t, 1)}s; {checked}; "
        f"total {round(time.perf_counter() - t0, 1)}s"
    )
