"""Table maintenance (``pipelines.maintain``), the writer lease, and incremental index updates.

One index is built in this module by six nightly runs of the real index job (each adds a few
products and changes a few titles; two early ones rewrite every title), checking after each run that
the indexes were updated incrementally and find the new rows. The maintenance test then runs
``python -m pipelines.maintain`` on it and compares every kept tagged version before and after.
Later tests work on copies of the maintained index.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.indexing import tables
from pipelines.indexing.lease import (
    LeaseHeldError,
    LeaseLostError,
    LeaseRecord,
    WriterLease,
    lease_path,
)
from tests.conftest import index_config

LOCAL_YAML = str(Path(__file__).resolve().parents[1] / "configs" / "local.yaml")

N_BASE = 40  # products of the first run
RUNS = 6  # nightly runs: the first indexes everything, each later one changes a few products
CHANGED_PER_RUN = 3  # titles changed per run
# Runs that change every title (a catalogue-wide title rewrite): their old rows become garbage
# that only versions older than the kept runs reference. Without such churn the first maintenance
# cannot shrink the folder: the kept tags still use every old data file, and compaction adds a
# copy of the live rows (freed once those tags age out). See the maintenance test's figures.
RETITLE_ALL_RUNS = (1, 2)
ADDED_PER_RUN = 2  # new products per run
KEEP_RUNS = 3
# A word appended to the titles a run changes or adds: full-text search must find exactly them.
WORDS = ["", "alderwood", "birchwood", "cedarwood", "dogwood", "elmwood"]
OVERRIDES = ["index.ann_min_rows=32", "index.ann_num_partitions=2"]  # an ANN index from run 0


# ---------------------------------------------------------------- helpers
def _walk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _measure(uri: str) -> dict:
    """Per table (staging included): versions on disk, fragments at the latest version, bytes."""
    db = tables.connect(uri)
    out = {}
    for name in sorted(tables.table_names(db)):
        t = db.open_table(name)
        out[name] = {
            "versions": len(t.list_versions()),
            "fragments": len(t.to_lance().get_fragments()),
            "bytes": _walk_bytes(Path(uri) / f"{name}.lance"),
            "tags": {k: v["version"] for k, v in t.tags.list().items()},
        }
    return out


def _totals(measured: dict, names) -> dict:
    return {key: sum(measured[n][key] for n in names) for key in ("versions", "fragments", "bytes")}


def _answers(table, queries: np.ndarray, words: list[str]) -> dict:
    """What a reader gets from this table version: its rows, vector top-5 for fixed queries, and
    every full-text hit with its score (all hits, sorted: BM25 ties come back in any order)."""
    arrow = table.to_arrow()
    rows = sorted(
        json.dumps(r, sort_keys=True, default=str)
        for r in arrow.drop_columns(
            [c for c in ("model_image", "thumbnail") if c in arrow.column_names]
        ).to_pylist()
    )
    out: dict = {"rows": rows}
    if "image_embedding" in arrow.column_names:
        out["vector"] = [
            [
                (r["product_id"], round(r["_distance"], 5))
                for r in table.search(q, vector_column_name="image_embedding")
                .distance_type("cosine")
                .select(["product_id"])
                .limit(5)
                .to_list()
            ]
            for q in queries
        ]
        out["fts"] = {
            w: sorted(
                (r["product_id"], round(r["_score"], 4))
                for r in table.search(w, query_type="fts")
                .select(["product_id"])
                .limit(1000)
                .to_list()
            )
            for w in words
        }
    return out


def _at(db, name: str, tag: str):
    t = db.open_table(name)
    t.checkout(tag)
    return t


def _fts_ids(table, word: str) -> set[str]:
    hits = table.search(word, query_type="fts").select(["product_id"]).limit(1000).to_list()
    return {r["product_id"] for r in hits}


def _changed_in_run(ids_before: list[str], run: int) -> list[str]:
    """Products whose title run ``run`` changes, among those the catalog had before it."""
    if run == 0:
        return []
    if run in RETITLE_ALL_RUNS:
        return list(ids_before)
    return ids_before[CHANGED_PER_RUN * run : CHANGED_PER_RUN * (run + 1)]


def _catalog_for_run(big: pa.Table, run: int, folder: Path) -> dict[str, list[str]]:
    """The catalog of nightly run ``run`` under ``folder/products``: the first N_BASE products plus
    ADDED_PER_RUN more per run; in run k the titles it changes and the products it adds get WORDS[k]
    appended. Returns {"changed": ids changed in this run, "added": ids added}."""
    rows = big.slice(0, N_BASE + ADDED_PER_RUN * run).to_pylist()
    ids = [r["product_id"] for r in rows]
    marks: dict[str, str] = {}
    for k in range(1, run + 1):
        before = N_BASE + ADDED_PER_RUN * (k - 1)
        for pid in _changed_in_run(ids[:before], k) + ids[before : before + ADDED_PER_RUN]:
            marks[pid] = marks.get(pid, "") + " " + WORDS[k]
    for row in rows:
        row["title"] += marks.get(row["product_id"], "")
    if run % 2:  # a bad row now and then, so `rejects` grows by small fragments too
        rows.append({**rows[0], "product_id": f"bad-{run}", "title": "  "})
    (folder / "products").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=big.schema), folder / "products" / "part-00000.parquet"
    )
    if run == 0:
        return {"changed": [], "added": ids}
    before = N_BASE + ADDED_PER_RUN * (run - 1)
    return {"changed": _changed_in_run(ids[:before], run), "added": ids[before:]}


def _ann_segments(table) -> list[tuple[str, list]]:
    """(uuid, IVF centroids) of each segment of the ANN index."""
    old = os.environ.get("LANCE_INCLUDE_VECTOR_CENTROIDS")
    os.environ["LANCE_INCLUDE_VECTOR_CENTROIDS"] = "true"  # they are what shows "no retraining"
    try:
        stats = table.to_lance().stats.index_stats("image_embedding_idx")
    finally:
        if old is None:
            del os.environ["LANCE_INCLUDE_VECTOR_CENTROIDS"]
        else:
            os.environ["LANCE_INCLUDE_VECTOR_CENTROIDS"] = old
    return [(seg["uuid"], seg["centroids"]) for seg in stats["indices"]]


def _maintain_cli(uri: str, *overrides: str) -> int:
    from pipelines.maintain import main

    return main(["--config", LOCAL_YAML, "--index-uri", uri, *overrides])


def _write_lease(uri: str, *, run_id: str, renewed_ago: timedelta, kind: str = "index") -> None:
    """A lease document as another (live or dead) process would have left it."""
    stamp = (datetime.now(timezone.utc) - renewed_ago).isoformat()
    path = Path(lease_path(uri))
    path.parent.mkdir(parents=True, exist_ok=True)
    record = LeaseRecord(kind, run_id, "other-host", 4242, stamp, stamp, "not-ours")
    path.write_text(json.dumps(asdict(record)))


# ---------------------------------------------------------------- the nightly runs
@pytest.fixture(scope="module")
def nightly(tiny_model_dir, ray_local, tmp_path_factory):
    """RUNS nightly runs into a fresh index. After each run the indexes cover every row of the
    published version; after a run that changed a few rows, its rows are found by vector and
    full-text search there, and the ANN index got one more delta segment on the same partitions
    (no retraining). A run that replaced every row leaves the old index nothing live: built anew."""
    from pipelines.catalog.writer import make_catalog
    from pipelines.indexing.job import run_index

    root = tmp_path_factory.mktemp("nightly")
    make_catalog(str(root / "big"), N_BASE + ADDED_PER_RUN * RUNS, seed=5, workers=1)
    big = pq.read_table(root / "big" / "products")
    uri = str(root / "lancedb")
    summaries, marked, segments = [], [], []
    for run in range(RUNS):
        marked.append(_catalog_for_run(big, run, root / f"src{run}"))
        cfg = index_config(root / f"src{run}" / "products", uri, tiny_model_dir, *OVERRIDES)
        s = run_index(cfg, run_id=f"r{run:02d}")
        summaries.append(s)
        assert s["indexed"] == len(marked[run]["changed"]) + len(marked[run]["added"]), s
        assert s["rejected"] == run % 2, s
        products = tables.open_published(tables.connect(uri))[0]
        assert products.version == s["products_version"]
        for name in ("image_embedding_idx", "title_normalized_idx"):
            stats = products.index_stats(name)
            assert stats is not None and stats.num_unindexed_rows == 0, (run, name, stats)
        segments.append(_ann_segments(products))
        if run == 0 or run in RETITLE_ALL_RUNS:  # no live row left in the old index: built anew
            assert s["ann_index"] == "IVF_HNSW_SQ(2)", (run, s["ann_index"])
            assert len(segments[-1]) == 1
            continue
        assert "incrementally" in s["ann_index"], (run, s["ann_index"])
        # a new delta segment beside the old ones, on the same partitions: nothing retrained
        assert [u for u, _ in segments[-1][:-1]] == [u for u, _ in segments[-2]], run
        assert all(c == segments[-2][0][1] for _, c in segments[-1]), run
        want = set(marked[run]["changed"]) | set(marked[run]["added"])
        assert _fts_ids(products, WORDS[run]) == want
        rows = {r["product_id"]: r for r in products.to_arrow().to_pylist()}
        for pid in marked[run]["added"]:
            top = (
                products.search(np.asarray(rows[pid]["image_embedding"], np.float32))
                .distance_type("cosine")
                .select(["product_id"])
                .limit(1)
                .to_list()
            )
            assert top[0]["product_id"] == pid, (run, pid, top)
    return SimpleNamespace(root=root, uri=uri, summaries=summaries, model_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def maintained(nightly):
    """Maintenance through the CLI on the nightly index, with everything recorded around it."""
    import lance
    from lance.fragment import write_fragments

    uri = nightly.uri
    db = tables.connect(uri)
    products_name = nightly.summaries[-1]["products_table"]
    run_ids = [s["run_id"] for s in nightly.summaries]
    kept = run_ids[-KEEP_RUNS:]

    # A staging table as an interrupted run of another model leaves it: committed rows plus data
    # files its workers wrote but nobody committed. Maintenance must not touch any of it.
    staging_uri = str(Path(uri) / "_staging__othermodel.lance")
    lance.write_dataset(pa.table({"x": [1, 2]}), staging_uri)
    lance.write_dataset(pa.table({"x": [3]}), staging_uri, mode="append")
    write_fragments(pa.table({"x": [4, 5]}), staging_uri)
    staging_files = {str(p): p.stat().st_size for p in Path(staging_uri).rglob("*") if p.is_file()}
    # Uncommitted files of a writer in the products table itself: delete_unverified=False keeps
    # them (a live writer's files look exactly like this).
    products_uri = str(Path(uri) / f"{products_name}.lance")
    data_dir = Path(products_uri) / "data"
    committed = set(data_dir.iterdir())
    write_fragments(tables.open_published(db)[0].to_arrow().slice(0, 2), products_uri)
    uncommitted = sorted(set(data_dir.iterdir()) - committed)
    assert uncommitted
    assert all(p.is_file() for p in uncommitted)

    rng = np.random.default_rng(0)
    dim = tables.open_published(db)[0].schema.field("image_embedding").type.list_size
    queries = rng.normal(size=(6, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    titles = tables.open_published(db)[0].to_arrow().column("title_normalized").to_pylist()
    common = Counter(w for t in titles for w in set(t.split()) if w.isalpha() and len(w) > 3)
    words = [w for w in WORDS if w] + [w for w, _ in common.most_common(4)]
    tagged = {
        name: [t for t in db.open_table(name).tags.list() if not t.startswith("run-")]
        + [tables.run_tag(r) for r in kept]
        for name in (products_name, tables.RUNS_TABLE, tables.REJECTS_TABLE)
    }
    answers_before = {
        (name, tag): _answers(_at(db, name, tag), queries, words)
        for name, tags in tagged.items()
        for tag in tags
    }
    published_before = tables.published_run(db)
    before = _measure(uri)
    disk_before = _walk_bytes(Path(uri))

    rc = _maintain_cli(
        uri,
        f"maintain.keep_runs={KEEP_RUNS}",
        "maintain.cleanup_older_than_hours=0",
    )

    db = tables.connect(uri)
    return SimpleNamespace(
        uri=uri,
        rc=rc,
        db=db,
        products_name=products_name,
        run_ids=run_ids,
        kept=kept,
        staging_uri=staging_uri,
        staging_files=staging_files,
        uncommitted=uncommitted,
        queries=queries,
        words=words,
        tagged=tagged,
        answers_before=answers_before,
        published_before=published_before,
        before=before,
        after=_measure(uri),
        disk_before=disk_before,
        disk_after=_walk_bytes(Path(uri)),
    )


# ---------------------------------------------------------------- maintenance
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_maintenance_shrinks_the_index_and_keeps_every_tagged_version(maintained, capsys):
    m = maintained
    assert m.rc == 0
    names = [n for n in m.before if not n.startswith("_staging__")]
    before, after = _totals(m.before, names), _totals(m.after, names)
    lines = [f"{'':<40} {'versions':>9} {'fragments':>10} {'bytes':>19}"]
    for n in names + ["total (tables)"]:
        b, a = (m.before[n], m.after[n]) if n in m.before else (before, after)
        lines.append(
            f"{n[:40]:<40} {b['versions']:>3} -> {a['versions']:<3} {b['fragments']:>3} -> "
            f"{a['fragments']:<4} {b['bytes']:>8} -> {a['bytes']:<8}"
        )
    lines.append(f"{'index folder (all files)':<40} {'':>22} {m.disk_before:>8} -> {m.disk_after}")
    report = "\n".join(lines)
    with capsys.disabled():
        print("\nmaintenance, before -> after:\n" + report)

    # fragment count, version count and disk use all drop
    assert after["versions"] < before["versions"], report
    assert after["fragments"] < before["fragments"], report
    assert after["bytes"] < before["bytes"], report
    assert m.disk_after < m.disk_before, report
    for n in names:  # every table: at most the kept tagged versions plus the latest
        assert m.after[n]["versions"] <= len(set(m.after[n]["tags"].values())) + 1, (n, m.after[n])
        assert m.after[n]["fragments"] == 1, (n, m.after[n])  # every table had rows

    # tags: `published` untouched, the kept runs' tags untouched, every older run-* tag deleted
    for n in names:
        tags_before, tags_after = m.before[n]["tags"], m.after[n]["tags"]
        expected = {
            t: v
            for t, v in tags_before.items()
            if not t.startswith("run-") or t[len("run-") :] in m.kept
        }
        assert tags_after == expected, (n, tags_before, tags_after)
        assert any(t.startswith("run-") for t in tags_before if t not in tags_after)
    assert tables.published_run(m.db) == m.published_before

    # every tagged version still opens and answers exactly as before
    for (name, tag), want in m.answers_before.items():
        got = _answers(_at(m.db, name, tag), m.queries, m.words)
        assert got == want, (name, tag)
    # and the latest (compacted) version holds the published rows
    latest = m.db.open_table(m.products_name)
    published = _at(m.db, m.products_name, tables.PUBLISHED)
    assert (
        _answers(latest, m.queries, m.words)["rows"]
        == _answers(published, m.queries, m.words)["rows"]
    )

    # staging untouched, a writer's uncommitted files kept
    staging_now = {str(p): p.stat().st_size for p in Path(m.staging_uri).rglob("*") if p.is_file()}
    assert staging_now == m.staging_files
    assert all(p.is_file() for p in m.uncommitted)
    assert not Path(lease_path(m.uri)).exists()  # the lease was released


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_maintenance_refuses_beside_a_live_writer_and_takes_over_a_stale_lease(
    maintained, tmp_path, capsys
):
    uri = str(shutil.copytree(maintained.uri, tmp_path / "lancedb"))
    before = _measure(uri)
    _write_lease(uri, run_id="r-live", renewed_ago=timedelta(minutes=1))
    assert _maintain_cli(uri, "maintain.keep_runs=1", "maintain.cleanup_older_than_hours=0") == 3
    err = capsys.readouterr().err
    assert "r-live" in err and "other-host" in err and "pid 4242" in err, err
    assert _measure(uri) == before  # nothing touched

    _write_lease(uri, run_id="r-dead", renewed_ago=timedelta(hours=4))  # limit: 180 minutes
    assert _maintain_cli(uri, "maintain.keep_runs=1", "maintain.cleanup_older_than_hours=0") == 0
    out = capsys.readouterr().out
    assert "took over a stale writer lease" in out and "r-dead" in out, out
    run_tags = {t for t in _measure(uri)[tables.RUNS_TABLE]["tags"] if t.startswith("run-")}
    assert run_tags == {tables.run_tag(maintained.run_ids[-1])}
    assert not Path(lease_path(uri)).exists()


def test_maintenance_exits_2_on_bad_configuration(tmp_path, capsys):
    assert _maintain_cli(str(tmp_path), "maintain.keep_runs=0") == 2
    assert "maintain.keep_runs" in capsys.readouterr().err
    assert _maintain_cli(str(tmp_path / "nowhere")) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_index_job_refuses_a_second_writer(nightly, tiny_model_dir, tmp_path, capsys):
    from pipelines.index_catalog import main
    from pipelines.indexing.job import run_index

    uri = nightly.uri
    source = nightly.root / "src0" / "products"
    cfg = index_config(source, uri, tiny_model_dir, *OVERRIDES)
    holder = WriterLease(uri, kind="index", run_id="r-first", stale_after=timedelta(minutes=5))
    with holder:
        versions = {n: v["versions"] for n, v in _measure(uri).items()}
        with pytest.raises(LeaseHeldError, match="r-first") as info:
            run_index(cfg, run_id="r-second")
        assert info.value.holder.run_id == "r-first"
        args = ["--config", LOCAL_YAML, "--source", str(source), "--index-uri", uri]
        args += ["--model", str(tiny_model_dir), *OVERRIDES]
        assert main(args) == 3
        assert "r-first" in capsys.readouterr().err
        assert {n: v["versions"] for n, v in _measure(uri).items()} == versions
    assert not Path(lease_path(uri)).exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_after_index_runs_maintenance_under_the_runs_lease(
    maintained, nightly, tiny_model_dir, tmp_path
):
    from pipelines.indexing.job import run_index

    uri = str(shutil.copytree(maintained.uri, tmp_path / "lancedb"))
    shutil.rmtree(Path(uri) / "_staging__othermodel.lance")
    source = nightly.root / f"src{RUNS - 1}" / "products"
    catalog = pq.read_table(source)
    rows = catalog.to_pylist()
    rows[0]["title"] += " hazelwood"
    (tmp_path / "src" / "products").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=catalog.schema),
        tmp_path / "src" / "products" / "part-00000.parquet",
    )
    cfg = index_config(
        tmp_path / "src" / "products",
        uri,
        tiny_model_dir,
        *OVERRIDES,
        "maintain.after_index=true",
        "maintain.keep_runs=2",
        "maintain.cleanup_older_than_hours=0",
    )
    s = run_index(cfg, run_id="r-after")
    done = s["maintenance"]
    assert "error" not in done and not done["errors"], done
    assert done["maintenance_id"] == "after-r-after"
    assert set(done["kept_runs"]) == {"r-after", maintained.run_ids[-1]}
    db = tables.connect(uri)
    assert tables.published_run(db)["run_id"] == "r-after"
    products = tables.open_published(db)[0]
    assert _fts_ids(products, "hazelwood") == {rows[0]["product_id"]}
    for name in (s["products_table"], tables.RUNS_TABLE, tables.REJECTS_TABLE):
        t = db.open_table(name)
        assert {x for x in t.tags.list() if x.startswith("run-")} == {
            "run-r-after",
            tables.run_tag(maintained.run_ids[-1]),
        }
        assert len(t.to_lance().get_fragments()) == 1
    assert not Path(lease_path(uri)).exists()


# ---------------------------------------------------------------- the lease itself
def _lease_protocol(uri: str, s3=None) -> None:
    """acquire / refuse / renew / release, stale takeover, the renewing context manager."""
    import time

    def _lease(run_id, stale=timedelta(minutes=5), kind="index") -> WriterLease:
        return WriterLease(uri, s3, kind=kind, run_id=run_id, stale_after=stale)

    first = _lease("r-one")
    first.acquire()
    stored = first.read()
    assert stored is not None and stored.run_id == "r-one" and stored.kind == "index"
    assert stored.pid == os.getpid()
    with pytest.raises(LeaseHeldError, match="r-one") as info:
        _lease("m-two", kind="maintain").acquire()
    assert "refusing to start maintain run m-two" in str(info.value)
    first.renew()
    assert first.read().renewed_at >= stored.renewed_at
    first.release()
    assert first.read() is None

    # a lease nobody renewed is a dead writer's: taken over, and the dead one notices at once
    dead = _lease("r-dead", stale=timedelta(seconds=0.5))
    dead.acquire()
    taker = _lease("r-taker", stale=timedelta(seconds=0.5))
    with pytest.raises(LeaseHeldError):
        taker.acquire()
    time.sleep(0.6)
    taker.acquire()
    assert taker.took_over is not None and taker.took_over.run_id == "r-dead"
    with pytest.raises(LeaseLostError, match="r-taker"):
        dead.check()
    with pytest.raises(LeaseLostError):
        dead.renew()
    dead.release()  # not ours any more: left in place
    assert taker.read().run_id == "r-taker"
    taker.release()

    # the context manager renews from its thread and releases at the end
    with _lease("r-ctx", stale=timedelta(seconds=1.5)) as lease:
        first_stamp = lease.read().renewed_at
        time.sleep(1.2)  # renewed every 0.5 s
        assert lease.read().renewed_at > first_stamp
        lease.check()
    assert lease.read() is None


def test_writer_lease_on_a_local_folder(tmp_path, caplog):
    uri = str(tmp_path / "index")
    _lease_protocol(uri)
    assert "taking over a stale writer lease" in caplog.text
    assert not list((tmp_path / "index" / "_locks").glob("*.tmp"))
    with pytest.raises(ValueError, match="kind"):
        WriterLease(uri, kind="reader", run_id="x", stale_after=timedelta(minutes=1))


def test_a_dead_process_lease_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    """What a job killed with SIGKILL leaves: a fresh lease whose process is gone. Its rerun on
    the same host (the resume after a crash) need not wait for the lease to go stale."""
    import socket
    import subprocess
    import sys

    uri = str(tmp_path / "index")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    stamp = datetime.now(timezone.utc).isoformat()
    path = Path(lease_path(uri))
    path.parent.mkdir(parents=True)
    record = LeaseRecord(
        "index", "r-killed", socket.gethostname(), int(dead.stdout), stamp, stamp, "x"
    )
    path.write_text(json.dumps(asdict(record)))
    lease = WriterLease(uri, kind="index", run_id="r-rerun", stale_after=timedelta(hours=3))
    lease.acquire()
    assert lease.took_over == record
    assert "dead process" in caplog.text and "r-killed" in caplog.text
    lease.release()


def test_writer_lease_on_s3(s3_server, s3_bucket):
    from pipelines.storage import S3Settings

    settings = S3Settings(endpoint_url=s3_server, region="us-east-1", allow_http=True)
    _lease_protocol(f"s3://{s3_bucket}/index", settings)


# ---------------------------------------------------------------- the keep rule, on S3
def test_maintenance_on_s3_keeps_a_rolled_back_run(s3_server, s3_bucket):
    """A small index written directly (no Ray) on S3: five runs, then `published` moved back to
    run 1 on every table, as `pipelines.publish` does for a rollback. With keep_runs=2 the tags of
    runs 3 and 4 (newest) and 1 (published) stay, those of runs 0 and 2 go, and the rolled-back
    version still answers as before."""
    from pipelines.config import load_config
    from pipelines.indexing.maintenance import run_maintenance
    from pipelines.storage import S3Settings

    settings = S3Settings(endpoint_url=s3_server, region="us-east-1", allow_http=True)
    uri = f"s3://{s3_bucket}/lancedb"
    db = tables.connect(uri, settings)
    products_name = "products__fake"
    schema = pa.schema([("product_id", pa.string()), ("title", pa.string())])
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    for i in range(5):
        rows = pa.table({"product_id": [f"p{i}"], "title": [f"title {i}"]}, schema=schema)
        products = tables.append(db, products_name, schema, rows)
        run_row = {
            "run_id": f"run{i}",
            "finished_at": start + timedelta(days=i),
            "products_table": products_name,
            "products_version": products.version,
        }
        runs = tables.append(
            db,
            tables.RUNS_TABLE,
            tables.RUNS_SCHEMA,
            pa.Table.from_pylist([run_row], schema=tables.RUNS_SCHEMA),
        )
        for t in (products, runs):
            tables.move_tag(t, tables.run_tag(f"run{i}"), t.version)
            tables.move_tag(t, tables.PUBLISHED, t.version)
    for name in (products_name, tables.RUNS_TABLE):  # the rollback
        t = db.open_table(name)
        tables.move_tag(t, tables.PUBLISHED, t.tags.list()["run-run1"]["version"])
    assert tables.published_run(db)["run_id"] == "run1"
    rolled_back = _at(db, products_name, tables.PUBLISHED).to_arrow()

    cfg = load_config(
        None,
        [
            f"index.uri={uri}",
            f"s3.endpoint_url={s3_server}",
            "s3.region=us-east-1",
            "s3.allow_http=true",
            "maintain.keep_runs=2",
            "maintain.cleanup_older_than_hours=0",
        ],
    )
    s = run_maintenance(cfg)
    assert s["kept_runs"] == {"run4": "newest", "run3": "newest", "run1": "published"}
    assert not s["errors"] and s["totals"]["tags_deleted"] == 4
    db = tables.connect(uri, settings)
    for name in (products_name, tables.RUNS_TABLE):
        t = db.open_table(name)
        assert set(t.tags.list()) == {"published", "run-run1", "run-run3", "run-run4"}
        assert len(t.list_versions()) == 4  # three tagged versions and the latest
        assert len(t.to_lance().get_fragments()) == 1
    assert tables.published_run(db)["run_id"] == "run1"
    assert _at(db, products_name, tables.PUBLISHED).to_arrow() == rolled_back
    assert db.open_table(products_name).count_rows() == 5
    assert s["totals"]["versions_after"] < s["totals"]["versions_before"]
    assert (
        WriterLease(uri, settings, kind="maintain", run_id="x", stale_after=timedelta(1)).read()
        is None
    )
