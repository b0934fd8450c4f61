"""The index version a replica serves: the products table at the ``published`` version, on local disk.

A replica pins one version (:class:`Snapshot`) and answers every request from it; a watcher opens
the next published version beside it and swaps the reference, so each request sees one version
wholly. An ``s3://`` index is copied to a local folder first: no S3 read sits on the query path.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from blip_ops.token_cache import StoredTokens
from pipelines.indexing import tables
from pipelines.search.request import BadRequest
from pipelines.storage import S3Settings, filesystem_for, is_s3, join

logger = logging.getLogger(__name__)

# Columns the job writes that are not client-visible metadata (never filterable, never returned
# as metadata): the products schema without metadata columns, so the two cannot drift apart.
SYSTEM_COLUMNS = frozenset(tables.products_schema(1).names)
VECTOR = "image_embedding"
_CARGO_PATH = re.compile(r",\s*/\S*\.rs:\d+:\d+.*$", re.S)


class NoPublishedIndex(RuntimeError):
    """The index has no published run yet (run the index job first)."""


@dataclass
class Snapshot:
    """One published version of the products table, opened from local disk."""

    table: object  # lancedb table, checked out at `version`
    products_table: str
    version: int
    model_id: str
    run_id: str
    rows: int
    metadata_columns: tuple[str, ...]
    local_dir: str | None = None  # the local copy of an s3:// index (removed when replaced)
    # Set by the service: the model that encoded this version (None: the configured one) and its
    # query text settings.
    model_ref: tuple | None = None
    text_settings: object | None = None
    # Query-time ANN settings (index.search_*): nprobes, refine_factor, ef; absent = LanceDB's.
    ann: dict = field(default_factory=dict)
    filter_columns: tuple[str, ...] = field(init=False)
    has_fts: bool = field(init=False)
    stored_tokens: int = field(init=False)  # rows with ITM tokens stored by the index job
    _facets: dict | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.filter_columns = ("product_id", "title", *self.metadata_columns)
        indexed = {c for i in self.table.list_indices() for c in i.columns}
        self.has_fts = "title_normalized" in indexed
        # Counted once per version (the small shape column): a table without stored tokens
        # (older, store_itm_tokens=never, or tokens over the size limit) re-ranks as before,
        # with no read of the token column.
        shape = tables.ITM_TOKENS_SHAPE
        self.stored_tokens = (
            self.table.count_rows(f"{shape} IS NOT NULL") if shape in self.table.schema.names else 0
        )

    @property
    def key(self) -> tuple[str, int]:
        return (self.products_table, self.version)

    def describe(self) -> dict:
        return {
            "products_table": self.products_table,
            "table_version": self.version,
            "model_id": self.model_id,
            "run_id": self.run_id,
            "rows": self.rows,
        }

    # ---- queries (blocking: call them from a thread in async code) --------------------------
    def candidates(self, vector: np.ndarray, n: int, where: str | None = None) -> pa.Table:
        """ANN (or exact, below the index threshold) top ``n`` by cosine, optionally filtered:
        product_id, title, content_hash, metadata, ``itc`` (cosine) and ``_rowid``."""
        query = (
            self.table.search(np.asarray(vector, np.float32), vector_column_name=VECTOR)
            .distance_type("cosine")
            .select(["product_id", "title", "content_hash", *self.metadata_columns, "_distance"])
            .with_row_id(True)
            .limit(n)
        )
        for setting, value in self.ann.items():  # nprobes / refine_factor / ef
            query = getattr(query, setting)(value)
        found = self._execute(query, where)
        itc = pc.subtract(pa.scalar(1.0, pa.float32()), found.column("_distance"))
        return found.append_column("itc", itc.cast(pa.float32())).drop_columns(["_distance"])

    def _execute(self, query, where: str | None) -> pa.Table:
        """Run a LanceDB query with the client's filter (checked first); LanceDB's refusals of
        that filter become a 400, anything else propagates."""
        from pipelines.search.filters import check_filter

        if where:
            query = query.where(check_filter(where, self.filter_columns), prefilter=True)
        try:
            return query.to_arrow()
        except ValueError as err:
            if where and str(err).startswith("Invalid input"):
                raise BadRequest(f"`filter` is not valid here: {_clean(err)}") from None
            raise

    def lexical(self, text: str, n: int, where: str | None = None) -> pa.Table | None:
        """BM25 top ``n`` on ``title_normalized`` (``text`` already normalised): the columns of
        :meth:`candidates` with ``bm25`` instead of ``itc``, plus ``image_embedding``; None when
        there is no full-text index or nothing to search for."""
        columns = ["product_id", "title", "content_hash", *self.metadata_columns]
        if not text.strip() or not self.has_fts:
            return None
        query = (
            self.table.search(text, query_type="fts", fts_columns="title_normalized")
            .select([*columns, "image_embedding", "_score"])
            .with_row_id(True)
            .limit(n)
        )
        try:
            found = self._execute(query, where)
        except BadRequest:
            raise
        except ValueError as err:  # not the client's filter: search on without BM25
            logger.warning("full-text query failed, vector candidates only: %s", _clean(err))
            return None
        return found.rename_columns(["bm25" if c == "_score" else c for c in found.column_names])

    def _take(self, row_ids: list[int], columns: list[str]) -> list[dict]:
        """``columns`` of rows ``row_ids`` (as ``candidates`` returned them), in that order."""
        if not row_ids:
            return []
        got = self.table.take_row_ids(list(row_ids)).select(columns).with_row_id().to_arrow()
        by_id = dict(zip(got.column("_rowid").to_pylist(), got.to_pylist(), strict=True))
        return [by_id[r] for r in row_ids]

    def model_images(self, row_ids: list[int]) -> list[bytes]:
        """The model-resolution JPEGs of rows ``row_ids`` (as ``candidates`` returned them), in order."""
        return [row["model_image"] for row in self._take(row_ids, ["model_image"])]

    def rerank_inputs(
        self, row_ids: list[int]
    ) -> tuple[list[bytes | None], list[StoredTokens | None]]:
        """What the re-rank of rows ``row_ids`` needs, in order: (model-resolution JPEGs, stored
        ITM tokens). Rows with stored tokens get None for the JPEG (it is not read); the others
        None for tokens, and their JPEG. Only these rows' tokens are read (take by row id), never
        the token column of the ANN candidates beyond them."""
        tokens: list[StoredTokens | None] = [None] * len(row_ids)
        if self.stored_tokens:
            cols = [tables.ITM_TOKENS, tables.ITM_TOKENS_SHAPE]
            for i, row in enumerate(self._take(row_ids, cols)):
                tokens[i] = _stored(row[tables.ITM_TOKENS], row[tables.ITM_TOKENS_SHAPE])
        need = [r for r, t in zip(row_ids, tokens, strict=True) if t is None]
        found = iter(self.model_images(need))
        images = [next(found) if t is None else None for t in tokens]
        return images, tokens

    def warm_up(self, candidates: int, rerank_k: int) -> float:
        """One made-up query's reads: the ANN search of ``candidates`` rows, then the re-rank
        inputs of the first ``rerank_k``, so that the first real query on this version does not
        pay for opening the index and data files (10,000 compact rows on 2 cores: the first ANN
        search ~16 ms against ~5 ms after); returns seconds."""
        started = time.perf_counter()
        dim = self.table.schema.field(VECTOR).type.list_size
        found = self.candidates(np.full(dim, dim**-0.5, np.float32), max(1, candidates))
        self.rerank_inputs(found.column("_rowid").to_pylist()[: max(0, rerank_k)])
        return time.perf_counter() - started

    def product(self, product_id: str, columns: list[str] | None = None) -> dict | None:
        cols = columns or [
            "product_id",
            "title",
            *self.metadata_columns,
            "content_hash",
            "model_id",
            "run_id",
        ]
        rows = (
            self.table.search()
            .where(f"product_id = '{product_id.replace(chr(39), chr(39) * 2)}'")
            .select(cols)
            .limit(1)
            .to_arrow()
            .to_pylist()
        )
        return rows[0] if rows else None

    def facets(self, max_values: int = 100) -> dict:
        """Filter choices for the metadata columns, computed once per version: the distinct values
        of string columns with at most ``max_values`` of them, min/max of numeric ones."""
        if self._facets is None:
            data = self.table.search().select(list(self.metadata_columns)).limit(None).to_arrow()
            out: dict[str, dict] = {}
            for name in self.metadata_columns:
                col = data.column(name)
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    values = pc.unique(col.drop_null()).to_pylist()
                    if len(values) <= max_values:
                        out[name] = {"values": sorted(values)}
                elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
                    mm = pc.min_max(col)
                    out[name] = {"min": mm["min"].as_py(), "max": mm["max"].as_py()}
            self._facets = out
        return self._facets

    def close(self) -> None:
        if self.local_dir:
            shutil.rmtree(self.local_dir, ignore_errors=True)


def _stored(data: bytes | None, shape: list[int] | None) -> StoredTokens | None:
    """A row's stored tokens, or None when it has none or they are unusable (logged: its re-rank
    then recomputes them from the model-resolution image)."""
    if data is None or shape is None:
        return None
    try:
        return StoredTokens(data, (int(shape[0]), int(shape[1])))
    except ValueError as err:
        logger.warning("ignoring stored ITM tokens: %s", err)
        return None


def _clean(err: Exception) -> str:
    """LanceDB's message without the Rust source path it appends."""
    return _CARGO_PATH.sub("", str(err)).strip()[:300]


