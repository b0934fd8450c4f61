"""One analyst export: resolve the table version, plan the rows (a table, or batch search results),
stream them into Parquet with their provenance, and commit the output atomically.

``export(cfg, ExportRequest(...))`` runs it; ``pipelines/export.py`` is its command line and
describes what is read and written."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipelines.config import (
    AppConfig,
    config_digest,
    dump_config,
)
from pipelines.exporting.errors import ExportError
from pipelines.exporting.output import abandon, commit, prepare_output, utc_now
from pipelines.exporting.parquet import Progress, with_metadata, write_parquet
from pipelines.exporting.queries import (
    SEARCH_SCHEMA,
    BatchedScorer,
    load_query_model,
    read_queries,
    search_batches,
)
from pipelines.exporting.source import (
    EMBEDDING,
    Source,
    check_filter,
    resolve_source,
    select_columns,
    table_batches,
)
from pipelines.indexing import tables
from pipelines.storage import S3Settings

logger = logging.getLogger(__name__)


WHATS = ("products", "rejects", "runs", "search")


# Provenance in every Parquet file's key-value metadata (all values strings).
METADATA_KEYS = (
    "what",
    "index_uri",
    "table",
    "table_version",
    "version_spec",
    "tag",
    "run_id",
    "model_id",
    "columns",
    "filter",
    "with_embeddings",
    "with_itm_tokens",
    "queries",
    "export_id",
    "created_at",
    "config_digest",
    "config",
)


@dataclass
class ExportRequest:
    """What the command line asked (the rest comes from the config)."""

    what: str
    out: str
    version: str | None = None
    columns: list[str] | None = None
    filter: str | None = None
    with_embeddings: bool = False
    queries: str | None = None
    with_itm_tokens: bool = False  # products: add the stored ITM tokens and their shape


def new_export_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _check_request(req: ExportRequest, cfg: AppConfig) -> None:
    if req.what not in WHATS:
        raise ExportError(f"--what must be one of {list(WHATS)}, got {req.what!r}")
    if req.what == "search":
        if not req.queries:
            raise ExportError("--what search needs --queries FILE (CSV, Parquet or JSONL)")
        if req.columns is not None or req.with_embeddings or req.with_itm_tokens:
            raise ExportError(
                "--columns, --with-embeddings and --with-itm-tokens apply to table exports, "
                "not search"
            )
    elif req.queries:
        raise ExportError(f"--queries applies to --what search, not {req.what}")
    if req.what != "products" and req.with_embeddings:
        raise ExportError(f"--with-embeddings: only products have embeddings, not {req.what}")
    if req.what != "products" and req.with_itm_tokens:
        raise ExportError(f"--with-itm-tokens: only products have ITM tokens, not {req.what}")


def export(cfg: AppConfig, req: ExportRequest) -> dict:
    """Run one export; returns its summary. ExportError on bad input (nothing is left behind)."""
    _check_request(req, cfg)
    started = time.perf_counter()
    s3 = S3Settings.from_config(cfg.s3)
    db = tables.connect(cfg.index.uri, s3)
    source = resolve_source(db, req.what, req.version, cfg.index.table)
    records = read_queries(req.queries, s3) if req.what == "search" else None
    export_id = new_export_id()
    metadata = {
        "what": req.what,
        "index_uri": cfg.index.uri,
        "table": source.name,
        "table_version": str(source.version),
        "version_spec": source.version_spec,
        "tag": source.tag or "",
        "run_id": source.run_id or "",
        "model_id": source.model_id or "",
        "filter": req.filter or "",
        "with_embeddings": str(req.with_embeddings).lower(),
        "with_itm_tokens": str(req.with_itm_tokens).lower(),
        "queries": req.queries or "",
        "export_id": export_id,
        "created_at": utc_now(),
        "config_digest": config_digest(cfg),
        "config": dump_config(cfg),
    }
    extra: dict[str, Any] = {}
    if req.what == "search":
        plan = _plan_search(cfg, source, req, records, s3)
        metadata["columns"] = json.dumps(SEARCH_SCHEMA.names)
    else:
        plan = _plan_table(cfg, source, req)
        metadata["columns"] = json.dumps(plan.columns)
    output = prepare_output(req.out, s3, export_id)
    progress = Progress(f"export {req.what}", cfg.export.progress_seconds)
    write_started = time.perf_counter()
    try:
        reader = with_metadata(plan.reader(), metadata, progress)
        files = write_parquet(reader, output.fs, output.tmp, cfg, plan.partition_by)
        write_s = time.perf_counter() - write_started
        rows = sum(f.rows for f in files)
        extra = plan.summary()
        manifest = {
            **{k: v for k, v in metadata.items() if k != "config"},
            "out": req.out,
            "rows": rows,
            "bytes": sum(f.bytes for f in files),
            "files": [{"path": f.path, "rows": f.rows, "bytes": f.bytes} for f in files],
            "columns": plan.columns,
            "partition_by": list(plan.partition_by),
            "write_seconds": round(write_s, 3),
            **extra,
        }
        commit(output, files, metadata["config"], manifest)
    except BaseException:
        abandon(output)
        raise
    return {
        **manifest,
        "seconds": round(time.perf_counter() - started, 3),
        "rows_per_s": round(rows / write_s, 1) if write_s > 0 else None,
    }


@dataclass
class Plan:
    """How one export produces its rows (checked before any output exists)."""

    columns: list[str]
    reader: Callable[[], pa.RecordBatchReader]
    partition_by: Sequence[str] = ()
    summary: Callable[[], dict] = dict


def _plan_table(cfg: AppConfig, source: Source, req: ExportRequest) -> Plan:
    dataset = source.table.to_lance()
    partition_by = list(cfg.export.partition_by) if req.what == "products" else []
    columns = select_columns(
        dataset.schema.names,
        req.what,
        req.columns,
        req.with_embeddings,
        partition_by,
        with_itm_tokens=req.with_itm_tokens,
    )
    where = check_filter(dataset, req.filter)
    return Plan(
        columns,
        lambda: table_batches(dataset, columns, where, cfg.export),
        partition_by,
    )


def _plan_search(
    cfg: AppConfig, source: Source, req: ExportRequest, records, s3: S3Settings
) -> Plan:
    from pipelines.search.request import BadRequest, Limits
    from pipelines.search.scorer import QueryScorer
    from pipelines.search.snapshot import ann_settings, open_snapshot

    pointer = {
        "products_table": source.name,
        "products_version": source.version,
        "model_id": source.model_id,
        "run_id": source.run_id or "",
    }
    snap = open_snapshot(
        cfg.index.uri,
        s3,
        cache_dir=cfg.serve.cache_dir,
        pointer=pointer,
        ann=ann_settings(cfg.index),
    )
    global_filter = req.filter.strip() if req.filter and req.filter.strip() else None
    if req.filter is not None and global_filter is None:
        raise ExportError("--filter is empty")
    if global_filter:
        dim = snap.table.schema.field(EMBEDDING).type.list_size
        probe = [1.0] + [0.0] * (dim - 1)
        try:
            snap.candidates(probe, 1, global_filter)
        except BadRequest as err:
            raise ExportError(f"--filter {global_filter!r}: {err}") from None
    model = load_query_model(cfg, source)
    scorer = BatchedScorer(
        QueryScorer(model, cfg.serve.token_cache_items, cfg.serve.decode_threads)
    )
    limits = Limits.from_config(cfg.serve)
    counts: dict[str, int] = {}

    def reader() -> pa.RecordBatchReader:
        batches = search_batches(
            records, snap, scorer, limits, global_filter, cfg.export.search_batch, counts
        )
        return pa.RecordBatchReader.from_batches(SEARCH_SCHEMA, batches)

    def summary() -> dict:
        accounted = sum(counts.values())
        if accounted != len(records):
            raise AssertionError(f"{len(records)} queries in, {accounted} accounted for")
        return {
            "queries_in": len(records),
            "queries_ok": counts.get("ok", 0),
            "queries_no_results": counts.get("no_results", 0),
            "queries_error": counts.get("error", 0),
            "k": cfg.serve.k,
            "candidates": cfg.serve.candidates,
            "rerank_k": cfg.serve.rerank_k,
            "hybrid": cfg.serve.hybrid,
        }

    return Plan(list(SEARCH_SCHEMA.names), reader, (), summary)

