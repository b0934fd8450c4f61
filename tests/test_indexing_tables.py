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
