"""The index job under its real runtimes: LanceDB and the catalog on S3 (moto), and a run killed
mid-encode and resumed (the README's ``ray start --head`` + ``ray job submit`` lines run in
``tests/test_readme_commands.py``).

Slow-ish (a real local Ray, the tiny BLIP): about a minute and a half on 2 CPUs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.indexing import tables
from pipelines.storage import S3Settings
from tests.conftest import index_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).parent / "ray"
POLL_S = 0.1
# Kept out of the `ray job submit` working_dir upload (the venv alone is 2 GB; the limit is 100 MB).


# ---- helpers -------------------------------------------------------------------------------------
def _assert_accounting(s: dict) -> None:
    assert s["in"] == s["indexed"] + s["unchanged"] + s["rejected"], s
    assert s["indexed"] == s["encoded_this_run"] + s["resumed_from_staging"], s


def run_index_checked(cfg) -> dict:
    from pipelines.indexing.job import run_index

    summary = run_index(cfg)
    _assert_accounting(summary)
    return summary


def _published_rows(db) -> pa.Table:
    """product_id, content_hash, image_embedding of the published products, sorted by product_id."""
    products = tables.open_published(db)[0]
    assert products is not None, "nothing published"
    rows = (
        products.search()
        .select(["product_id", "content_hash", "image_embedding"])
        .limit(None)
        .to_arrow()
    )
    return rows.sort_by("product_id")


def _embeddings(rows: pa.Table) -> np.ndarray:
    return np.stack(rows.column("image_embedding").to_numpy(zero_copy_only=False)).astype(
        np.float32
    )


def _assert_self_retrieval(emb: np.ndarray) -> None:
    """Every stored embedding finds itself first (exact cosine over all stored embeddings)."""
    norms = np.linalg.norm(emb, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)  # stored L2-normalised
    sims = emb @ emb.T
    # Not vacuous: a tiny BLIP with default init embeds every image alike.
    off_diag = sims[~np.eye(len(emb), dtype=bool)]
    assert off_diag.min() < 0.99, (
        f"embeddings barely differ (min off-diagonal cosine {off_diag.min()})"
    )
    top = sims.argmax(axis=1)
    # A product may only tie with an identical image (same embedding); otherwise it must be first.
    for i, j in enumerate(top):
        assert j == i or sims[i, i] >= sims[i, j] - 1e-6, (i, j, sims[i, i], sims[i, j])
    assert (top == np.arange(len(emb))).mean() > 0.9


def _assert_same_rows(got: pa.Table, want: pa.Table) -> None:
    assert got.column("product_id").to_pylist() == want.column("product_id").to_pylist()
    assert got.column("content_hash").to_pylist() == want.column("content_hash").to_pylist()
    np.testing.assert_allclose(_embeddings(got), _embeddings(want), atol=1e-5, rtol=0)


def _job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        NO_PROXY="127.0.0.1,localhost",  # the job CLI talks to the dashboard on loopback
        no_proxy="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as err:
        return f"<{path}: {err}>"


def _session_processes(sid: int) -> dict[int, str]:
    """Live (non-zombie) processes of session ``sid`` (pid -> command line), from /proc: all that a
    ``start_new_session=True`` child started, whatever process group they moved to."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
            if int(session) == sid and state != "Z":
                found[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
        except (OSError, ValueError):
            pass  # gone meanwhile
    return found


def _kill_session(proc: subprocess.Popen, wait_s: float = 30.0) -> list[str]:
    """SIGKILL the process group of ``proc`` (started with start_new_session=True), reap it, and
    wait for every other process of its session (Ray's GCS, raylet, workers...) to go. Returns
    what was still alive after ``wait_s`` (then killed one by one: this test started them)."""
    sid = proc.pid
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + wait_s
    left = _session_processes(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _session_processes(sid)
    leaked = []
    for pid, cmdline in left.items():
        leaked.append(f"{pid} {cmdline[:200]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leaked


# ---- 1. catalog and LanceDB both on S3 ---------------------------------------------------------
def test_index_on_s3_catalog_and_lancedb(ray_local, tiny_model_dir, s3_server, s3_bucket):
    from pipelines.catalog.writer import make_catalog

    s3 = S3Settings(endpoint_url=s3_server, region="us-east-1", allow_http=True)
    n = 30
    make_catalog(f"s3://{s3_bucket}/catalog", n, seed=11, rows_per_file=10, workers=1, s3=s3)
    index_uri = f"s3://{s3_bucket}/lancedb"
    cfg = index_config(
        f"s3://{s3_bucket}/catalog/products",
        index_uri,
        tiny_model_dir,
        f"s3.endpoint_url={s3_server}",
        "s3.allow_http=true",
        "s3.region=us-east-1",
        "index.stage_flush_rows=8",
    )

    first = run_index_checked(cfg)
    assert first["in"] == n and first["indexed"] == n, first
    assert first["rejected"] == 0 and first["unchanged"] == 0 and first["resumed_from_staging"] == 0

    db = tables.connect(index_uri, s3)
    names = tables.table_names(db)
    assert first["products_table"] in names
    assert not [t for t in names if t.startswith("_staging__")], names  # staging dropped at the end
    run = tables.published_run(db)
    assert run is not None and run["run_id"] == first["run_id"]
    assert run["products_table"] == first["products_table"]
    assert run["products_version"] == first["products_version"]
    products = db.open_table(first["products_table"])
    assert products.tags.list()[tables.PUBLISHED]["version"] == first["products_version"]

    rows = _published_rows(db)
    assert rows.num_rows == n
    assert len(set(rows.column("product_id").to_pylist())) == n
    emb = _embeddings(rows)
    _assert_self_retrieval(emb)
    # The table on S3 answers a vector query itself (exact search: no ANN index below ann_min_rows).
    published = tables.open_published(db)[0]
    hit = published.search(emb[3]).distance_type("cosine").select(["product_id"]).limit(1).to_list()
    assert hit[0]["product_id"] == rows.column("product_id")[3].as_py()

    second = run_index_checked(cfg)
    assert second["in"] == n and second["unchanged"] == n, second
    assert second["indexed"] == 0 and second["encoded_this_run"] == 0 and second["rejected"] == 0
    run2 = tables.published_run(db)
    assert run2["run_id"] == second["run_id"] and run2["products_table"] == first["products_table"]
    _assert_same_rows(_published_rows(db), rows)


# ---- 2. killed mid-run (SIGKILL), resumed from staging -----------------------------------------
N_NEW_CATALOG = 48  # 12 files of 4 rows
OLD_FILES = 3  # the older catalog version: the first 12 products, one of them with another title


def _old_catalog(new_products: Path, old_products: Path) -> str:
    """The older catalog version: the new one's first files, one product's title different."""
    old_products.mkdir(parents=True)
    parts = sorted(new_products.glob("part-*.parquet"))
    for part in parts[:OLD_FILES]:
        shutil.copy(part, old_products / part.name)
    first = old_products / parts[0].name
    t = pq.read_table(first)
    titles = t.column("title").to_pylist()
    changed_id = t.column("product_id")[0].as_py()
    titles[0] = titles[0] + " (old title)"
    t = t.set_column(
        t.schema.get_field_index("title"), t.schema.field("title"), pa.array(titles, pa.string())
    )
    pq.write_table(t, first)
    return changed_id


def _staging_committed(index_dir: Path) -> Path | None:
    """The staging table once a version holding data is committed (data file + manifest)."""
    for d in index_dir.glob("_staging__*.lance"):
        if any(d.glob("data/*.lance")) and any(d.glob("_versions/*.manifest")):
            return d
    return None


def _start_job(
    source: Path, index_dir: Path, model_dir: Path, log: Path, *extra: str
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "pipelines.index_catalog", "--config", "configs/local.yaml",
        f"source.uri={source}", f"index.uri={index_dir}", f"model.name_or_path={model_dir}",
        "ray.num_cpus=2", *extra,
    ]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_job_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _published_snapshot(index_dir: Path) -> tuple[dict, int, list]:
    db = tables.connect(str(index_dir))
    run = tables.published_run(db)
    products = db.open_table(run["products_table"])
    tag_version = products.tags.list()[tables.PUBLISHED]["version"]
    rows = _published_rows(db)
    return (
        run,
        tag_version,
        list(
            zip(
                rows.column("product_id").to_pylist(),
                rows.column("content_hash").to_pylist(),
                strict=True,
            )
        ),
    )


def test_killed_run_leaves_published_and_rerun_resumes(ray_local, tiny_model_dir, tmp_path):
    from pipelines.catalog.writer import make_catalog
    from pipelines.indexing.job import run_index

    make_catalog(str(tmp_path / "cat"), N_NEW_CATALOG, seed=5, rows_per_file=4, workers=1)
    new_products = tmp_path / "cat" / "products"
    changed_id = _old_catalog(new_products, tmp_path / "old" / "products")
    n_old = 4 * OLD_FILES
    to_encode = N_NEW_CATALOG - n_old + 1  # new products + the one whose title changed

    # A clean, published run of the older version; every attempt starts from a copy of it.
    base = tmp_path / "base_index"
    v1 = run_index(index_config(tmp_path / "old" / "products", base, tiny_model_dir))
    assert v1["indexed"] == n_old and v1["rejected"] == 0
    before_run, before_tag, before_rows = _published_snapshot(base)
    assert len(before_rows) == n_old

    attempts = [
        ("index.stage_flush_rows=4", "encode.batch_size=4"),
        ("index.stage_flush_rows=2", "encode.batch_size=2"),  # retry: smaller units, slower encode
        ("index.stage_flush_rows=1", "encode.batch_size=1"),
    ]
    index_dir = staged_dir = None
    notes = []
    for i, overrides in enumerate(attempts):
        index_dir = tmp_path / f"index_{i}"
        shutil.copytree(base, index_dir)
        log = tmp_path / f"job_{i}.log"
        proc = _start_job(new_products, index_dir, tiny_model_dir, log, *overrides)
        staged_dir = None
        deadline = time.monotonic() + 180
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                staged_dir = _staging_committed(index_dir)
                if staged_dir is not None:
                    break
                time.sleep(POLL_S)
        finally:
            leaked = _kill_session(proc)
        assert not leaked, f"processes left behind by the killed job: {leaked}"
        # The tiny model encodes the whole catalog within a poll or two: a kill that found
        # staging committed may still land after the merge began (the job logs its phases).
        merged = "phase: merge" in log.read_text(errors="replace")
        if staged_dir is not None and proc.returncode == -signal.SIGKILL and not merged:
            break
        notes.append(
            f"attempt {i}: rc={proc.returncode}, staged={staged_dir}, merge reached: {merged}"
            f"\n{_tail(log)}"
        )
        staged_dir = None
    assert staged_dir is not None, "the kill never landed mid-run:\n" + "\n".join(notes)

    # The dead run left `published` alone: same runs row, same tag version, same rows.
    after_run, after_tag, after_rows = _published_snapshot(index_dir)
    assert after_run == before_run
    assert after_tag == before_tag == before_run["products_version"]
    assert after_rows == before_rows
    db = tables.connect(str(index_dir))
    staged_rows = db.open_table(staged_dir.name.removesuffix(".lance")).count_rows()
    assert 0 < staged_rows <= to_encode, staged_rows

    # The rerun (in-process, the test session's Ray) picks up what the dead run staged.
    cfg = index_config(
        new_products, index_dir, tiny_model_dir, "index.stage_flush_rows=4", "encode.batch_size=4"
    )
    resumed = run_index(cfg)
    _assert_accounting(resumed)
    assert resumed["in"] == N_NEW_CATALOG and resumed["rejected"] == 0, resumed
    assert resumed["unchanged"] == n_old - 1 and resumed["indexed"] == to_encode, resumed
    assert resumed["resumed_from_staging"] == staged_rows, resumed
    assert resumed["encoded_this_run"] == to_encode - staged_rows, resumed
    assert not [t for t in tables.table_names(db) if t.startswith("_staging__")]

    run = tables.published_run(db)
    assert (
        run["run_id"] == resumed["run_id"]
        and run["products_version"] == resumed["products_version"]
    )
    got = _published_rows(db)
    ids = got.column("product_id").to_pylist()
    assert len(ids) == len(set(ids)) == N_NEW_CATALOG, (
        "duplicate or missing product_id after resume"
    )
    old_hash = dict(before_rows)[changed_id]
    assert (
        dict(zip(ids, got.column("content_hash").to_pylist(), strict=True))[changed_id] != old_hash
    )

    # Same rows as a clean run of the same catalog (a copy) into a fresh index.
    shutil.copytree(new_products, tmp_path / "copy" / "products")
    clean_dir = tmp_path / "clean_index"
    clean = run_index(index_config(tmp_path / "copy" / "products", clean_dir, tiny_model_dir))
    assert clean["indexed"] == N_NEW_CATALOG and clean["encoded_this_run"] == N_NEW_CATALOG
    _assert_same_rows(got, _published_rows(tables.connect(str(clean_dir))))


def test_rerun_after_torn_staging_table(ray_local, tiny_model, tiny_model_dir, tmp_path):
    import lancedb

    from pipelines.catalog.writer import make_catalog
    from pipelines.indexing.job import run_index

    n = 8
    make_catalog(str(tmp_path / "cat"), n, seed=3, workers=1)
    index_dir = tmp_path / "index"
    staging = f"_staging__{tiny_model.model_id}"
    # What a kill between Lance writing the data files and committing the manifest leaves behind.
    lancedb.connect(str(index_dir)).create_table(staging, pa.table({"product_id": ["x"]}))
    shutil.rmtree(index_dir / f"{staging}.lance" / "_versions")
    assert any((index_dir / f"{staging}.lance").glob("data/*.lance"))

    summary = run_index(index_config(tmp_path / "cat" / "products", index_dir, tiny_model_dir))
    _assert_accounting(summary)
    assert summary["indexed"] == n and summary["resumed_from_staging"] == 0, summary
    assert tables.open_published(tables.connect(str(index_dir)))[0].count_rows() == n
