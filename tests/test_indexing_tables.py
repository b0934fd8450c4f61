"""LanceDB tables and tags, on a local directory and on the S3 test server."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.indexing import tables
from pipelines.storage import S3Settings


def _rows(ids, dim=4, model_id="m1"):
    return pa.Table.from_pylist(
        [
            {
                "product_id": pid,
                "title": f"t {pid}",
                "title_normalized": f"t {pid}",
                "image_embedding": [float(i)] * dim,
                "model_image": b"jpg",
                "thumbnail": b"th",
                "content_hash": f"h{pid}",
                "model_id": model_id,
                "indexed_at": None,
                "run_id": "r1",
            }
            for i, pid in enumerate(ids)
        ],
        schema=tables.products_schema(dim),
    )


def test_products_schema_has_the_contract_columns():
    schema = tables.products_schema(256, [pa.field("category", pa.string())])
    for name in (
        "product_id",
        "title",
        "title_normalized",
        "category",
        "image_embedding",
        "model_image",
        "thumbnail",
        "content_hash",
        "model_id",
        "indexed_at",
        "run_id",
    ):
        assert name in schema.names
    assert schema.field("image_embedding").type == pa.list_(pa.float32(), 256)
    assert not schema.field("product_id").nullable
    with pytest.raises(ValueError, match="got 0"):
        tables.products_schema(0)


def test_tag_pins_a_version_while_the_table_moves_on(tmp_path):
    db = tables.connect(str(tmp_path / "db"))
    assert tables.open_tagged(db, "products") is None  # no table yet
    t = db.create_table("products", _rows(["a", "b"]))
    assert tables.open_tagged(db, "products") is None  # table, but never published
    tables.move_tag(t, tables.PUBLISHED, t.version)
    first = t.version
    t.add(_rows(["c"]))
    reader = tables.open_tagged(db, "products")
    assert reader.version == first and reader.count_rows() == 2
    tables.move_tag(t, tables.PUBLISHED, t.version)  # moving an existing tag
    assert tables.open_tagged(db, "products").count_rows() == 3
    assert reader.count_rows() == 2  # a reader that opened the old tag keeps its version
    state = tables.published_state(tables.open_tagged(db, "products"))
    assert state.column_names == ["product_id", "content_hash", "model_id"]
    assert sorted(state.column("product_id").to_pylist()) == ["a", "b", "c"]


def test_storage_options_for_s3_and_local():
    assert tables.storage_options("/tmp/x") == {}
    opts = tables.storage_options(
        "s3://b/db", S3Settings("http://127.0.0.1:9000", "us-east-1", True)
    )
    assert opts == {
        "region": "us-east-1",
        "endpoint": "http://127.0.0.1:9000",
        "allow_http": "true",
    }
    assert not any("key" in k or "secret" in k for k in opts)  # credentials only from the AWS chain
    with pytest.raises(ValueError, match="allow_http"):
        tables.storage_options("s3://b/db", S3Settings("http://127.0.0.1:9000"))


def test_tables_and_tags_on_s3(s3_server, s3_bucket):
    settings = S3Settings(endpoint_url=s3_server, region="us-east-1", allow_http=True)
    db = tables.connect(f"s3://{s3_bucket}/lancedb", settings)
    t = db.create_table("products", _rows(["a", "b", "c"]))
    tables.move_tag(t, tables.PUBLISHED, t.version)
    t.add(_rows(["d"]))
    again = tables.connect(f"s3://{s3_bucket}/lancedb", settings)
    assert tables.open_tagged(again, "products").count_rows() == 3


def test_runs_table_from_before_model_path_gains_the_column(tmp_path):
    """An index written before runs rows carried model_path keeps working: the next run's row
    adds the column (null for the old rows), and the published pointer reads both."""
    from datetime import datetime, timezone

    db = tables.connect(str(tmp_path / "db"))
    old_schema = pa.schema([f for f in tables.RUNS_SCHEMA if f.name != "model_path"])

    def row(run_id, minute, **extra):
        at = datetime(2026, 11, 1, 3, minute, tzinfo=timezone.utc)
        return {"run_id": run_id, "finished_at": at, "products_table": "p", "model_id": "m1",
                "products_version": 1, **extra}  # fmt: skip

    products = db.create_table("p", _rows(["a"]))
    runs = db.create_table("runs", pa.Table.from_pylist([row("old", 1)], schema=old_schema))
    for name in ("run-old", "run-new"):
        tables.move_tag(products, name, products.version)
    tables.move_tag(runs, "published", runs.version)
    assert tables.published_run(db)["model_path"] is None
    new = pa.Table.from_pylist([row("new", 2, model_path="/ckpt/m1")], schema=tables.RUNS_SCHEMA)
    runs = tables.append(db, "runs", tables.RUNS_SCHEMA, new)
    assert runs.schema.field("model_path").type == pa.string()
    got = {r["run_id"]: r["model_path"] for r in runs.to_arrow().to_pylist()}
    assert got == {"old": None, "new": "/ckpt/m1"}
    assert tables.published_run(db)["run_id"] == "old"  # the tag still pins the old version
    tables.move_tag(runs, "published", runs.version)
    assert tables.published_run(db)["model_path"] == "/ckpt/m1"
    assert tables.find_run(db, "old")["model_path"] is None
