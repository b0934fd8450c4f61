"""Security properties that are cheap to check on every run (docs/security.md says why).

- **No credentials in any output.** A full index run on S3 (moto on 127.0.0.1) through the CLI,
  with a bad row so that ``rejects`` has content, then Parquet exports of ``runs``, ``rejects``
  and ``products`` (to S3 and to a local folder). Every output is searched for the test
  credentials (``TEST_AWS_ENV``, which every process of the run had in its environment): every
  object in the bucket byte for byte (tables' data files, manifests, the run report and its
  resolved config, the exports), every column of every LanceDB table decoded (compressed pages
  hide nothing), every exported Parquet file decoded and its key-value metadata, the CLIs'
  stdout/stderr, every log record captured at DEBUG, and what the run added to the Ray session's
  log files. Positive controls prove the searches read the content they claim to.
- **The service binds 127.0.0.1 by default** (built-in config, local/demo/Serve configs; prod
  binds the pod network behind an API key), and ``start()`` passes ``serve.host`` to Serve.
- **Pillow >= 13** (older releases have decoder CVEs): installed, required and pinned.
"""

from __future__ import annotations

import logging
import re
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.storage import S3Settings
from tests.conftest import TEST_API_KEY, TEST_AWS_ENV

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "configs" / "local.yaml"
SECRETS = {
    "AWS_ACCESS_KEY_ID": TEST_AWS_ENV["AWS_ACCESS_KEY_ID"],
    "AWS_SECRET_ACCESS_KEY": TEST_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
}
N_PRODUCTS = 12


# ------------------------------------------------------------------------------ finding secrets
def _leaks(where: str, data: bytes | str) -> list[str]:
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
    return [f"{name} in {where}" for name, value in SECRETS.items() if value.encode() in raw]


def _table_text(table: pa.Table) -> str:
    """Every value of every column as text (binary columns as latin-1), for searching."""
    parts = []
    for name in table.column_names:
        column = table.column(name)
        kind = column.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            parts.extend(v.decode("latin-1") for v in column.to_pylist() if v is not None)
        elif pa.types.is_fixed_size_list(kind) or pa.types.is_floating(kind):
            continue  # embeddings and scores: numbers cannot hold a key
        else:
            parts.extend(str(v) for v in column.to_pylist())
    return "\n".join(parts)


def ray_log_sizes() -> dict[Path, int]:
    """The Ray session's log files and their sizes now (what a run adds is read afterwards)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return {p: p.stat().st_size for p in logs.rglob("*") if p.is_file()}


def ray_log_growth(before: dict[Path, int]) -> dict[str, bytes]:
    """What each of the session's log files gained since ``before`` (``ray_log_sizes()``)."""
    grown = {}
    for path, size in ray_log_sizes().items():
        start = before.get(path, 0)
        if size > start:
            with path.open("rb") as f:
                f.seek(start)
                grown[path.name] = f.read(size - start)
    return grown


def _bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _with_bad_rows(endpoint: str, bucket: str, s3: S3Settings) -> None:
    """A catalog part whose rows are broken (rejects), written beside make_catalog's parts."""
    from pipelines.storage import filesystem_for

    fs, root = filesystem_for(f"s3://{bucket}/catalog/products", s3)
    first = sorted(i.path for i in fs.get_file_info(_selector(root)) if i.path.endswith(".parquet"))
    good = pq.read_table(first[0], filesystem=fs).slice(0, 2)
    ids = pa.array(["bad-image-1", "bad-image-2"], pa.string())
    bad = good.set_column(good.schema.get_field_index("product_id"), "product_id", ids)
    images = pa.array(
        [b"not an image", b"\x89PNG\r\n\x1a\ntruncated"], good.schema.field("image").type
    )
    bad = bad.set_column(bad.schema.get_field_index("image"), good.schema.field("image"), images)
    pq.write_table(bad, f"{root}/part-bad.parquet", filesystem=fs)


def _selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=False)


