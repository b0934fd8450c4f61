"""Row validation for the index job: per-row reject reasons, content hashes and `rejects` rows.

Pure pyarrow + stdlib (no Ray, no torch): the job calls `validate_batch` inside `map_batches` on CPU
workers. The checks are cheap column-wise ones; decoding the image happens later, in the decode
stage, whose failures carry the decoder's own reasons (`blip_ops.decode.DECODE_ERROR_REASONS`).
`blip_ops` is deliberately not imported here, because importing it loads torch.

Every input row of a run ends up exactly one of indexed, unchanged or rejected (per-run
accounting); this module decides "rejected at validation" and computes the `content_hash` that
"unchanged" is judged by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REJECT_REASONS: tuple[str, ...] = (
    "missing_product_id",
    "duplicate_product_id",
    "empty_title",
    "missing_image",
    "image_too_large",
)
"""Reasons `validate_batch` reports, in the order the rules are checked (the first failing rule
wins). The decode stage adds the decoder's reasons; "image_too_large" is the same key the decoder
uses for its own byte limit, so a rejects query need not care which stage caught it."""

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("product_id", pa.string()),  # null when the row had none
        pa.field("source_file", pa.string()),  # null when the job does not track it
        pa.field("row_number", pa.int64()),  # row within source_file; null when not tracked
        pa.field("stage", pa.string(), nullable=False),  # "validate", "decode", ...
        pa.field("reason", pa.string(), nullable=False),  # stable snake_case key
        pa.field("detail", pa.string()),  # human message saying what was received
    ]
)
"""The DESIGN `rejects` contract, plus `detail`."""

_LENGTH_BYTES = 8  # big-endian length prefix of each hashed field


# ---------------------------------------------------------------- content hash
def _hash_field(h: hashlib._Hash, value: bytes | bytearray | memoryview | None) -> None:
    if value is None:
        h.update(b"\x00")
        return
    h.update(b"\x01")
    h.update(len(value).to_bytes(_LENGTH_BYTES, "big"))
    h.update(value)


def content_hash(image: bytes | bytearray | memoryview | None, title: str | None) -> str:
    """SHA-256 hex digest of an image and a title: the key for "unchanged" detection.

    Encoding: for each of (image bytes, UTF-8 title), a presence byte (0 for None, 1 otherwise)
    followed, when present, by an 8-byte big-endian length and the bytes. The length prefix keeps
    field boundaries unambiguous, so ("ab", "c") and ("a", "bc") hash differently, and None differs
    from empty. The title is hashed as given (not normalised): any change to the stored title
    must update the row. Changing this encoding makes every product look changed on the next run.
    """
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be str or None, got {type(title).__name__}")
    if image is not None and not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(f"image must be bytes or None, got {type(image).__name__}")
    h = hashlib.sha256()
    _hash_field(h, image)
    _hash_field(h, None if title is None else title.encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------- column helpers
ArrayLike = pa.Array | pa.ChunkedArray


def _string_column(col: ArrayLike, name: str) -> ArrayLike:
    """`col` as string or large_string (what pyarrow.compute's utf8 kernels take)."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col
    if pa.types.is_null(t) or pa.types.is_string_view(t):
        return col.cast(pa.string())
    raise TypeError(f"column {name!r} must be a string column, got type {t}")


def _binary_column(col: ArrayLike, name: str) -> ArrayLike:
    """`col` as binary or large_binary (what binary_length takes)."""
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return col
    if pa.types.is_null(t) or pa.types.is_binary_view(t) or pa.types.is_fixed_size_binary(t):
        return col.cast(pa.binary())
    raise TypeError(f"column {name!r} must be a binary column (image bytes), got type {t}")


def _column(batch: pa.Table | pa.RecordBatch, name: str) -> ArrayLike:
    if name not in batch.schema.names:
        raise KeyError(f"column {name!r} not in batch; its columns are {batch.schema.names}")
    return batch.column(name)


def _blank(col: ArrayLike) -> np.ndarray:
    """True where a string is null, empty or only whitespace. (N,) bool"""
    blank = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
    return _to_bool(blank)


def _to_bool(mask: ArrayLike) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _flat(col: ArrayLike) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


# ---------------------------------------------------------------- duplicates
def duplicated_ids(product_ids: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> set[str]:
    """The product ids that appear more than once.

    Null, empty and whitespace-only ids are ignored (they are rejected as "missing_product_id"
    anyway). Ids are compared exactly as stored: "A1" and "A1 " are different ids. For a whole run,
    call this on the run's entire product_id column (all files), not per batch: a duplicate
    split across two batches must still reject every row that shares it.
    """
    if isinstance(product_ids, (pa.Array, pa.ChunkedArray)):
        ids = _string_column(product_ids, "product_id")
    else:
        ids = pa.array(list(product_ids), type=pa.string())
    if len(ids) == 0:
        return set()
    ids = ids.filter(pc.invert(pa.array(_blank(ids))))
    counts = pc.value_counts(ids)  # struct<values, counts>
    if isinstance(counts, pa.ChunkedArray):
        counts = counts.combine_chunks()
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    return set(repeated.field("values").to_pylist())


# ---------------------------------------------------------------- validation
@dataclass
class Validation:
    """Per-row outcome of `validate_batch`, in input order (all lists have one entry per row)."""

    reason: list[str | None]  # reject reason (a REJECT_REASONS key); None = valid
    content_hash: list[str | None]  # 64-hex content_hash for valid rows; None for rejected rows
    detail: list[str | None] | None = None  # human message per rejected row; None = none given

    def __post_init__(self) -> None:
        n = len(self.reason)
        if len(self.content_hash) != n or (self.detail is not None and len(self.detail) != n):
            raise ValueError(
                f"Validation lists must have one entry per row; got reason={n}, "
                f"content_hash={len(self.content_hash)}, "
                f"detail={None if self.detail is None else len(self.detail)}"
            )

    @property
    def valid(self) -> pa.BooleanArray:
        """Boolean mask of the valid rows, ready for `batch.filter(validation.valid)`."""
        return pa.array([r is None for r in self.reason], type=pa.bool_())

    @property
    def num_rejected(self) -> int:
        return sum(r is not None for r in self.reason)


def validate_batch(
    batch: pa.Table | pa.RecordBatch,
    *,
    product_id_col: str = "product_id",
    title_col: str = "title",
    image_col: str | None = "image",
    image_uri_col: str | None = None,
    duplicates: AbstractSet[str] = frozenset(),
    max_image_bytes: int,
) -> Validation:
    """Check every row of a catalog batch; the first failing rule gives the row's reason.

    Rules, in order:
      1. product_id null, empty or whitespace -> "missing_product_id"
      2. product_id in `duplicates` (from `duplicated_ids` over the whole run) ->
         "duplicate_product_id"; every row sharing the id is rejected
      3. title null, empty or whitespace -> "empty_title"
      4. no non-empty inline image bytes and no non-blank image URI -> "missing_image"
      5. inline image bytes longer than `max_image_bytes` -> "image_too_large"

    A row with both inline bytes and a URI uses the bytes. A URI row's size is checked when it is
    fetched, not here.

    Valid rows get `content_hash(image bytes, title)`. For URI-only rows the hash is taken over
    the URI string (UTF-8) instead of the image bytes, because validation fetches nothing. So a
    product counts as changed when its URI changes, but an object rewritten in place under the same
    URI is not noticed. The job can re-hash the fetched bytes with `content_hash` if it needs to
    catch that.
    """
    if image_col is None and image_uri_col is None:
        raise ValueError("validate_batch needs image_col or image_uri_col; got neither")
    if isinstance(max_image_bytes, bool) or not isinstance(max_image_bytes, int):
        raise TypeError(f"max_image_bytes must be an int, got {type(max_image_bytes).__name__}")
    if max_image_bytes <= 0:
        raise ValueError(f"max_image_bytes must be positive, got {max_image_bytes}")

    n = batch.num_rows
    ids = _string_column(_column(batch, product_id_col), product_id_col)
    titles = _string_column(_column(batch, title_col), title_col)
    images = None if image_col is None else _binary_column(_column(batch, image_col), image_col)
    uris = (
        None
        if image_uri_col is None
        else _string_column(_column(batch, image_uri_col), image_uri_col)
    )

    missing_id = _blank(ids)  # (N,) bool, like every mask below
    if duplicates:
        dup_set = pa.array(sorted(duplicates), type=pa.string())
        duplicate = _to_bool(pc.is_in(ids, value_set=dup_set))
    else:
        duplicate = np.zeros(n, dtype=bool)
    empty_title = _blank(titles)
    if images is not None:
        image_len = pc.fill_null(pc.binary_length(images), 0).to_numpy(zero_copy_only=False)
        image_len = np.asarray(image_len, dtype=np.int64)
    else:
        image_len = np.zeros(n, dtype=np.int64)
    has_bytes = image_len > 0
    has_uri = ~_blank(uris) if uris is not None else np.zeros(n, dtype=bool)
    too_large = has_bytes & (image_len > max_image_bytes)

    # np.select takes the first true condition: the rule order above.
    conditions = [missing_id, duplicate, empty_title, ~(has_bytes | has_uri), too_large]
    code = np.select(conditions, np.arange(1, len(conditions) + 1), default=0)  # 0 = valid

    reason: list[str | None] = [None if c == 0 else REJECT_REASONS[c - 1] for c in code.tolist()]
    detail: list[str | None] = [None] * n
    hashes: list[str | None] = [None] * n

    rejected = np.flatnonzero(code)
    if rejected.size:
        take = pa.array(rejected, type=pa.int64())
        rejected_ids = ids.take(take).to_pylist()
        for i, pid in zip(rejected.tolist(), rejected_ids, strict=True):
            detail[i] = _detail(
                reason[i],
                pid,
                int(image_len[i]),
                max_image_bytes=max_image_bytes,
                product_id_col=product_id_col,
                title_col=title_col,
                image_col=image_col,
                image_uri_col=image_uri_col,
            )

    valid = np.flatnonzero(code == 0)
    if valid.size:
        take = pa.array(valid, type=pa.int64())
        valid_titles = titles.take(take).to_pylist()
        valid_bytes = images.take(take).to_pylist() if images is not None else [None] * valid.size
        valid_uris = uris.take(take).to_pylist() if uris is not None else [None] * valid.size
        for i, title, data, uri in zip(
            valid.tolist(), valid_titles, valid_bytes, valid_uris, strict=True
        ):
            # Rule 4 guarantees non-empty bytes or a non-blank URI here.
            payload = data if data else uri.encode("utf-8")
            hashes[i] = content_hash(payload, title)
    return Validation(reason=reason, content_hash=hashes, detail=detail)


def _detail(
    reason: str | None,
    product_id: str | None,
    image_len: int,
    *,
    max_image_bytes: int,
    product_id_col: str,
    title_col: str,
    image_col: str | None,
    image_uri_col: str | None,
) -> str:
    if reason == "missing_product_id":
        return f"{product_id_col} is {'null' if product_id is None else repr(product_id)}"
    if reason == "duplicate_product_id":
        return (
            f"{product_id_col} {product_id!r} is on more than one row of this run; all are rejected"
        )
    if reason == "empty_title":
        return f"{title_col} is null, empty or whitespace"
    if reason == "missing_image":
        given = " or ".join(
            f"{kind} column {col!r}"
            for kind, col in (("bytes", image_col), ("URI", image_uri_col))
            if col is not None
        )
        return f"no image: expected non-empty {given}"
    if reason == "image_too_large":
        return f"inline image is {image_len} bytes, limit is max_image_bytes={max_image_bytes}"
    raise AssertionError(f"no detail message for reason {reason!r}")  # a rule without a message


# ---------------------------------------------------------------- rejects rows
def reject_rows(
    batch: pa.Table | pa.RecordBatch,
    validation: Validation,
    *,
    run_id: str,
    source_file_col: str | None,
    row_number_col: str | None,
    stage: str,
    product_id_col: str = "product_id",
) -> pa.Table:
    """`rejects` rows (REJECTS_SCHEMA) for the rows of `batch` that `validation` rejected.

    Works for any stage: the decode stage can build a `Validation` from its decode errors
    (`reason=[e.reason ...]`, `detail=[str(e) ...]`). product_id is copied as stored (an empty
    string stays empty, null stays null). source_file and row_number are null when their column is
    None.
    """
    if not run_id:
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    if not stage:
        raise ValueError(f"stage must be a non-empty string, got {stage!r}")
    if len(validation.reason) != batch.num_rows:
        raise ValueError(
            f"validation has {len(validation.reason)} rows but the batch has {batch.num_rows}"
        )
    rows = [i for i, r in enumerate(validation.reason) if r is not None]
    n = len(rows)
    take = pa.array(rows, type=pa.int64())

    def taken(col: str | None, kind: pa.DataType) -> pa.Array:
        if col is None:
            return pa.nulls(n, type=kind)
        values = _column(batch, col)
        if pa.types.is_string(kind):
            values = _string_column(values, col)
        return _flat(values.take(take)).cast(kind)

    details = validation.detail if validation.detail is not None else [None] * batch.num_rows
    return pa.Table.from_arrays(
        [
            pa.array([run_id] * n, type=pa.string()),
            taken(product_id_col, pa.string()),
            taken(source_file_col, pa.string()),
            taken(row_number_col, pa.int64()),
            pa.array([stage] * n, type=pa.string()),
            pa.array([validation.reason[i] for i in rows], type=pa.string()),
            pa.array([details[i] for i in rows], type=pa.string()),
        ],
        schema=REJECTS_SCHEMA,
    )
