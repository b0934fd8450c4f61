"""Analyst exports: the index tables, or batch search results, as Parquet (local or S3).

    python -m pipelines.export --config FILE [key=value ...] --what products|rejects|runs|search
        --out DIR|s3://bucket/prefix [--version TAG|RUN_ID|N|latest] [--columns a,b,...]
        [--filter SQL] [--with-embeddings] [--queries FILE] [--k N] [--index-uri URI] [--model M]

What is read (``--version``, default ``published``):
- ``published``: the products table and version of the newest completed run at the ``runs``
  table's ``published`` tag (what the search service serves); ``rejects`` and ``runs`` at their
  own ``published`` tag.
- ``run-<id>`` or a bare run id: that run's products table at tag ``run-<id>``; ``rejects`` and
  ``runs`` at their ``run-<id>`` tag (``rejects`` falls back to the run's recorded
  ``rejects_version`` for runs older than that tag). Any other tag name is looked up the same way.
- ``N``: version N of the table (products: the published products table).
- ``latest``: the newest committed version, which may be an unfinished run's intermediate commit
  (for debugging; analysts want a tag).
An unknown tag, run or version exits 2 naming what exists.

Tables (``products``, ``rejects``, ``runs``): every column by default, except that ``products``
leaves out ``image_embedding`` (``--with-embeddings`` adds it) and the JPEG bytes ``model_image``
and ``thumbnail`` (name them in ``--columns`` to get them). ``--filter`` is a LanceDB SQL
predicate over any column, checked before anything is written. Rows are streamed, so memory is
bounded by the configuration (``export.batch_rows``, ``export.read_ahead_mb``,
``export.row_group_rows``, ``export.max_open_files``), never by the table size
(``pipelines.exporting.parquet``).

``search``: ``--queries FILE`` (CSV, Parquet or JSONL, local or s3://) holds one query per row: a
``query`` (or ``text``) column, optional ``filter`` (SQL over the metadata columns, ANDed with
``--filter``), ``k`` and ``query_id``; other columns are ignored. Each query runs offline through
the service's own two-stage search (``pipelines.search.engine.search``: ANN candidates, ITM
re-rank; ``serve.candidates``, ``serve.rerank_k``, ``serve.hybrid``; ``--k`` is ``serve.k``) on
the resolved products version, with the model whose model_id the table holds (``model.name_or_path``,
or else the checkpoint the run recorded). Output rows: ``query_index`` (0-based record of the
file), ``query_id``, ``query``, ``filter``, ``rank`` (1-based), ``product_id``, ``title``,
``itc_score``, ``itm_score`` (null past ``rerank_k``), ``score``, ``lexical_score``, ``status``,
``error``. **Every input record is accounted for in that one table**: a query with hits gives
up to ``k`` rows with ``status = 'ok'``; one without hits gives one row ``status = 'no_results'``
(``rank`` null); a bad record (empty or missing text, an invalid filter or ``k``, a JSONL line
that is not a JSON object, a CSV row with extra fields) gives one row ``status = 'error'`` with
the reason in ``error``. Bad records never stop the export; a bad file (unreadable, no query
column, unknown type) exits 2 before anything is written. The query file is read up front (it is
a list of queries); the results are streamed, ``export.search_batch`` queries per text-encoder
call, and never partitioned.

Output layout (``--out``): ``part-<i>.parquet`` files of at most ``export.max_rows_per_file`` rows
(``products``: under hive folders ``<col>=<value>/`` when ``export.partition_by`` is set), then
``_config.resolved.yaml``, ``_manifest.json`` (files, rows, bytes, provenance) and, last, an empty
``_SUCCESS``. Every Parquet file carries the provenance in its key-value metadata
(``METADATA_KEYS``: table, table_version, model_id, run_id, version_spec, the resolved config as
YAML, ...). An existing non-empty ``--out`` is refused (exit 2).

Atomicity: locally ``--out`` either does not exist or is complete (it appears in one ``rename``);
S3 has no rename, so ``_SUCCESS`` is written last there and readers of S3 exports must check it,
as with Spark's. How, and what a killed export leaves behind: ``pipelines.exporting.output``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipelines.config import (
    AppConfig,
    ConfigError,
    add_config_arguments,
    config_digest,
    dump_config,
    load_config,
)
from pipelines.exporting.errors import ExportError
from pipelines.exporting.output import SUCCESS, _now, abandon, commit, prepare_output
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
    parse_columns,
    resolve_source,
    select_columns,
    table_batches,
)
from pipelines.indexing import tables
from pipelines.storage import S3Settings, is_s3

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
    "queries",
    "export_id",
    "created_at",
    "config_digest",
    "config",
)


# --------------------------------------------------------------------------- the export


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


def new_export_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _check_request(req: ExportRequest, cfg: AppConfig) -> None:
    if req.what not in WHATS:
        raise ExportError(f"--what must be one of {list(WHATS)}, got {req.what!r}")
    if req.what == "search":
        if not req.queries:
            raise ExportError("--what search needs --queries FILE (CSV, Parquet or JSONL)")
        if req.columns is not None or req.with_embeddings:
            raise ExportError("--columns and --with-embeddings apply to table exports, not search")
    elif req.queries:
        raise ExportError(f"--queries applies to --what search, not {req.what}")
    if req.what != "products" and req.with_embeddings:
        raise ExportError(f"--with-embeddings: only products have embeddings, not {req.what}")


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
        "queries": req.queries or "",
        "export_id": export_id,
        "created_at": _now(),
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
        dataset.schema.names, req.what, req.columns, req.with_embeddings, partition_by
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


# --------------------------------------------------------------------------- CLI


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def print_summary(s: dict) -> None:
    where = f"{s['table']} version {s['table_version']}"
    if s["tag"]:
        where += f" (tag {s['tag']})"
    print(f"\nexport {s['what']}  {where}")
    print(f"  run / model  {s['run_id'] or '-'} / {s['model_id'] or '-'}")
    if s["what"] == "search":
        print(
            f"  queries      {s['queries_in']} from {s['queries']}: ok {s['queries_ok']}, no results "
            f"{s['queries_no_results']}, errors {s['queries_error']} (rows with status='error')"
        )
        print(
            f"  ranking      k {s['k']}, candidates {s['candidates']}, rerank_k {s['rerank_k']}, "
            f"hybrid {s['hybrid']}"
        )
    else:
        cols = s["columns"]
        shown = ", ".join(cols) if len(cols) <= 8 else ", ".join(cols[:8]) + f", … ({len(cols)})"
        print(f"  columns      {shown}")
    if s["filter"]:
        print(f"  filter       {s['filter']}")
    parts = f", partitioned by {s['partition_by']}" if s["partition_by"] else ""
    print(f"  rows         {s['rows']} in {len(s['files'])} file(s), {_mb(s['bytes'])}{parts}")
    print(
        f"  time         {s['seconds']}s ({s['write_seconds']}s writing, {s['rows_per_s']} rows/s)"
    )
    print(f"  out          {s['out']}  ({SUCCESS} written last)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.export", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("index_uri", "model"))
    parser.add_argument("--what", required=True, choices=WHATS, help="what to export")
    parser.add_argument("--out", required=True, help="output folder (local path or s3://…)")
    parser.add_argument(
        "--version",
        default=None,
        help="published (default), run-<id> or a run id, another tag, a version number, latest",
    )
    parser.add_argument("--columns", default=None, help="comma-separated columns (tables)")
    parser.add_argument("--filter", default=None, help="SQL predicate (search: metadata columns)")
    parser.add_argument(
        "--with-embeddings", action="store_true", help="products: add image_embedding"
    )
    parser.add_argument("--queries", default=None, help="search: CSV, Parquet or JSONL file")
    parser.add_argument("--k", type=int, default=None, help="search: alias of serve.k")
    return parser


def _absolute(path: str | None) -> str | None:
    if path is None or is_s3(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    logging.getLogger("pipelines.exporting").setLevel(logging.INFO)  # the stages' logs
    try:
        cfg = load_config(
            args.config,
            args.overrides,
            {"index_uri": args.index_uri, "model": args.model, "serve.k": args.k},
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        req = ExportRequest(
            what=args.what,
            out=_absolute(args.out),
            version=args.version,
            columns=parse_columns(args.columns),
            filter=args.filter,
            with_embeddings=args.with_embeddings,
            queries=_absolute(args.queries),
        )
        summary = export(cfg, req)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
