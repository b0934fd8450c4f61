"""Fault injection: the index job under a flaky S3, an encoder actor that dies, a driver SIGKILLed
between writing data and moving the tags, two index jobs on one index at once; and the search
service losing one of its two model replicas under client load.

Every index fault is followed by the same invariant check (:func:`check_invariants`):
- per-run accounting: for every ``runs`` row whose ``run-<id>`` tag exists,
  ``rows_in == indexed + unchanged + rejected`` and ``rejects`` holds exactly ``rejected`` rows of
  that run_id;
- ``products`` at every tagged version opens, answers a vector query, has the products schema and
  no duplicate product_id;
- a reader pinned to ``published`` before the fault (the table object kept) returns identical
  results after it (vector top-k for fixed query vectors, every row's product_id/content_hash).

Fault hooks: ``pipelines/faults.py`` (``BLIP_FAULTS``); the flaky S3 proxy: ``tests/flaky_s3.py``.
One catalog (48 products in 6 files), one base index copied per test, and one fault-free run of the
changed catalog that the fault runs are compared with. The measured figures are printed (``-s``)
and written as JSON to the path printed first.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.indexing import tables
from pipelines.storage import S3Settings
from tests.conftest import SEARCH_LIGHT, index_config
from tests.flaky_s3 import Faults, FlakyS3
from tests.test_index_catalog_runtime import REPO, _job_env, _kill_session, _tail

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

N_PRODUCTS = 48
ROWS_PER_FILE = 8  # 6 files
N_FILES = N_PRODUCTS // ROWS_PER_FILE
TOP_K = 5
FAST = ("encode.batch_size=8", "index.stage_flush_rows=8")


# ---- the figures this module reports ----------------------------------------------------------
class Report:
    def __init__(self, path: Path):
        self.path = path
        self.figures: dict = {}

    def record(self, name: str, figures: dict) -> None:
        self.figures[name] = figures
        print(f"\n[faults] {name}: {json.dumps(figures, sort_keys=True, default=str)}")
        self.path.write_text(json.dumps(self.figures, indent=1, sort_keys=True, default=str))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    r = Report(tmp_path_factory.mktemp("fault_report") / "faults.json")
    print(f"\n[faults] figures -> {r.path}")
    yield r
    print(f"\n[faults] figures written to {r.path}")


# ---- catalogs --------------------------------------------------------------------------------------
def _parts(products: Path) -> list[Path]:
    return sorted(products.glob("part-*.parquet"))


def _with_titles(t: pa.Table, titles: dict[str, str]) -> pa.Table:
    ids = t.column("product_id").to_pylist()
    new = [titles.get(p, old) for p, old in zip(ids, t.column("title").to_pylist(), strict=True)]
    i = t.schema.get_field_index("title")
    return t.set_column(i, t.schema.field("title"), pa.array(new, pa.string()))


def derive_catalog(
    src: Path, dst: Path, files: range, suffix: dict[str, str] | None = None
) -> Path:
    """A catalog of some of ``src``'s files, titles of the products in ``suffix`` suffixed."""
    dst.mkdir(parents=True)
    for part in [_parts(src)[i] for i in files]:
        t = pq.read_table(part)
        ids = t.column("product_id").to_pylist()
        titles = {
            p: f"{title}{suffix[p]}"
            for p, title in zip(ids, t.column("title").to_pylist(), strict=True)
            if suffix and p in suffix
        }
        pq.write_table(_with_titles(t, titles), dst / part.name)
    return dst