def ann_settings(index) -> dict:
    """The query-time ANN settings of an ``IndexConfig`` that are set (``index.search_*``)."""
    settings = {
        "nprobes": index.search_nprobes,
        "refine_factor": index.search_refine_factor,
        "ef": index.search_ef,
    }
    return {k: v for k, v in settings.items() if v is not None}


def published_pointer(index_uri: str, s3: S3Settings | None = None) -> dict | None:
    """The newest completed run at the ``published`` tag (table name, version, model_id)."""
    db = tables.connect(index_uri, s3)
    return tables.published_run(db)


def _local_copy(
    index_uri: str, table_name: str, s3: S3Settings | None, cache_dir: str | None
) -> str:
    """Copy ``<index>/<table>.lance`` from S3 to a fresh local folder; return that folder."""
    import pyarrow.fs as pafs

    base = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "blip-search-cache"
    base.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f"{table_name}-", dir=base))
    fs, root = filesystem_for(join(index_uri, f"{table_name}.lance"), s3)
    pafs.copy_files(
        root,
        str(dest / f"{table_name}.lance"),
        source_filesystem=fs,
        destination_filesystem=pafs.LocalFileSystem(),
        use_threads=True,
    )
    return str(dest)


def open_snapshot(
    index_uri: str,
    s3: S3Settings | None = None,
    *,
    cache_dir: str | None = None,
    pointer: dict | None = None,
    ann: dict | None = None,
) -> Snapshot:
    """Open the published version (``pointer`` from :func:`published_pointer`, or looked up)."""
    pointer = pointer or published_pointer(index_uri, s3)
    if pointer is None:
        raise NoPublishedIndex(
            f"no published index at {index_uri}: run `python -m pipelines.index_catalog` first"
        )
    name, version = pointer["products_table"], int(pointer["products_version"])
    local_dir = None
    if is_s3(index_uri):
        local_dir = _local_copy(index_uri, name, s3, cache_dir)
        db = tables.connect(local_dir)
    else:
        db = tables.connect(index_uri, s3)
    table = db.open_table(name)
    table.checkout(version)
    names = table.schema.names
    snap = Snapshot(
        table=table,
        products_table=name,
        version=version,
        model_id=pointer["model_id"],
        run_id=pointer["run_id"],
        rows=table.count_rows(),
        metadata_columns=tuple(c for c in names if c not in SYSTEM_COLUMNS),
        local_dir=local_dir,
        ann=dict(ann or {}),
    )
    logger.info(
        "opened %s version %d (%d rows, model %s)%s",
        name,
        version,
        snap.rows,
        snap.model_id,
        f" from a local copy in {local_dir}" if local_dir else "",
    )
    return snap