# ------------------------------------------------------------------------------ the tests
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_no_credentials_in_configs_logs_tables_reports_or_exports(
    ray_local, tiny_model_dir, s3_server, s3_bucket, tmp_path, caplog, capsys
):
    from pipelines.catalog.writer import make_catalog
    from pipelines.export import main as export_main
    from pipelines.index_catalog import main as index_main
    from pipelines.indexing import tables

    caplog.set_level(logging.DEBUG)
    ray_logs = ray_log_sizes()
    s3 = S3Settings(endpoint_url=s3_server, region="us-east-1", allow_http=True)
    make_catalog(f"s3://{s3_bucket}/catalog", N_PRODUCTS, seed=5, rows_per_file=6, workers=1, s3=s3)
    _with_bad_rows(s3_server, s3_bucket, s3)
    index_uri = f"s3://{s3_bucket}/db"
    settings = [
        f"s3.endpoint_url={s3_server}",
        "s3.allow_http=true",
        "s3.region=us-east-1",
        f"model.name_or_path={tiny_model_dir}",
    ]
    config = ["--config", str(LOCAL), *settings]
    assert (
        index_main(
            [*config, "--source", f"s3://{s3_bucket}/catalog/products", "--index-uri", index_uri]
        )
        == 0
    )
    index_out = capsys.readouterr()
    for what, out in [
        ("runs", f"s3://{s3_bucket}/exports/runs"),
        ("rejects", f"s3://{s3_bucket}/exports/rejects"),
        ("products", str(tmp_path / "products-export")),
    ]:
        assert export_main([*config, "--index-uri", index_uri, "--what", what, "--out", out]) == 0
    export_out = capsys.readouterr()
    # the run's records, before this test's own boto3 calls below (botocore's DEBUG wire trace
    # shows the signing key id; the lease's own client hides it, the test's client does not)
    records = [f"{r.name} {r.getMessage()}" for r in caplog.records]

    leaks: list[str] = []
    # 1. every object in the bucket, byte for byte: tables, manifests, report, exports
    objects = _bucket_objects(s3_server, s3_bucket)
    for key, data in objects.items():
        leaks += _leaks(f"s3://{s3_bucket}/{key}", data)
    reports = [k for k in objects if k.startswith("db/_runs/")]
    assert any(k.endswith("report.html") for k in reports), sorted(objects)[:20]
    resolved = next(objects[k] for k in reports if k.endswith("config.resolved.yaml")).decode()
    assert s3_server in resolved  # control: the report's config holds the S3 settings, not keys

    # 2. every LanceDB table's rows, decoded
    db = tables.connect(index_uri, s3)
    names = tables.table_names(db)
    texts = {name: _table_text(db.open_table(name).to_arrow()) for name in names}
    for name, text in texts.items():
        leaks += _leaks(f"table {name}", text)
    run = tables.published_run(db)
    assert run["run_id"] in "".join(texts.values())  # control: the runs row was read
    assert any("bad-image-1" in t for t in texts.values())  # control: the rejects rows were read

    # 3. the exports, decoded (columns and Parquet key-value metadata)
    exported = list((tmp_path / "products-export").rglob("*.parquet"))
    assert exported
    for path in exported:
        leaks += _leaks(f"export {path.name}", _table_text(pq.read_table(path)))
        meta = pq.read_metadata(path).metadata or {}
        leaks += _leaks(f"export {path.name} metadata", b"\n".join(meta.values()))
        leaks += _leaks(f"export {path.name} bytes", path.read_bytes())
    for path in (tmp_path / "products-export").rglob("*"):
        if path.is_file() and path.suffix != ".parquet":
            leaks += _leaks(f"export {path.name}", path.read_bytes())
    titles = pq.read_table(exported[0]).column("title").to_pylist()
    assert titles and titles[0] in _table_text(pq.read_table(exported[0]))  # control
    assert any(k.startswith("exports/runs/") for k in objects)
    assert any(k.startswith("exports/rejects/") for k in objects)

    # 4. what the commands printed and logged, and what the Ray session's logs gained
    for name, text in [
        ("index stdout", index_out.out),
        ("index stderr", index_out.err),
        ("export stdout", export_out.out),
        ("export stderr", export_out.err),
    ]:
        leaks += _leaks(name, text)
    assert run["run_id"] in index_out.out  # control: the summary was captured
    leaks += _leaks("log records", "\n".join(records))
    assert len(records) > 10, "the run's log records were captured"
    grown = ray_log_growth(ray_logs)
    for name, data in grown.items():
        leaks += _leaks(f"Ray log {name}", data)
    ray_bytes = sum(map(len, grown.values()))

    assert not leaks, leaks
    with capsys.disabled():
        print(
            f"\ncredentials grep: searched {len(objects)} S3 objects ({sum(map(len, objects.values()))} bytes), "
            f"{len(names)} tables, {len(exported)} local export files, {len(records)} log "
            f"records, {ray_bytes} bytes of new Ray logs: no credentials"
        )