def _titles(products: Path) -> dict[str, str]:
    out = {}
    for part in _parts(products):
        t = pq.read_table(part, columns=["product_id", "title"])
        out.update(
            zip(t.column("product_id").to_pylist(), t.column("title").to_pylist(), strict=True)
        )
    return out


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """(base catalog, changed catalog, expected counts of a run of the changed one on the base).

    Changed: the first product of every file retitled (6 to encode), one new product (1 to encode),
    an extra row repeating an existing product_id with another title (both rows rejected:
    "duplicate product_id"; the product keeps its published row), a row with corrupt image bytes
    (rejected at decode)."""
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("fault_catalog")
    make_catalog(str(root / "base"), N_PRODUCTS, seed=7, rows_per_file=ROWS_PER_FILE, workers=1)
    base = root / "base" / "products"
    parts = _parts(base)
    assert len(parts) == N_FILES
    changed = root / "changed" / "products"
    changed.mkdir(parents=True)
    retitled = []
    for part in parts:
        t = pq.read_table(part)
        pid = t.column("product_id")[0].as_py()
        retitled.append(pid)
        pq.write_table(
            _with_titles(t, {pid: t.column("title")[0].as_py() + " (2027 model)"}),
            changed / part.name,
        )
    first = pq.read_table(parts[0])
    dup_id = first.column("product_id")[3].as_py()
    extra = first.slice(3, 3)  # rows 3, 4, 5 of the first file: three rows to rewrite
    extra = extra.set_column(
        extra.schema.get_field_index("product_id"),
        extra.schema.field("product_id"),
        pa.array([dup_id, "pfault-corrupt", "pfault-new"], pa.string()),
    )
    extra = _with_titles(extra, {dup_id: "a duplicate row of an existing product"})
    img = extra.column("image").to_pylist()
    img[1] = b"\xff\xd8\xff\xe0 this is not a JPEG " * 8
    extra = extra.set_column(
        extra.schema.get_field_index("image"),
        extra.schema.field("image"),
        pa.array(img, pa.binary()),
    )
    extra = _with_titles(extra, {"pfault-corrupt": "broken image", "pfault-new": "a new product"})
    pq.write_table(extra, changed / f"part-{N_FILES:05d}.parquet")
    expected = {
        "in": N_PRODUCTS + 3,
        "indexed": len(retitled) + 1,
        "rejected": 3,
        "unchanged": N_PRODUCTS - len(retitled) - 1,
    }
    return base, changed, expected, {"retitled": retitled, "duplicate": dup_id}


@pytest.fixture(scope="module")
def base_index(ray_local, tiny_model_dir, catalog, tmp_path_factory, report):
    """The base catalog indexed and published once; tests start from copies of it."""
    from pipelines.indexing.job import run_index

    base, _, _, _ = catalog
    path = tmp_path_factory.mktemp("fault_base") / "index"
    t = time.perf_counter()
    s = run_index(index_config(base, path, tiny_model_dir, *FAST))
    assert s["indexed"] == N_PRODUCTS and s["rejected"] == 0, s
    report.record("base_run", {**_counts(s), "seconds": round(time.perf_counter() - t, 1)})
    return path


@pytest.fixture(scope="module")
def reference(base_index, tiny_model_dir, catalog, tmp_path_factory, report):
    """The fault-free run of the changed catalog on a copy of the base: what every fault run of
    the same catalog must produce (rows sorted by product_id)."""
    from pipelines.indexing.job import run_index

    _, changed, expected, changes = catalog
    path = tmp_path_factory.mktemp("fault_reference") / "index"
    shutil.copytree(base_index, path)
    s = run_index(index_config(changed, path, tiny_model_dir, *FAST))
    assert _counts(s) == expected, s
    check_invariants(str(path))
    report.record("reference_run", _counts(s))
    rows = _published_rows(tables.connect(str(path)))
    base_rows = _published_rows(tables.connect(str(base_index)))
    ids = rows.column("product_id").to_pylist()
    assert "pfault-new" in ids and "pfault-corrupt" not in ids
    assert ids == sorted([*base_rows.column("product_id").to_pylist(), "pfault-new"])
    # The product whose new rows were rejected (duplicate product_id) keeps its last good row.
    hashes = dict(zip(ids, rows.column("content_hash").to_pylist(), strict=True))
    base_hashes = dict(
        zip(
            base_rows.column("product_id").to_pylist(),
            base_rows.column("content_hash").to_pylist(),
            strict=True,
        )
    )
    assert hashes[changes["duplicate"]] == base_hashes[changes["duplicate"]]
    assert all(hashes[p] != base_hashes[p] for p in changes["retitled"])
    return rows


def _counts(s: dict) -> dict:
    return {k: s[k] for k in ("in", "indexed", "unchanged", "rejected")}


def _copy_base(base_index: Path, dst: Path) -> Path:
    shutil.copytree(base_index, dst)
    return dst


# ---- the invariant -------------------------------------------------------------------------------
def _published_rows(db) -> pa.Table:
    products = tables.open_published(db)[0]
    assert products is not None, "nothing published"
    return _all_rows(products)


