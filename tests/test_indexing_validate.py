"""Row validation of the index job: reasons, rule order, content hashes and rejects rows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.indexing.validate import (
    REJECT_REASONS,
    REJECTS_SCHEMA,
    Validation,
    content_hash,
    duplicated_ids,
    reject_rows,
    validate_batch,
)

HEX64 = re.compile(r"[0-9a-f]{64}")
JPEG = b"\xff\xd8\xff\xe0" + b"x" * 60  # only its length matters here: nothing is decoded
SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("title", pa.string()),
        ("image", pa.binary()),
        ("image_uri", pa.string()),
        ("path", pa.string()),
        ("row", pa.int32()),
    ]
)


def rows_to_data(rows: list[dict]) -> dict[str, list]:
    defaults = {"title": "red sofa", "image": JPEG, "image_uri": None}
    data: dict[str, list] = {name: [] for name in SCHEMA.names}
    for i, row in enumerate(rows):
        full = {"product_id": f"p{i}", **defaults, "path": "part-0.parquet", "row": i, **row}
        for name in SCHEMA.names:
            data[name].append(full[name])
    return data


@pytest.fixture(params=["table", "record_batch"])
def make_batch(request):
    """Build the batch both ways; the table is split in two chunks to exercise ChunkedArrays."""

    def make(rows: list[dict]) -> pa.Table | pa.RecordBatch:
        data = rows_to_data(rows)
        if request.param == "record_batch":
            return pa.RecordBatch.from_pydict(data, schema=SCHEMA)
        table = pa.Table.from_pydict(data, schema=SCHEMA)
        half = table.num_rows // 2
        return pa.concat_tables([table.slice(0, half), table.slice(half)])

    return make


def validate(batch, **kw):
    kw.setdefault("image_uri_col", "image_uri")
    kw.setdefault("max_image_bytes", 1000)
    return validate_batch(batch, **kw)


# ---------------------------------------------------------------- rules
@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"product_id": None}, "missing_product_id"),
        ({"product_id": ""}, "missing_product_id"),
        ({"product_id": "  \t"}, "missing_product_id"),
        ({"title": None}, "empty_title"),
        ({"title": ""}, "empty_title"),
        ({"title": " \n "}, "empty_title"),
        ({"image": None}, "missing_image"),
        ({"image": b""}, "missing_image"),
        ({"image": None, "image_uri": ""}, "missing_image"),
        ({"image": b"", "image_uri": "   "}, "missing_image"),
        ({"image": b"\xff" * 1001}, "image_too_large"),
    ],
)
def test_each_rule_reports_its_reason(make_batch, row, reason):
    v = validate(make_batch([{}, row, {}]))
    assert v.reason == [None, reason, None]
    assert v.content_hash[1] is None
    assert v.detail[1] and v.detail[0] is None
    assert reason in REJECT_REASONS


def test_image_at_the_limit_is_valid(make_batch):
    v = validate(make_batch([{"image": b"\xff" * 1000}]))
    assert v.reason == [None]


def test_duplicated_id_rejects_all_its_rows(make_batch):
    rows = [{"product_id": "a"}, {"product_id": "b"}, {"product_id": "a"}, {"product_id": "a"}]
    batch = make_batch(rows)
    dups = duplicated_ids(batch.column("product_id"))
    assert dups == {"a"}
    v = validate(batch, duplicates=dups)
    assert v.reason == [
        "duplicate_product_id",
        None,
        "duplicate_product_id",
        "duplicate_product_id",
    ]
    assert "'a'" in v.detail[0]


def test_duplicates_come_from_the_whole_run_not_the_batch(make_batch):
    """A batch holding one copy of an id duplicated elsewhere in the run still rejects it."""
    v = validate(make_batch([{"product_id": "x"}, {"product_id": "y"}]), duplicates={"x"})
    assert v.reason == ["duplicate_product_id", None]


def test_rule_order_first_failing_rule_wins(make_batch):
    rows = [
        {"product_id": None, "title": None, "image": None},  # everything wrong
        {"product_id": "d", "title": None, "image": None},  # duplicate beats empty title
        {"title": "", "image": None},  # empty title beats missing image
        {"image": None, "image_uri": ""},  # missing image
        {"title": "  ", "image": b"\xff" * 5000},  # empty title beats too large
    ]
    v = validate(make_batch(rows), duplicates={"d"})
    assert v.reason == [
        "missing_product_id",
        "duplicate_product_id",
        "empty_title",
        "missing_image",
        "empty_title",
    ]


def test_image_uri_only_rows_are_valid_and_hash_the_uri(make_batch):
    rows = [
        {"image": None, "image_uri": "s3://bucket/a.jpg"},
        {"image": b"", "image_uri": "images/b.png", "title": "chair"},
    ]
    v = validate(make_batch(rows))
    assert v.reason == [None, None]
    assert v.content_hash == [
        content_hash(b"s3://bucket/a.jpg", "red sofa"),
        content_hash(b"images/b.png", "chair"),
    ]


def test_uri_rows_skip_the_size_check_and_inline_bytes_win(make_batch):
    rows = [
        {"image": None, "image_uri": "s3://b/huge.jpg"},
        {"image": b"\xff" * 10, "image_uri": "s3://b/c.jpg"},
        {"image": b"\xff" * 5000, "image_uri": "s3://b/c.jpg"},
    ]
    v = validate(make_batch(rows), max_image_bytes=100)
    assert v.reason == [None, None, "image_too_large"]
    assert v.content_hash[1] == content_hash(b"\xff" * 10, "red sofa")


def test_image_col_only_and_uri_col_only(make_batch):
    batch = make_batch([{}, {"image": None, "image_uri": "s3://b/x.jpg"}])
    assert validate(batch, image_uri_col=None).reason == [None, "missing_image"]
    assert validate(batch, image_col=None).reason == ["missing_image", None]


def test_valid_rows_get_a_64_hex_hash_of_image_and_title(make_batch):
    v = validate(make_batch([{"title": "沙发 sofa"}, {"product_id": None}]))
    assert HEX64.fullmatch(v.content_hash[0])
    assert v.content_hash[0] == content_hash(JPEG, "沙发 sofa")
    assert v.content_hash[1] is None


def test_valid_mask_filters_the_batch(make_batch):
    batch = make_batch([{}, {"title": ""}, {}])
    v = validate(batch)
    assert v.num_rejected == 1
    kept = batch.filter(v.valid)
    assert kept.column("product_id").to_pylist() == ["p0", "p2"]


# ---------------------------------------------------------------- content hash
def test_hash_changes_with_title_or_image_and_not_otherwise():
    base = content_hash(b"image-bytes", "red sofa")
    assert content_hash(b"image-bytes", "red sofa") == base
    assert content_hash(bytearray(b"image-bytes"), "red sofa") == base
    assert content_hash(b"image-bytez", "red sofa") != base
    assert content_hash(b"image-bytes", "red sofas") != base
    assert content_hash(b"image-bytes", "red  sofa") != base  # raw title, not normalised


def test_hash_is_length_prefixed():
    assert content_hash(b"ab", "c") != content_hash(b"a", "bc")
    assert content_hash(b"", "ab") != content_hash(b"ab", "")
    assert content_hash(None, "") != content_hash(b"", "")
    assert content_hash(b"x", None) != content_hash(b"x", "")


def test_hash_is_sha256_hex():
    assert HEX64.fullmatch(content_hash(None, None))


def test_hash_rejects_wrong_types():
    with pytest.raises(TypeError, match="image must be bytes"):
        content_hash("not bytes", "t")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="title must be str"):
        content_hash(b"x", b"t")  # type: ignore[arg-type]


def test_hash_does_not_depend_on_other_columns(make_batch):
    a = validate(make_batch([{"product_id": "a", "row": 1}]))
    b = validate(make_batch([{"product_id": "b", "row": 7, "path": "other.parquet"}]))
    assert a.content_hash == b.content_hash


# ---------------------------------------------------------------- duplicated_ids
def test_duplicated_ids_ignores_nulls_and_empties():
    ids = ["a", None, None, "", "", "  ", "  ", "b", "a", "c", "b", "b"]
    assert duplicated_ids(ids) == {"a", "b"}
    assert duplicated_ids(pa.array(ids)) == {"a", "b"}


def test_duplicated_ids_on_a_chunked_array():
    chunked = pa.chunked_array([["a", "b", None], ["c", "a"], [], ["", ""]], type=pa.string())
    assert duplicated_ids(chunked) == {"a"}
    large = pa.chunked_array([["x"], ["x", "y"]], type=pa.large_string())
    assert duplicated_ids(large) == {"x"}


def test_duplicated_ids_empty_inputs():
    assert duplicated_ids([]) == set()
    assert duplicated_ids(pa.chunked_array([], type=pa.string())) == set()
    assert duplicated_ids(pa.nulls(3)) == set()


def test_duplicated_ids_is_exact_not_stripped():
    assert duplicated_ids(["A1", "A1 ", "a1"]) == set()


# ---------------------------------------------------------------- errors
def test_bad_arguments_say_what_was_received(make_batch):
    batch = make_batch([{}])
    with pytest.raises(ValueError, match="image_col or image_uri_col"):
        validate_batch(batch, image_col=None, max_image_bytes=10)
    with pytest.raises(ValueError, match="got 0"):
        validate(batch, max_image_bytes=0)
    with pytest.raises(KeyError, match="'sku'"):
        validate(batch, product_id_col="sku")
    with pytest.raises(TypeError, match="'row'.*int32"):
        validate(batch, title_col="row")


def test_large_and_null_typed_columns():
    table = pa.table(
        {
            "product_id": pa.array(["a", None], type=pa.large_string()),
            "title": pa.array(["t", "t"], type=pa.large_string()),
            "image": pa.array([b"\xff", b"\xff"], type=pa.large_binary()),
            "image_uri": pa.nulls(2),
        }
    )
    v = validate_batch(table, image_uri_col="image_uri", duplicates={"a"}, max_image_bytes=10)
    assert v.reason == ["duplicate_product_id", "missing_product_id"]
    v = validate_batch(table, image_uri_col="image_uri", max_image_bytes=10)
    assert v.reason == [None, "missing_product_id"]
    assert v.content_hash[0] == content_hash(b"\xff", "t")


def test_empty_batch(make_batch):
    batch = pa.RecordBatch.from_pydict(rows_to_data([]), schema=SCHEMA)
    v = validate(batch)
    assert v.reason == [] and v.content_hash == []
    out = reject_rows(batch, v, run_id="r", source_file_col="path", row_number_col="row", stage="s")
    assert out.num_rows == 0 and out.schema == REJECTS_SCHEMA


# ---------------------------------------------------------------- rejects rows
def test_reject_rows_match_the_schema_and_carry_context(make_batch):
    rows = [{}, {"product_id": None}, {"title": ""}, {}, {"image": b"\xff" * 2000}]
    batch = make_batch(rows)
    v = validate(batch)
    out = reject_rows(
        batch, v, run_id="run-42", source_file_col="path", row_number_col="row", stage="validate"
    )
    assert isinstance(out, pa.Table)
    assert out.schema == REJECTS_SCHEMA
    out.validate(full=True)
    assert out.to_pydict() == {
        "run_id": ["run-42"] * 3,
        "product_id": [None, "p2", "p4"],
        "source_file": ["part-0.parquet"] * 3,
        "row_number": [1, 2, 4],
        "stage": ["validate"] * 3,
        "reason": ["missing_product_id", "empty_title", "image_too_large"],
        "detail": v.detail[1:3] + v.detail[4:],
    }
    assert "2000 bytes" in out.column("detail")[2].as_py()


def test_reject_rows_without_source_columns(make_batch):
    batch = make_batch([{"product_id": ""}, {}])
    out = reject_rows(
        batch, validate(batch), run_id="r", source_file_col=None, row_number_col=None, stage="v"
    )
    assert out.schema == REJECTS_SCHEMA
    assert out.column("product_id").to_pylist() == [""]  # copied as stored
    assert out.column("source_file").to_pylist() == [None]
    assert out.column("row_number").to_pylist() == [None]


def test_reject_rows_for_a_later_stage(make_batch):
    """The decode stage reports its own reasons through the same function."""
    batch = make_batch([{}, {}, {}])
    decode = Validation(
        reason=[None, "truncated_image", None],
        content_hash=[None] * 3,
        detail=[None, "JPEG 10x10 RGB (64 bytes): image file is truncated", None],
    )
    out = reject_rows(
        batch, decode, run_id="r", source_file_col="path", row_number_col="row", stage="decode"
    )
    assert out.to_pylist() == [
        {
            "run_id": "r",
            "product_id": "p1",
            "source_file": "part-0.parquet",
            "row_number": 1,
            "stage": "decode",
            "reason": "truncated_image",
            "detail": "JPEG 10x10 RGB (64 bytes): image file is truncated",
        }
    ]
    no_detail = Validation(reason=["corrupt_image", None, None], content_hash=[None] * 3)
    out = reject_rows(
        batch, no_detail, run_id="r", source_file_col=None, row_number_col=None, stage="decode"
    )
    assert out.column("detail").to_pylist() == [None]


def test_reject_rows_checks_its_arguments(make_batch):
    batch = make_batch([{}, {}])
    v = validate(batch)
    kw = {"source_file_col": None, "row_number_col": None}
    with pytest.raises(ValueError, match="run_id"):
        reject_rows(batch, v, run_id="", stage="v", **kw)
    with pytest.raises(ValueError, match="stage"):
        reject_rows(batch, v, run_id="r", stage="", **kw)
    with pytest.raises(ValueError, match="1 rows but the batch has 2"):
        reject_rows(batch, Validation(["x"], [None]), run_id="r", stage="v", **kw)
    with pytest.raises(ValueError, match="one entry per row"):
        Validation(reason=[None, None], content_hash=[None])


def test_reason_keys_match_the_decoder():
    """The same byte-limit reason whichever stage catches it."""
    from blip_ops.decode import ImageTooLargeError

    assert "image_too_large" in REJECT_REASONS
    assert ImageTooLargeError.reason == "image_too_large"


def test_no_ray_or_torch_import():
    import subprocess

    code = (
        "import sys, pipelines.indexing.validate, pipelines.indexing.derivatives; "
        "print(sorted(m for m in ('ray', 'torch', 'lancedb') if m in sys.modules))"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert out.stdout.strip() == "[]"