def test_s3_settings_and_storage_options_carry_no_credentials(monkeypatch):
    """The S3 settings the project passes around have no credential fields, and the options it
    hands LanceDB hold none even when the AWS chain has them (the store reads the chain itself)."""
    from pipelines.indexing.tables import storage_options

    assert {f.name for f in fields(S3Settings)} == {
        "endpoint_url",
        "region",
        "allow_http",
        "max_attempts",
    }
    for name, value in TEST_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    options = storage_options("s3://b/db", S3Settings("http://127.0.0.1:9", "us-east-1", True))
    assert not _leaks("storage_options", repr(options)), options
    assert not [k for k in options if re.search(r"key|secret|token|password", k, re.I)], options


def _serve_host(path: Path) -> str | None:
    doc = yaml.safe_load(path.read_text())
    if "http_options" in doc:  # a Serve config file
        return doc["http_options"].get("host")
    return (doc.get("serve") or {}).get("host")


def test_service_binds_loopback_by_default(monkeypatch):
    from pipelines.config import ServeConfig, load_config
    from pipelines.search import deployments as serve_search

    assert ServeConfig().host == "127.0.0.1"
    assert load_config(None, []).serve.host == "127.0.0.1"
    for name in ("local.yaml", "demo.yaml", "serve_local.yaml"):
        assert _serve_host(REPO / "configs" / name) == "127.0.0.1", name
    # prod.yaml serves the pod network behind a TLS load balancer, with an API key configured
    prod = load_config(REPO / "configs" / "prod.yaml", [])
    assert prod.serve.host == "0.0.0.0" and prod.serve.api_key_env

    started = {}
    monkeypatch.setattr(serve_search.serve, "start", lambda **kw: started.update(kw))
    monkeypatch.setattr(serve_search.serve, "run", lambda *a, **kw: None)
    monkeypatch.setattr(serve_search, "build_app", lambda cfg: None)
    url = serve_search.start(load_config(LOCAL, ["serve.port=0"]))
    assert started["http_options"]["host"] == "127.0.0.1"
    assert url.startswith("http://127.0.0.1:")


def test_api_key_is_not_in_any_shipped_config():
    """The service reads its key from the environment variable a config names, never a value."""
    for path in (REPO / "configs").glob("*.yaml"):
        assert TEST_API_KEY not in path.read_text()
        serve = (yaml.safe_load(path.read_text()) or {}).get("serve") or {}
        assert "api_key" not in serve, f"{path.name}: serve.api_key (use serve.api_key_env)"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_pillow_13_or_newer_is_installed_required_and_pinned():
    import PIL

    assert _version(PIL.__version__) >= (13,), f"Pillow {PIL.__version__} < 13 (decoder CVEs)"
    required = re.search(r'(?im)^\s*"pillow\s*>=\s*([\d.]+)', (REPO / "pyproject.toml").read_text())
    assert required and _version(required.group(1)) >= (13,), "pyproject.toml: pillow>=13"
    pins = (REPO / "constraints" / "ci.txt").read_text()
    pinned = re.search(r"(?im)^pillow==(\S+)$", pins)
    assert pinned and _version(pinned.group(1)) >= (13,), pinned