def _all_rows(table) -> pa.Table:
    cols = ["product_id", "title", "content_hash", "image_embedding"]
    return table.search().select(cols).limit(None).to_arrow().sort_by("product_id")


def _embeddings(rows: pa.Table) -> np.ndarray:
    return np.stack(rows.column("image_embedding").to_numpy(zero_copy_only=False)).astype(
        np.float32
    )


def _query_vectors(dim: int) -> np.ndarray:
    q = np.random.default_rng(1234).standard_normal((4, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


class PinnedReader:
    """A reader that opened ``published`` before the fault and keeps its table object."""

    def __init__(self, db):
        self.table = tables.open_published(db)[0]
        assert self.table is not None
        self.version = self.table.version
        self.before = self.read()

    def read(self) -> dict:
        rows = self.table.search().select(["product_id", "content_hash"]).limit(None).to_arrow()
        dim = self.table.schema.field("image_embedding").type.list_size
        hits = [
            [
                (r["product_id"], float(r["_distance"]))
                for r in self.table.search(q)
                .distance_type("cosine")
                .select(["product_id", "_distance"])
                .limit(TOP_K)
                .to_list()
            ]
            for q in _query_vectors(dim)
        ]
        pairs = sorted(
            zip(
                rows.column("product_id").to_pylist(),
                rows.column("content_hash").to_pylist(),
                strict=True,
            )
        )
        return {"rows": pairs, "top_k": hits}

    def assert_unchanged(self) -> None:
        assert self.table.version == self.version
        after = self.read()
        assert after["rows"] == self.before["rows"], "pinned reader: rows changed under it"
        assert after["top_k"] == self.before["top_k"], "pinned reader: top-k changed under it"


def _expected_products_fields(products) -> list[tuple[str, pa.DataType]]:
    from pipelines.config import AppConfig

    dim = products.schema.field("image_embedding").type.list_size
    meta_names = AppConfig().source.metadata_columns
    meta = [products.schema.field(n) for n in meta_names if n in products.schema.names]
    return [(f.name, f.type) for f in tables.products_schema(dim, meta)]


def check_invariants(
    index_uri: str, s3: S3Settings | None = None, pinned: PinnedReader | None = None
) -> dict:
    """The invariant of every fault test (module docstring); returns what it checked."""
    db = tables.connect(index_uri, s3)
    names = tables.table_names(db)
    runs = db.open_table(tables.RUNS_TABLE).to_arrow().to_pylist()  # latest version
    rejects = db.open_table(tables.REJECTS_TABLE).search().select(["run_id"]).limit(None).to_arrow()
    rejects_by_run = Counter(rejects.column("run_id").to_pylist())
    tags_of = {
        name: db.open_table(name).tags.list()
        for name in {r["products_table"] for r in runs}
        if name in names
    }
    complete, incomplete = [], []
    for r in runs:
        if tables.run_tag(r["run_id"]) not in tags_of.get(r["products_table"], {}):
            incomplete.append(r["run_id"])  # died before its tags: readers ignore it
            continue
        complete.append(r["run_id"])
        assert r["rows_in"] == r["indexed"] + r["unchanged"] + r["rejected"], r
        assert rejects_by_run[r["run_id"]] == r["rejected"], (r, rejects_by_run[r["run_id"]])
    versions_checked = 0
    for name, tags in tags_of.items():
        for tag, info in tags.items():
            t = db.open_table(name)
            t.checkout(info["version"])
            n = t.count_rows()
            ids = t.search().select(["product_id"]).limit(None).to_arrow().column("product_id")
            assert len(ids) == n and pc.count_distinct(ids).as_py() == n, (
                f"{name}@{tag}: duplicate product_id"
            )
            assert [(f.name, f.type) for f in t.schema] == _expected_products_fields(t), (
                f"{name}@{tag}"
            )
            q = _query_vectors(t.schema.field("image_embedding").type.list_size)[0]
            hits = (
                t.search(q)
                .distance_type("cosine")
                .select(["product_id", "_distance"])
                .limit(TOP_K)
                .to_list()
            )
            assert len(hits) == min(TOP_K, n), f"{name}@{tag}: vector search"
            versions_checked += 1
    if pinned is not None:
        pinned.assert_unchanged()
    return {
        "complete_runs": len(complete),
        "incomplete_runs": len(incomplete),
        "tagged_versions": versions_checked,
    }


def _run_row(db, run_id: str) -> dict:
    row = tables.find_run(db, run_id)
    assert row is not None, run_id
    return {
        "in": row["rows_in"],
        "indexed": row["indexed"],
        "unchanged": row["unchanged"],
        "rejected": row["rejected"],
    }


def _assert_same_rows(got: pa.Table, want: pa.Table, atol: float = 1e-6) -> float:
    assert got.column("product_id").to_pylist() == want.column("product_id").to_pylist()
    assert got.column("content_hash").to_pylist() == want.column("content_hash").to_pylist()
    diff = float(np.abs(_embeddings(got) - _embeddings(want)).max())
    assert diff <= atol, f"embeddings differ by {diff}"
    return diff


def _start(
    source: Path, index_dir: Path, model_dir: Path, log: Path, run_id: str, **env: str
) -> subprocess.Popen:
    """The index CLI as a job of the session's Ray cluster (as `ray job submit` runs one): a
    driver process of its own on the cluster's workers. A SIGKILL kills the driver; the cluster
    stays and ends the job's workers. (Half the time of a job starting a Ray of its own.)"""
    import ray

    cmd = [
        sys.executable, "-m", "pipelines.index_catalog", "--config", "configs/local.yaml",
        f"source.uri={source}", f"index.uri={index_dir}", f"model.name_or_path={model_dir}",
        f"ray.address={ray.get_runtime_context().gcs_address}", "--run-id", run_id, *FAST,
    ]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_job_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        proc.wait(timeout=timeout)
    finally:
        leaked = _kill_session(proc)  # whatever the driver left in its session
    assert not leaked, f"processes left behind by the job: {leaked}"
    return proc.returncode


# ---- 0. the fault plan itself (no Ray) ---------------------------------------------------------
def test_fault_plan_parsing(tmp_path):
    from pipelines.faults import FaultPlan, encoder_exit_once, kill_before_tags

    assert not FaultPlan.from_env({}) and not FaultPlan.parse(" , ")
    plan = FaultPlan.parse(f" encoder_exit_once={tmp_path / 'm'} , kill_before_tags ")
    assert plan == FaultPlan(encoder_exit_once=str(tmp_path / "m"), kill_before_tags=True)
    for bad, why in (
        ("encoder_exit_once", "needs a marker"),
        ("kill_before_tags=1", "takes no value"),
        ("kill_befor_tags", "unknown fault point 'kill_befor_tags'"),
    ):
        with pytest.raises(ValueError, match=why):
            FaultPlan.parse(bad)
    (tmp_path / "m").write_text("1")  # the marker exists: the fault already fired, a no-op now
    encoder_exit_once(plan)
    encoder_exit_once(None)
    kill_before_tags(FaultPlan())


# ---- 1. flaky S3 ------------------------------------------------------------------------------
S3_FAULT_PLANS = {
    # Two SlowDowns on every key, then a reset on the first request of every key under a Lance
    # dataset (data files, manifests, transactions) or a body cut short on the first GET of every
    # Parquet file: four attempts for such a key, within s3.max_attempts (10) for pyarrow and
    # Lance's own retries. (With pyarrow's default of three attempts this plan failed: cleanly,
    # `published` untouched.)
    "slowdown2_reset_truncate": Faults(slowdown=2, reset_match=".lance", truncate_match=".parquet"),
}


def test_flaky_s3_retries_or_fails_cleanly(
    ray_local, tiny_model_dir, catalog, base_index, reference, s3_server, s3_bucket, report
):
    """Through a flaky S3 (503 SlowDown per key, a reset on the first request of every Lance key,
    a body cut short on the first GET of every Parquet key), each run of the changed catalog on
    a copy of the base index either retries and publishes what the fault-free run published, or
    fails with a clear error and leaves `published` untouched; never silently short data."""
    from pipelines.indexing.job import run_index

    _, changed, expected, _ = catalog
    direct = S3Settings(endpoint_url=s3_server, region="us-east-1", allow_http=True)
    s3fs = pafs.S3FileSystem(
        endpoint_override=s3_server.split("//")[1], scheme="http", region="us-east-1"
    )
    local = pafs.LocalFileSystem()
    pafs.copy_files(
        str(changed), f"{s3_bucket}/catalog/products", source_filesystem=local,
        destination_filesystem=s3fs,
    )  # fmt: skip
    outcomes = {}
    for name, faults in S3_FAULT_PLANS.items():
        # Each plan runs on its own copy of the base index: a plan that retries through its
        # faults publishes the changed catalog, which would leave the next plan nothing to do.
        pafs.copy_files(
            str(base_index), f"{s3_bucket}/lancedb-{name}", source_filesystem=local,
            destination_filesystem=s3fs,
        )  # fmt: skip
        index_uri = f"s3://{s3_bucket}/lancedb-{name}"
        pinned = PinnedReader(tables.connect(index_uri, direct))
        db = tables.connect(index_uri, direct)
        before_run = tables.published_run(db)
        proxy = FlakyS3(upstream=s3_server, faults=faults).start()
        cfg = index_config(
            f"s3://{s3_bucket}/catalog/products",
            index_uri,
            tiny_model_dir,
            *FAST,
            f"s3.endpoint_url={proxy.url}",
            "s3.allow_http=true",
            "s3.region=us-east-1",
        )
        t = time.perf_counter()
        try:
            summary, error = run_index(cfg), None
        except Exception as err:  # noqa: BLE001 - the other allowed outcome, checked below
            summary, error = None, err
        finally:
            proxy.stop()
        injected = dict(proxy.injected)
        figures = {
            "injected": injected,
            "forwarded": proxy.forwarded,
            "seconds": round(time.perf_counter() - t, 1),
        }
        assert injected.get("slowdown") and (injected.get("reset") or injected.get("truncate"))
        db = tables.connect(index_uri, direct)
        if error is None:
            assert "reset" in injected and "truncate" in injected, injected  # all three retried
            assert _counts(summary) == expected, summary
            assert _run_row(db, summary["run_id"]) == expected
            assert tables.published_run(db)["run_id"] == summary["run_id"]
            diff = _assert_same_rows(_published_rows(db), reference)
            figures.update(outcome="retried and published", **_counts(summary))
            figures["max_embedding_diff"] = diff
        else:  # a failure must say what failed, and leave readers where they were
            msg = f"{type(error).__name__}: {error}"
            assert any(w in msg for w in ("GetObject", "PutObject", "S3", "s3://", "AWS")), msg
            assert tables.published_run(db) == before_run, "a failed run moved `published`"
            figures.update(outcome="failed cleanly, published untouched", error=msg[:300])
        figures.update(check_invariants(index_uri, direct, pinned))
        outcomes[name] = figures
        report.record(f"flaky_s3[{name}]", figures)
    # Every plan is within the clients' retry budgets (s3.max_attempts): retried through.
    for name, figures in outcomes.items():
        assert figures["outcome"] == "retried and published", (name, figures)


# ---- 2. an encoder actor dies on its first batch -----------------------------------------------
def test_encoder_actor_dies_once(
    ray_local, tiny_model_dir, catalog, base_index, reference, tmp_path, monkeypatch, report
):
    """`os._exit(1)` in the encoder actor on its first batch, once: Ray Data restarts the actor
    and retries the batch (its defaults for actor pools: max_restarts=-1, max_task_retries=-1);
    the job completes with every row exactly once, equal to the fault-free run."""
    from pipelines.indexing.job import run_index

    _, changed, expected, _ = catalog
    index_dir = _copy_base(base_index, tmp_path / "index")
    pinned = PinnedReader(tables.connect(str(index_dir)))
    marker = tmp_path / "encoder-exited"
    monkeypatch.setenv("BLIP_FAULTS", f"encoder_exit_once={marker}")
    t = time.perf_counter()
    s = run_index(index_config(changed, index_dir, tiny_model_dir, *FAST))
    seconds = round(time.perf_counter() - t, 1)
    assert marker.exists(), "the fault never fired"
    assert _counts(s) == expected and s["encoded_this_run"] == expected["indexed"], s
    db = tables.connect(str(index_dir))
    assert _run_row(db, s["run_id"]) == expected
    diff = _assert_same_rows(_published_rows(db), reference)
    checked = check_invariants(str(index_dir), pinned=None)
    pinned.assert_unchanged()
    report.record(
        "encoder_exit_once",
        {
            **_counts(s),
            "dead_actor_pid": int(marker.read_text()),
            "seconds": seconds,
            "max_embedding_diff": diff,
            **checked,
        },
    )


# ---- 3. SIGKILL between writing data and moving the tags ---------------------------------------
def test_sigkill_before_tags_then_rerun(
    ray_local, tiny_model_dir, catalog, base_index, reference, tmp_path, report
):
    from pipelines.indexing.job import run_index

    _, changed, expected, _ = catalog
    index_dir = _copy_base(base_index, tmp_path / "index")
    db = tables.connect(str(index_dir))
    pinned = PinnedReader(db)
    before_run = tables.published_run(db)
    before_rows = _published_rows(db)

    killed_id = "fault-killed-before-tags"
    log = tmp_path / "killed.log"
    t = time.perf_counter()
    proc = _start(
        changed, index_dir, tiny_model_dir, log, killed_id, BLIP_FAULTS="kill_before_tags"
    )
    rc = _wait(proc, log)
    killed_s = round(time.perf_counter() - t, 1)
    assert rc == -signal.SIGKILL, f"rc={rc}\n{_tail(log)}"
    assert "SIGKILLs itself before moving the tags" in log.read_text(errors="replace")

    # Everything was written, nothing published: the runs row exists, without any tag.
    db = tables.connect(str(index_dir))
    row = tables.find_run(db, killed_id)
    assert row is not None, "the runs row is committed before the tags"
    assert row["rows_in"] == expected["in"]
    for name in (before_run["products_table"], tables.RUNS_TABLE, tables.REJECTS_TABLE):
        assert tables.run_tag(killed_id) not in db.open_table(name).tags.list(), name
    after_run = tables.published_run(db)
    assert after_run == before_run
    products = db.open_table(before_run["products_table"])
    assert products.version > before_run["products_version"], "the dead run merged its rows"
    assert products.tags.list()[tables.PUBLISHED]["version"] == before_run["products_version"]
    _assert_same_rows(_published_rows(db), before_rows, atol=0)
    checked = check_invariants(str(index_dir), pinned=pinned)
    assert checked["incomplete_runs"] == 1

    t = time.perf_counter()
    s = run_index(index_config(changed, index_dir, tiny_model_dir, *FAST))
    rerun_s = round(time.perf_counter() - t, 1)
    assert _counts(s) == expected, s
    db = tables.connect(str(index_dir))
    assert _run_row(db, s["run_id"]) == expected
    assert tables.published_run(db)["run_id"] == s["run_id"]
    diff = _assert_same_rows(_published_rows(db), reference)
    checked = check_invariants(str(index_dir))
    assert checked["complete_runs"] == 2 and checked["incomplete_runs"] == 1, checked
    report.record(
        "kill_before_tags",
        {
            "killed_run": {
                "in": row["rows_in"],
                "indexed": row["indexed"],
                "unchanged": row["unchanged"],
                "rejected": row["rejected"],
                "tagged": False,
                "seconds": killed_s,
            },
            "rerun": {
                **_counts(s),
                "encoded_this_run": s["encoded_this_run"],
                "resumed_from_staging": s["resumed_from_staging"],
                "seconds": rerun_s,
            },
            "max_embedding_diff": diff,
            **checked,
        },
    )


# ---- 4. two index jobs on one index at once ----------------------------------------------------
def _two_jobs(tag, a_src, b_src, index_dir, tiny_model_dir, tmp_path, max_retries=300):
    """Start both jobs together as CLI subprocesses; the one refused by the writer lease (exit 3,
    naming the holder) is retried in-process like a scheduler would, until the other has ended."""
    from pipelines.indexing.job import run_index
    from pipelines.indexing.lease import LeaseHeldError

    pinned = PinnedReader(tables.connect(str(index_dir)))
    ids = {"A": f"fault-{tag}-a", "B": f"fault-{tag}-b"}
    srcs = {"A": a_src, "B": b_src}
    logs = {k: tmp_path / f"{tag}-{k}.log" for k in ids}
    procs = {k: _start(srcs[k], index_dir, tiny_model_dir, logs[k], ids[k]) for k in ids}
    t = time.perf_counter()
    rcs: dict[str, int] = {}
    while len(rcs) < 2 and time.perf_counter() - t < 240:
        for k, p in procs.items():
            if k not in rcs and p.poll() is not None:
                rcs[k] = p.returncode
        if 3 in rcs.values():
            break  # the loser is out: retry it while the winner runs
        time.sleep(0.1)
    losers = [k for k, rc in rcs.items() if rc == 3]
    figures: dict = {"started_together": True}
    order: list[str] = []
    retries = 0
    if losers:
        (loser,) = losers
        winner = "B" if loser == "A" else "A"
        text = logs[loser].read_text(errors="replace")
        # Refused either by a live lease ("is being written by") or, when both wrote the lease
        # at the same moment, by the re-read after writing it ("was taken by ... while ... was
        # starting"): both name the winner and exit 3.
        refusals = ("index is being written by index run ", "was taken by index run ")
        assert any(r + ids[winner] in text for r in refusals), text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        figures["refused"] = {
            "job": loser,
            "exit_code": 3,
            "message": next(ln for ln in text.splitlines() if ln.startswith("error:"))[:240],
        }
        cfg = index_config(srcs[loser], index_dir, tiny_model_dir, *FAST)
        summary = None
        for _ in range(max_retries):  # a scheduler's bounded retry loop
            try:
                summary = run_index(cfg, run_id=ids[loser])
                break
            except LeaseHeldError:
                retries += 1
                time.sleep(0.5)
        assert summary is not None, f"still refused after {retries} retries"
        rc_winner = _wait(procs[winner], logs[winner])
        assert rc_winner == 0, _tail(logs[winner])
        _wait(procs[loser], logs[loser])
        order = [winner, loser]
    else:  # no overlap in time after all: both ran and committed
        for k in ids:
            rcs[k] = _wait(procs[k], logs[k])
        assert rcs == {"A": 0, "B": 0}, {k: _tail(v) for k, v in logs.items()}
        db = tables.connect(str(index_dir))
        order = sorted(ids, key=lambda k: tables.find_run(db, ids[k])["finished_at"])
    figures["order"] = order
    figures["lease_retries"] = retries
    figures["seconds"] = round(time.perf_counter() - t, 1)

    db = tables.connect(str(index_dir))
    for k in ids:
        figures[k] = _run_row(db, ids[k])
    assert tables.published_run(db)["run_id"] == ids[order[-1]]
    figures.update(check_invariants(str(index_dir), pinned=pinned))
    assert figures["complete_runs"] == 3, figures  # the base run + both
    return order, figures


def _expected_titles(base: dict[str, str], *sources_in_order: Path) -> dict[str, str]:
    out = dict(base)
    for src in sources_in_order:
        out.update(_titles(src))
    return out


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapping", "disjoint"])
def test_two_index_jobs_at_once(
    ray_local, tiny_model_dir, catalog, base_index, tmp_path, report, overlap
):
    base, _, _, _ = catalog
    ids = sorted(_titles(base))
    if overlap:  # A: products 0..31, B: 16..47; both retitle 16..31 (differently) and their own 8
        a = {p: " [A]" for p in ids[0:8] + ids[16:32]}
        b = {p: " [B]" for p in ids[16:32] + ids[40:48]}
        a_src = derive_catalog(base, tmp_path / "a" / "products", range(0, 4), a)
        b_src = derive_catalog(base, tmp_path / "b" / "products", range(2, 6), b)
    else:  # A: products 0..15, B: 32..47, each retitles 8 of its own
        a_src = derive_catalog(
            base, tmp_path / "a" / "products", range(0, 2), {p: " [A]" for p in ids[0:8]}
        )
        b_src = derive_catalog(
            base, tmp_path / "b" / "products", range(4, 6), {p: " [B]" for p in ids[40:48]}
        )
    index_dir = _copy_base(base_index, tmp_path / "index")
    order, figures = _two_jobs(
        "overlap" if overlap else "disjoint",
        a_src,
        b_src,
        index_dir,
        tiny_model_dir,
        tmp_path,
    )
    srcs = {"A": a_src, "B": b_src}
    want = _expected_titles(_titles(base), *(srcs[k] for k in order))
    got = _published_rows(tables.connect(str(index_dir)))
    got_titles = dict(
        zip(got.column("product_id").to_pylist(), got.column("title").to_pylist(), strict=True)
    )
    assert got.num_rows == len(got_titles) == N_PRODUCTS, "lost or duplicated products"
    assert got_titles == want
    for k in order:
        n_src = len(_titles(srcs[k]))
        assert figures[k]["in"] == n_src and figures[k]["rejected"] == 0, figures
    report.record(f"two_jobs_{'overlapping' if overlap else 'disjoint'}", figures)


# ---- 5. a model replica killed under client load ------------------------------------------------
def test_serve_survives_model_replica_kill(search_url, search_index, tiny_model_dir, report):
    import httpx
    import ray
    from ray import serve

    from pipelines.serve_search import build_app

    _, root = search_index
    cfg = index_config(
        root / "catalog" / "products",
        root / "db",
        tiny_model_dir,
        *SEARCH_LIGHT,
        "serve.model.num_replicas=2",
    )
    app, prefix = "faults", "/faults"
    serve.run(build_app(cfg), name=app, route_prefix=prefix)
    attempts_budget, backoff = 3, 0.2
    body = {"text": "red lamp", "k": 5, "rerank_k": 8}
    stop = threading.Event()
    log: list[dict] = []  # one entry per request: time, attempts used, first-try error
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=search_url, timeout=30) as c:
            while not stop.is_set():
                started, first_error, ok, last, failed_at = (
                    time.monotonic(),
                    None,
                    False,
                    None,
                    None,
                )
                attempts = 0
                while attempts < attempts_budget:
                    attempts += 1
                    try:
                        r = c.post(f"{prefix}/search", json=body)
                        last = f"HTTP {r.status_code}: {r.text[:200]}"
                        if r.status_code == 200 and r.json()["results"]:
                            ok = True
                            break
                        if r.status_code < 500:
                            break  # a client error is never retried (and fails the test)
                        err = f"HTTP {r.status_code}"
                    except httpx.HTTPError as e:
                        err = last = type(e).__name__
                    first_error, failed_at = first_error or err, time.monotonic()
                    time.sleep(backoff)
                entry = {"t": started, "attempts": attempts, "first_error": first_error, "ok": ok}
                entry["failed_at"] = failed_at  # when its last failed attempt ended
                with lock:
                    log.append({**entry, "last": None if ok else last})

    def model_replicas() -> list[str]:
        named = ray.util.list_named_actors(all_namespaces=True)
        return sorted(
            a["name"]
            for a in named
            if a["namespace"] == "serve"
            and a["name"].startswith(f"SERVE_REPLICA::{app}#QueryModel#")
        )

    def running() -> int:
        st = serve.status().applications[app].deployments["QueryModel"]
        return st.replica_states.get("RUNNING", 0) if st.status == "HEALTHY" else 0

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    try:
        before = model_replicas()
        assert len(before) == 2 and running() == 2, (before, serve.status())
        for th in threads:
            th.start()
        time.sleep(2.0)  # steady load first
        victim = before[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        replaced_s = None
        deadline = killed_at + 120
        while time.monotonic() < deadline:
            now = model_replicas()
            if victim not in now and len(now) == 2 and running() == 2:
                replaced_s = time.monotonic() - killed_at
                break
            time.sleep(0.1)
        assert replaced_s is not None, f"not recovered in 120 s: {serve.status()}"
        time.sleep(3.0)  # load after the recovery
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=60)
        serve.delete(app)
    assert log, "no request was made"
    failed = [e for e in log if not e["ok"]]
    assert not failed, (
        f"{len(failed)} requests failed after {attempts_budget} attempts: {failed[:3]}"
    )
    raw = [e for e in log if e["first_error"]]
    last_raw = max((e["failed_at"] for e in raw), default=None)
    after = [e for e in log if e["t"] >= killed_at]
    assert after and all(
        e["attempts"] == 1 for e in log if e["t"] > killed_at + replaced_s + 1.0
    ), "first-try errors after recovery"
    report.record(
        "serve_replica_kill",
        {
            "requests": len(log),
            "requests_after_kill": len(after),
            "first_try_errors": len(raw),
            "first_try_error_kinds": dict(Counter(e["first_error"] for e in raw)),
            "retries_used": sum(e["attempts"] - 1 for e in log),
            "failed_after_budget": len(failed),
            "recovery_s_two_running": round(replaced_s, 2),
            # from the kill to the last failed attempt: every request after it succeeded first try
            "recovery_s_first_try_ok": round(last_raw - killed_at, 2) if raw else 0.0,
        },
    )
