"""Staging the run's encoded rows and merging them into ``products`` with Lance itself (no Ray).

Why not LanceDB's ``add`` and ``merge_insert``: both take the rows through the process that calls
them. When the driver staged every encoded row itself and then merged the whole staging table with
``merge_insert``, its memory grew with the run's size (the merge alone held about 3.5× the staged
bytes: 10k tiny-model rows, 120 MB, cost 440 MB; its indexed path more). So:

* **Stage, in parallel.** A Ray Data task after the encoder (``write_staged_rows``) writes the
  batch's encoded rows as Lance data files of the staging dataset, uncommitted, and passes on only
  the batch's accounting (status, reason, product_id, source file, row number) and the written
  fragments' metadata. Image bytes never reach the driver.
* **Save work as it goes.** The driver commits the fragments it has been told about every
  ``index.stage_flush_rows`` rows (``StagingCommitter``): a manifest commit, no data. A run killed
  at any point leaves a readable staging table holding whatever was committed (files written but
  not committed are never read); the rerun reuses those rows.
* **Merge, in one commit.** ``merge_staged`` streams the rows to keep from the staging dataset into
  new data files of ``products`` (bounded read-ahead, bounded file size), marks the rows they
  replace (and, with ``delete_missing``, the rows of products gone from the source) deleted, and
  commits all of it as a single Lance ``Update`` transaction: readers see the old version or the
  new one, and a product_id is never in the table twice.

A products table or staging dataset written before the ITM token columns existed gains them
(null in its old rows, a metadata-only commit) before rows that carry them are added to it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.indexing.stages import (
    DETAIL,
    PEAK_RSS,
    REASON,
    ROW_NUMBER,
    SOURCE_FILE,
    STATUS,
    cap_malloc_retention,
)
from pipelines.indexing.tables import missing_token_fields

logger = logging.getLogger(__name__)

FRAGMENTS = "_fragments"  # JSON list of the Lance fragments a staging task wrote (first row only)
ACCOUNTING_COLUMNS = (
    "product_id",
    "content_hash",
    STATUS,
    REASON,
    DETAIL,
    SOURCE_FILE,
    ROW_NUMBER,
    PEAK_RSS,
    "indexed_at",  # when the encoder finished the row's batch: the job's throughput timeline
)
# The Lance writer holds about one data file's worth of pages until it finishes the file, so the
# file size bounds the memory of staging tasks and of the merge (measured: 64 MiB files kept the
# merge at ~110 MB over its baseline for 10k and 30k rows; unbounded files grew with the rows).
MAX_FILE_BYTES = 64 * 2**20
MAX_ROWS_PER_FILE = 64 * 1024
SCAN_BATCH_ROWS = 256
SCAN_IO_BYTES = 16 * 2**20  # Lance's scan read-ahead (its default is 2 GiB)
_ROW_OFFSET_MASK = 0xFFFFFFFF  # a Lance row address is fragment_id << 32 | row offset


def dataset_uri(index_uri: str, table: str) -> str:
    """Where LanceDB keeps ``table`` of the database at ``index_uri`` (local folder or ``s3://``)."""
    return f"{str(index_uri).rstrip('/')}/{table}.lance"


def _open(uri: str, storage_options: dict | None):
    import lance

    return lance.dataset(uri, storage_options=storage_options or None)


def add_token_columns(dataset) -> bool:
    """Give the opened Lance ``dataset`` the ITM token columns it lacks (all null: a
    metadata-only commit), so rows carrying tokens can be added to a dataset written before they
    existed. Returns whether it added any (then reopen it to read the new version)."""
    missing = missing_token_fields(dataset.schema)
    if not missing:
        return False
    dataset.add_columns(missing)
    logger.info("%s: added columns %s", dataset.uri, [f.name for f in missing])
    return True


# ---- stage (a Ray Data task per batch, after the encoder) ---------------------------------------
def write_staged_rows(
    batch: pa.Table,
    *,
    uri: str,
    schema: pa.Schema,
    run_id: str,
    storage_options: dict | None = None,
) -> pa.Table:
    """``map_batches`` UDF: write the batch's ``indexed`` rows as uncommitted Lance data files of
    the staging dataset at ``uri`` and return only the batch's accounting columns, with the written
    fragments' metadata (JSON) on its first row. The driver commits those fragments."""
    from lance.fragment import write_fragments

    cap_malloc_retention()
    indexed = batch.filter(pc.equal(batch.column(STATUS), "indexed"))
    fragments: list[str] = []
    if indexed.num_rows:
        rows = indexed.append_column("run_id", pa.array([run_id] * indexed.num_rows, pa.string()))
        for field in missing_token_fields(rows.schema):  # an encoder output without tokens
            rows = rows.append_column(field, pa.nulls(rows.num_rows, field.type))
        rows = rows.select(schema.names)
        written = write_fragments(
            rows.cast(schema),
            uri,
            schema=schema,
            max_rows_per_file=MAX_ROWS_PER_FILE,
            max_bytes_per_file=MAX_FILE_BYTES,
            storage_options=storage_options or None,
        )
        fragments = [f.to_json() for f in written]
    out = batch.select(list(ACCOUNTING_COLUMNS))
    meta = [None] * batch.num_rows
    if fragments and meta:
        meta[0] = json.dumps(fragments)
    return out.append_column(FRAGMENTS, pa.array(meta, pa.string()))


class StagingCommitter:
    """The driver's side of staging: commits the fragments that staging tasks wrote, every
    ``flush_rows`` rows and at the end. The first commit creates the staging dataset (so a
    staging table exists only once it holds rows), later ones append to it. Made before the
    stream starts (the staging tasks write into an existing dataset as it is then)."""

    def __init__(
        self, uri: str, schema: pa.Schema, *, exists: bool, storage_options: dict | None = None
    ):
        self.uri = uri
        self.schema = schema
        self.exists = exists
        self.storage_options = storage_options or None
        self._pending: list = []
        self.pending_rows = 0
        self.committed_rows = 0
        self.commits = 0
        if exists:  # left by an interrupted run, maybe before the token columns: the staging
            # tasks' writes check the dataset's schema, so it gains them before the stream starts
            add_token_columns(_open(uri, self.storage_options))

    def add(self, fragments_json: Iterable[str | None]) -> None:
        from lance.fragment import FragmentMetadata

        for doc in fragments_json:
            if doc:
                for frag in json.loads(doc):
                    fragment = FragmentMetadata.from_json(json.dumps(frag))
                    self._pending.append(fragment)
                    self.pending_rows += fragment.num_rows

    def commit(self) -> None:
        import lance
        from lance import LanceOperation

        if not self._pending:
            return
        if self.exists:
            read_version = _open(self.uri, self.storage_options).version
            op = LanceOperation.Append(self._pending)
        else:
            read_version = None
            op = LanceOperation.Overwrite(self.schema, self._pending)
        lance.LanceDataset.commit(
            self.uri, op, read_version=read_version, storage_options=self.storage_options
        )
        self.exists = True
        self.committed_rows += self.pending_rows
        self.commits += 1
        self._pending, self.pending_rows = [], 0


# ---- merge (the driver, once) -------------------------------------------------------------------
def _rows_to_keep(
    staging, schema: pa.Schema, keep: dict[str, str], written: set[str]
) -> Iterator[pa.RecordBatch]:
    """The staging rows this run publishes: the product's current content hash (a row staged for
    an older version of the product is skipped), each product_id once. Streamed with bounded
    read-ahead: memory does not grow with the staging table. Columns the staging dataset lacks
    (staged before they existed) come out null."""
    present = [n for n in schema.names if n in staging.schema.names]
    scanner = staging.scanner(
        columns=present,
        batch_size=SCAN_BATCH_ROWS,
        fragment_readahead=1,
        batch_readahead=1,
        io_buffer_size=SCAN_IO_BYTES,
    )
    for rb in scanner.to_batches():
        ids = rb.column("product_id").to_pylist()
        hashes = rb.column("content_hash").to_pylist()
        mask = []
        for pid, h in zip(ids, hashes, strict=True):
            take = pid not in written and keep.get(pid) == h
            if take:
                written.add(pid)
            mask.append(take)
        picked = rb.filter(pa.array(mask, pa.bool_()))
        if picked.num_rows:
            yield _with_columns(picked, schema)


def _with_columns(rb: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``rb`` with ``schema``'s columns in its order, nulls for those it lacks."""
    if all(name in rb.schema.names for name in schema.names):
        return rb.select(schema.names)
    n = rb.num_rows
    arrays = [
        rb.column(f.name) if f.name in rb.schema.names else pa.nulls(n, f.type) for f in schema
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _deletions(products, replaced: pa.Array, source_ids: pa.Array | None) -> tuple[list, list, int]:
    """Fragments of ``products`` with the rows that ``replaced`` supersedes (and, given
    ``source_ids``, the rows of products absent from the source) marked deleted: (removed fragment
    ids, updated fragment metadata, rows deleted as missing). Reads only the product_id column."""
    removed, updated, missing = [], [], 0
    for frag in products.get_fragments():
        t = frag.to_table(columns=["product_id"], with_row_address=True)
        ids = t.column("product_id")
        drop = pc.is_in(ids, value_set=replaced)
        if source_ids is not None:
            gone = pc.invert(pc.is_in(ids, value_set=source_ids))
            missing += pc.sum(pc.and_not(gone, drop)).as_py() or 0
            drop = pc.or_(drop, gone)
        addrs = pc.filter(t.column("_rowaddr"), drop).to_numpy()
        if not len(addrs):
            continue
        new = frag.delete_rows((addrs & _ROW_OFFSET_MASK).astype(np.int64).tolist())
        if new is None:
            removed.append(frag.fragment_id)
        else:
            updated.append(new)
    return removed, updated, missing


def merge_staged(
    products_uri: str,
    staging_uri: str | None,
    keep: dict[str, str],
    *,
    source_ids: pa.Array | None = None,
    storage_options: dict | None = None,
) -> tuple[int | None, int, int]:
    """Merge the staged rows of ``keep`` (product_id -> content hash) into the products dataset by
    product_id, in one commit: new rows inserted, older rows of the same products deleted, and
    with ``source_ids`` (the run's product ids) the products absent from the source deleted too.

    Returns (new version or None when nothing changed, rows written, rows deleted as missing).
    """
    import lance
    from lance import LanceOperation
    from lance.fragment import write_fragments

    cap_malloc_retention()
    products = _open(products_uri, storage_options)
    # Staged rows carry ITM tokens: a products table written before them gets the columns.
    if staging_uri is not None and keep and add_token_columns(products):
        products = _open(products_uri, storage_options)
    read_version = products.version
    schema = products.schema
    written: set[str] = set()
    new_fragments = []
    if staging_uri is not None and keep:
        staging = _open(staging_uri, storage_options)
        reader = pa.RecordBatchReader.from_batches(
            schema, _rows_to_keep(staging, schema, keep, written)
        )
        new_fragments = write_fragments(
            reader,
            products_uri,
            schema=schema,
            max_rows_per_file=MAX_ROWS_PER_FILE,
            max_bytes_per_file=MAX_FILE_BYTES,
            data_storage_version=products.data_storage_version,
            storage_options=storage_options or None,
        )
    missing_keep = set(keep) - written
    if missing_keep:  # the accounting counted them as indexed: they must be in the table
        raise RuntimeError(
            f"{len(missing_keep)} staged rows not found in staging, e.g. {sorted(missing_keep)[:3]}"
        )
    removed, updated, deleted = _deletions(
        products, pa.array(sorted(written), pa.string()), source_ids
    )
    if not (new_fragments or removed or updated):
        return None, 0, 0
    op = LanceOperation.Update(
        removed_fragment_ids=removed, updated_fragments=updated, new_fragments=new_fragments
    )
    done = lance.LanceDataset.commit(
        products_uri, op, read_version=read_version, storage_options=storage_options or None
    )
    logger.info(
        "merged %d staged rows into %s (%d fragments rewritten for deletions, %d removed, "
        "%d missing deleted): version %d",
        len(written),
        products_uri,
        len(updated),
        len(removed),
        deleted,
        done.version,
    )
    return done.version, len(written), deleted
