"""``python -m pipelines.export``: Parquet exports read back with DuckDB and pandas.

The session's ``search_index`` (the 120-product demo catalog through the real index job) is only
read; versions are resolved at test time because other modules may republish it. Small synthetic
indexes (``benchmarks/export_throughput.build_index``) serve the memory and kill tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import yaml

from benchmarks.export_throughput import build_index
from pipelines.config import config_digest, load_config
from pipelines.export import main
from pipelines.exporting.job import ExportRequest, export
from pipelines.exporting.output import MANIFEST, SUCCESS
from pipelines.exporting.parquet import PAUSE_ENV
from pipelines.exporting.queries import SEARCH_SCHEMA, read_queries
from pipelines.indexing import tables
from pipelines.storage import S3Settings, filesystem_for

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "configs" / "local.yaml"

pytestmark = pytest.mark.timeout(240)


def _overrides(cfg) -> list[str]:
    return [f"index.uri={cfg.index.uri}", f"model.name_or_path={cfg.model.name_or_path}"]


def cli(cfg, *args: str) -> int:
    return main(["--config", str(LOCAL), *_overrides(cfg), *args])


def duck(out: Path) -> pa.Table:
    """The export as an analyst reads it: every Parquet file under ``out``, hive partitions on."""
    got = duckdb.sql(
        f"select * from read_parquet('{out}/**/*.parquet', hive_partitioning=true)"
    ).arrow()
    return got.read_all() if isinstance(got, pa.RecordBatchReader) else got


def _sorted(table: pa.Table, key: str = "product_id") -> pa.Table:
    return table.sort_by(key)


def _published(cfg):
    db = tables.connect(cfg.index.uri)
    return db, tables.published_run(db)


def _assert_success_last(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    success = out / SUCCESS
    assert success.is_file()
    assert max(p.stat().st_mtime_ns for p in files) == success.stat().st_mtime_ns
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.export-")]


def _metadata(path: Path) -> dict[str, str]:
    raw = pq.read_metadata(path).metadata
    return {k.decode(): v.decode() for k, v in raw.items() if k != b"ARROW:schema"}


# ---- tables ------------------------------------------------------------------------------------
def test_products_export_partitioned_with_embeddings_equals_table(search_index, tmp_path, capsys):
    cfg, _ = search_index
    db, run = _published(cfg)
    table = db.open_table(run["products_table"])
    table.checkout(run["products_version"])
    expected = _sorted(table.to_arrow())
    out = tmp_path / "products"
    rc = cli(
        cfg,
        "--what", "products", "--out", str(out), "--with-embeddings",
        "export.partition_by=[category]", "export.max_rows_per_file=8",
        "export.row_group_rows=4", "export.batch_rows=16",
    )  # fmt: skip
    assert rc == 0
    assert "export products" in capsys.readouterr().out

    got = _sorted(duck(out))
    hidden = ("model_image", "thumbnail", "itm_tokens", "itm_tokens_shape")
    columns = [c for c in expected.column_names if c not in hidden]
    assert sorted(got.column_names) == sorted(columns)  # images and ITM tokens only when asked for
    assert got.num_rows == expected.num_rows == table.count_rows()
    for name in columns:
        if name == "image_embedding":
            want = np.stack(expected.column(name).to_numpy(zero_copy_only=False))
            have = np.stack(got.column(name).to_numpy(zero_copy_only=False))
            np.testing.assert_array_equal(have.astype(np.float32), want)
        else:
            assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    frame = pd.read_parquet(out).sort_values("product_id").reset_index(drop=True)
    assert frame["product_id"].tolist() == expected.column("product_id").to_pylist()
    assert frame["category"].astype(str).tolist() == expected.column("category").to_pylist()
    np.testing.assert_array_equal(
        np.stack(frame["image_embedding"].to_list()),
        np.stack(expected.column("image_embedding").to_numpy(zero_copy_only=False)),
    )

    parts = sorted(out.rglob("*.parquet"))
    categories = set(expected.column("category").to_pylist())
    assert {p.parent.name for p in parts} == {
        "category=" + c.replace(" ", "%20") for c in categories
    }
    assert len(parts) > len(categories)  # several files in the larger partitions
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] == expected.num_rows == sum(f["rows"] for f in manifest["files"])
    for part in parts:
        meta = pq.read_metadata(part)
        assert meta.num_rows <= 8
        assert all(meta.row_group(i).num_rows <= 4 for i in range(meta.num_row_groups))
        md = _metadata(part)
        assert md["table"] == run["products_table"]
        assert md["table_version"] == str(run["products_version"])
        assert md["model_id"] == run["model_id"] and md["run_id"] == run["run_id"]
        assert md["version_spec"] == "published" and md["with_embeddings"] == "true"
    resolved = yaml.safe_load(md["config"])
    assert resolved["export"]["partition_by"] == ["category"]
    assert resolved["index"]["uri"] == str(cfg.index.uri)
    written = tmp_path / "resolved.yaml"
    written.write_text(md["config"])
    assert config_digest(load_config(written)) == md["config_digest"]
    _assert_success_last(out)


def test_columns_filter_and_versions(search_index, tmp_path):
    cfg, _ = search_index
    db, run = _published(cfg)
    table = db.open_table(run["products_table"])
    table.checkout(run["products_version"])
    where = "price < 100 AND category <> 'bags'"
    expected = _sorted(
        table.search().where(where).select(["product_id", "title", "price"]).limit(None).to_arrow()
    )
    assert 0 < expected.num_rows < table.count_rows()
    specs = ["published", f"run-{run['run_id']}", run["run_id"], str(run["products_version"])]
    for i, spec in enumerate(specs):
        out = tmp_path / f"cols{i}"
        rc = cli(
            cfg, "--what", "products", "--out", str(out), "--version", spec,
            "--columns", "title,product_id,price", "--filter", where,
        )  # fmt: skip
        assert rc == 0, spec
        got = _sorted(duck(out))
        assert got.column_names == ["product_id", "title", "price"]  # table order
        assert got.to_pylist() == expected.to_pylist(), spec
        assert _metadata(next(out.glob("*.parquet")))["filter"] == where

    out = tmp_path / "none"
    assert cli(cfg, "--what", "products", "--out", str(out), "--filter", "price < 0") == 0
    empty = duck(out)
    assert empty.num_rows == 0 and "image_embedding" not in empty.column_names
    assert "product_id" in empty.column_names
    _assert_success_last(out)


def test_rejects_and_runs_exports(search_index, tmp_path):
    cfg, _ = search_index
    db, run = _published(cfg)
    (tmp_path / "runs").mkdir()  # an empty folder is a fine --out
    for what, name in (("runs", tables.RUNS_TABLE), ("rejects", tables.REJECTS_TABLE)):
        out = tmp_path / what
        assert cli(cfg, "--what", what, "--out", str(out), "--version", run["run_id"]) == 0
        expected = tables.open_tagged(db, name, tables.run_tag(run["run_id"])).to_arrow()
        got = duck(out)
        assert got.column_names == expected.column_names
        assert _sorted(got, "run_id").to_pylist() == _sorted(expected, "run_id").to_pylist()
    assert run["run_id"] in duck(tmp_path / "runs").column("run_id").to_pylist()

    # The synthetic index holds rejects rows: compare them value by value.
    synth = tmp_path / "synthetic"
    build_index(synth / "db", 40, dim=8)
    scfg = load_config(LOCAL, [f"index.uri={synth / 'db'}"])
    out = tmp_path / "rejects-synthetic"
    summary = export(scfg, ExportRequest("rejects", str(out)))
    expected = tables.open_tagged(tables.connect(str(synth / "db")), "rejects").to_arrow()
    assert summary["rows"] == expected.num_rows == 3
    assert pd.read_parquet(out).to_dict("records") == expected.to_pylist()


def test_bad_input_exits_2_with_one_line_and_writes_nothing(search_index, tmp_path, capsys):
    cfg, _ = search_index
    _, run = _published(cfg)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("x")
    no_query = tmp_path / "q.csv"
    no_query.write_text("text_en,filter\nred sofa,\n")
    cases = {
        "unknown tag": ["--what", "products", "--version", "nightly"],
        "unknown run": ["--what", "runs", "--version", "run-20000101T000000Z-000000"],
        "unknown version": ["--what", "products", "--version", "9999"],
        "bad filter": ["--what", "products", "--filter", "price <"],
        "filter on a missing column": ["--what", "rejects", "--filter", "nosuch = 1"],
        "bad column": ["--what", "products", "--columns", "product_id,nosuch"],
        "embeddings of runs": ["--what", "runs", "--with-embeddings"],
        "search without queries": ["--what", "search"],
        "query file without a query column": ["--what", "search", "--queries", str(no_query)],
        "query file of unknown type": ["--what", "search", "--queries", str(tmp_path / "q.txt")],
        "missing query file": ["--what", "search", "--queries", str(tmp_path / "nope.csv")],
        "bad search filter": [
            "--what", "search", "--queries", str(no_query), "--filter", "brand = 'x'; drop",
        ],
        "k above candidates": ["--what", "search", "--queries", str(no_query), "--k", "1000"],
    }  # fmt: skip
    for label, args in cases.items():
        out = tmp_path / label.replace(" ", "-")
        assert cli(cfg, "--out", str(out), *args) == 2, label
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (label, err)
        assert "Traceback" not in err
        assert not out.exists(), label
    assert cli(cfg, "--what", "runs", "--out", str(busy)) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["something.txt"]
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]  # no temporaries left
    # The message lists the known runs (other modules may have published more on the shared index).
    message = _unknown_run_message(cfg, capsys)
    assert "unknown run 'nope'; runs: " in message and run["run_id"] in message, message


def _unknown_run_message(cfg, capsys) -> str:
    cli(cfg, "--what", "runs", "--out", "/nonexistent/x", "--version", "run-nope")
    return capsys.readouterr().err


# ---- S3 ------------------------------------------------------------------------------------------
def test_export_to_s3(search_index, s3_server, s3_bucket, capsys):
    cfg, _ = search_index
    db, run = _published(cfg)
    s3 = [f"s3.endpoint_url={s3_server}", "s3.region=us-east-1", "s3.allow_http=true"]
    out = f"s3://{s3_bucket}/exports/products"
    args = ["--what", "products", "--out", out, "--with-embeddings", *s3]
    split = [
        "export.partition_by=[split]",
        "export.max_rows_per_file=50",
        "export.row_group_rows=50",
    ]
    assert cli(cfg, *args, *split) == 0
    fs, root = filesystem_for(out, S3Settings(s3_server, "us-east-1", True))
    got = _sorted(pds.dataset(root, filesystem=fs, partitioning="hive").to_table())
    table = db.open_table(run["products_table"])
    table.checkout(run["products_version"])
    expected = _sorted(table.to_arrow())
    for name in ("product_id", "title", "price", "image_embedding", "indexed_at"):
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    assert got.column("split").cast(pa.string()).to_pylist() == expected.column("split").to_pylist()
    names = {i.base_name for i in fs.get_file_info(pafs_selector(root))}
    assert {SUCCESS, MANIFEST, "split=train", "split=test"} <= names
    parent = fs.get_file_info(pafs_selector(root.rsplit("/", 1)[0]))
    assert [i.base_name for i in parent] == ["products"]  # the temporary prefix is gone
    manifest = json.loads(fs.open_input_stream(f"{root}/{MANIFEST}").read())
    assert manifest["table_version"] == str(run["products_version"])
    capsys.readouterr()
    assert cli(cfg, *args) == 2  # a complete export is never overwritten
    assert "a complete export" in capsys.readouterr().err


def pafs_selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=False)


# ---- search --------------------------------------------------------------------------------------
QUERY_ROWS = [  # (query, filter, k): the bad ones are accounted for, never dropped
    ("orange table lamp", None, None),
    ("橙色台灯", None, "3"),
    ("cheng se tai deng", "split = 'test'", None),
    ("", None, None),  # empty text
    ("red bag", "nosuch = 1", None),  # filter on a column that does not exist
    ("blue shoes", "category = 'no such category'", None),  # no results
    ("green sofa", None, "lots"),  # bad k
]


def _write_queries(path: Path) -> None:
    rows = [{"query_id": f"q{i}", "query": q, "filter": f, "k": k} for i, (q, f, k) in
            enumerate(QUERY_ROWS)]  # fmt: skip
    if path.suffix == ".csv":
        lines = ["query_id,query,filter,k,lang"]
        for r in rows:
            cells = [r["query_id"], r["query"], r["filter"] or "", r["k"] or "", "en"]
            lines.append(",".join(f'"{c}"' if "," in c or "'" in c else c for c in cells))
        lines.append('q7,"a, quoted",,,en,EXTRA')  # one field too many
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif path.suffix == ".jsonl":
        text = "\n".join(json.dumps({k: v for k, v in r.items() if v is not None}) for r in rows)
        path.write_text(text + "\n{not json\n[1, 2]\n", encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


def _engine_results(cfg, run, query_model, body: dict) -> list[dict]:
    from blip_ops import load_model
    from pipelines.search.engine import LocalScorer, search
    from pipelines.search.request import Limits, parse_search
    from pipelines.search.scorer import QueryScorer
    from pipelines.search.snapshot import open_snapshot

    model = query_model  # loaded with the CPU settings the export uses
    if model.model_id != run["model_id"]:  # another module republished with another checkpoint
        model = load_model(run["model_path"], **cfg.model.query_load_args())
    snap = open_snapshot(cfg.index.uri, pointer=run)
    scorer = LocalScorer(QueryScorer(model, cfg.serve.token_cache_items))
    return asyncio.run(search(parse_search(body, Limits.from_config(cfg.serve)), snap, scorer))[
        "results"
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_search_export_matches_engine_and_accounts_every_query(
    search_index, tiny_query_model, tmp_path, suffix
):
    cfg, _ = search_index
    _, run = _published(cfg)
    queries = tmp_path / f"queries{suffix}"
    _write_queries(queries)
    n_records = len(read_queries(str(queries)))
    assert n_records == len(QUERY_ROWS) + (
        1 if suffix == ".csv" else 2 if suffix == ".jsonl" else 0
    )
    out = tmp_path / "search"
    rc = cli(cfg, "--what", "search", "--queries", str(queries), "--out", str(out), "--k", "5",
             "export.search_batch=3")  # fmt: skip
    assert rc == 0
    got = duck(out)
    assert got.schema.names == SEARCH_SCHEMA.names
    rows = got.to_pylist()
    frame = pd.read_parquet(out)
    assert len(frame) == len(rows)
    assert sorted(set(frame["query_index"])) == list(range(n_records))  # every record

    status = {r["query_index"]: r["status"] for r in rows}
    assert [status[i] for i in range(len(QUERY_ROWS))] == [
        "ok", "ok", "ok", "error", "error", "no_results", "error",
    ]  # fmt: skip
    assert all(status[i] == "error" for i in range(len(QUERY_ROWS), n_records))
    for r in rows:
        assert (r["error"] is not None) == (r["status"] == "error")
        assert (r["rank"] is None) == (r["status"] != "ok")

    cfg5 = load_config(LOCAL, [*_overrides(cfg), "serve.k=5"])
    for i in range(3):
        query, flt, k = QUERY_ROWS[i]
        body = {"text": query, **({"filter": flt} if flt else {}), **({"k": int(k)} if k else {})}
        want = _engine_results(cfg5, run, tiny_query_model, body)
        mine = sorted((r for r in rows if r["query_index"] == i), key=lambda r: r["rank"])
        assert [r["rank"] for r in mine] == list(range(1, len(want) + 1))
        assert [r["product_id"] for r in mine] == [w["product_id"] for w in want]
        assert [r["title"] for r in mine] == [w["title"] for w in want]
        for r, w in zip(mine, want, strict=True):
            assert r["query_id"] == f"q{i}" and r["query"] == query and r["filter"] == flt
            assert r["score"] == pytest.approx(w["score"], abs=1e-4)
            assert r["itc_score"] == pytest.approx(w["itc_score"], abs=1e-4)
            if w["itm_score"] is None:
                assert r["itm_score"] is None
            else:
                assert r["itm_score"] == pytest.approx(w["itm_score"], abs=1e-4)
    assert len([r for r in rows if r["query_index"] == 1]) == 3  # the row's own k
    md = _metadata(next(out.glob("*.parquet")))
    assert md["what"] == "search" and md["model_id"] == run["model_id"]
    assert md["table_version"] == str(run["products_version"])
    assert json.loads((out / MANIFEST).read_text())["queries_error"] == n_records - 4
    _assert_success_last(out)


def test_search_loads_the_checkpoint_the_run_recorded(search_index, tmp_path, capsys):
    from blip_ops.tiny_model import write_tiny_model

    cfg, _ = search_index
    other = write_tiny_model(tmp_path / "other-model", seed=1)
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query": "orange table lamp"}) + "\n")
    args = ["--what", "search", "--queries", str(queries), f"model.name_or_path={other}"]
    assert cli(cfg, *args, "--out", str(tmp_path / "followed")) == 0
    assert duck(tmp_path / "followed").column("status").to_pylist()[0] == "ok"
    capsys.readouterr()
    assert cli(cfg, *args, "serve.follow_model=false", "--out", str(tmp_path / "refused")) == 2
    assert "set model.name_or_path" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


# ---- streaming and kills -------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_growth(fn) -> int:
    """Peak resident memory above the level before ``fn``, sampled every 2 ms."""
    base, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(peak[0] - base, 0)


def test_export_streams_in_bounded_memory(tmp_path):
    """Doubling the table does not grow the export's memory, which stays far below the data (a
    reader that held the table would grow by all of it)."""
    growth, written = {}, {}
    for n in (400, 1600, 3200):  # the first run pays the lazy imports and allocator warm-up
        uri = tmp_path / f"db{n}"
        build_index(uri, n, dim=8, image_px=16, thumb_px=384)  # ~32 KB of JPEG per row
        cfg = load_config(LOCAL, [f"index.uri={uri}", "export.batch_rows=32",
                                  "export.row_group_rows=32", "export.read_ahead_mb=2"])  # fmt: skip
        out = tmp_path / f"out{n}"
        req = ExportRequest("products", str(out), columns=["product_id", "thumbnail"])
        growth[n] = _peak_rss_growth(lambda cfg=cfg, req=req: export(cfg, req))
        written[n] = json.loads((out / MANIFEST).read_text())["bytes"]
    mb = {n: round(g / 2**20, 1) for n, g in growth.items()}
    assert written[3200] > 80 * 2**20, written
    assert growth[3200] < 0.4 * written[3200], (mb, written)
    assert growth[3200] < growth[1600] + 32 * 2**20, (mb, written)


@pytest.mark.timeout(120)
def test_killed_export_leaves_nothing_complete_and_a_rerun_succeeds(tmp_path):
    build_index(tmp_path / "db", 300, dim=8)
    out = tmp_path / "exports" / "products"
    marker = tmp_path / "paused"
    args = [
        sys.executable, "-m", "pipelines.export", "--config", str(LOCAL),
        f"index.uri={tmp_path / 'db'}", "export.max_rows_per_file=50", "export.row_group_rows=50",
        "--what", "products", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, PAUSE_ENV: str(marker)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=5) if proc.poll() is not None else "slow"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    everything = list((tmp_path / "exports").rglob("*"))
    assert not out.exists()  # nothing under the name an analyst was given
    assert not [p for p in everything if p.name == SUCCESS]
    temporaries = [p for p in (tmp_path / "exports").iterdir()]
    assert [p.name.startswith(".products.export-") for p in temporaries] == [True]
    assert list(temporaries[0].glob("part-*.parquet"))  # it was killed mid-way
    assert duckdb.sql(f"select count(*) from glob('{out}/**/*.parquet')").fetchall() == [(0,)]

    cfg = load_config(LOCAL, [f"index.uri={tmp_path / 'db'}", "export.max_rows_per_file=50",
                              "export.row_group_rows=50"])  # fmt: skip
    summary = export(cfg, ExportRequest("products", str(out)))
    assert summary["rows"] == 300 and len(summary["files"]) == 6
    assert duck(out).num_rows == 300
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["products"]  # stale one gone
    _assert_success_last(out)


# ---- reading the published tables in place (the README's recipe) -------------------------------
def _readme_block(marker: str) -> str:
    """The first ```python block after ``<!-- {marker}: ... -->`` in the README."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"<!-- {marker}:")
    begin = text.index("```python\n", start) + len("```python\n")
    return text[begin : text.index("```", begin)]


def test_readme_reads_the_published_tables_with_duckdb_and_polars(search_index, capsys):
    """The README's "Read the tables" block, run as written against an index the job published
    (only the folder differs): DuckDB and Polars see the published version's rows."""
    cfg, _root = search_index
    block = _readme_block("read-tables")
    code = block.replace('".data/lancedb"', repr(cfg.index.uri))
    assert code != block, "the README's block no longer opens .data/lancedb"
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out

    products, run = tables.open_published(tables.connect(cfg.index.uri))
    assert scope["run"]["run_id"] == run["run_id"] and f"run {run['run_id']}" in printed
    counts = dict(scope["by_category"].fetchall())
    assert sum(counts.values()) == products.count_rows() and len(counts) > 1
    cheap = products.search().where("price < 50").select(["product_id"]).limit(None).to_arrow()
    assert sorted(scope["cheap"]["product_id"].to_list()) == sorted(
        cheap.column("product_id").to_pylist()
    )
    assert 0 < len(scope["cheap"]) < products.count_rows()
