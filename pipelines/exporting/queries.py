"""Batch search exports: query files (CSV, JSONL, Parquet) read into records, each record turned
into a search request and run through the service's two-stage search ``export.search_batch``
queries per text-encoder call, and every record accounted for in result rows (``SEARCH_SCHEMA``)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.config import AppConfig
from pipelines.exporting.errors import ExportError
from pipelines.exporting.source import Source
from pipelines.storage import S3Settings, filesystem_for

logger = logging.getLogger(__name__)

SEARCH_SCHEMA = pa.schema(
    [
        pa.field("query_index", pa.int64(), nullable=False),  # 0-based record of the query file
        pa.field("query_id", pa.string()),  # the file's query_id, when it has one
        pa.field("query", pa.string()),
        pa.field("filter", pa.string()),  # effective filter (--filter AND the row's)
        pa.field("rank", pa.int32()),  # 1-based; null when the query has no result row
        pa.field("product_id", pa.string()),
        pa.field("title", pa.string()),
        pa.field("itc_score", pa.float64()),  # ITC cosine
        pa.field("itm_score", pa.float64()),  # ITM positive logit; null past rerank_k
        pa.field("score", pa.float64()),  # ITM + ITC for re-ranked rows, else ITC
        pa.field("lexical_score", pa.float64()),  # BM25, with serve.hybrid only
        pa.field("status", pa.string(), nullable=False),  # ok | no_results | error
        pa.field("error", pa.string()),  # why, when status = 'error'
    ]
)


@dataclass(frozen=True)
class QueryRecord:
    """One record of a query file, as read (checked later, per record)."""

    index: int  # 0-based record number
    query: Any
    filter: Any = None
    k: Any = None
    query_id: Any = None
    problem: str | None = None  # the record itself is malformed (bad JSON line, extra fields)


QUERY_COLUMNS = ("query", "text")
OPTIONAL_COLUMNS = ("filter", "k", "query_id")


def _query_column(names: Iterable[str], uri: str) -> str:
    names = list(names)
    for name in QUERY_COLUMNS:
        if name in names:
            return name
    raise ExportError(f"query file {uri} has no 'query' (or 'text') column; its columns: {names}")


def _record(index: int, row: dict, qcol: str, problem: str | None = None) -> QueryRecord:
    return QueryRecord(
        index,
        row.get(qcol),
        row.get("filter"),
        row.get("k"),
        row.get("query_id"),
        problem,
    )


def _read_csv(data: bytes, uri: str) -> list[QueryRecord]:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    qcol = _query_column(reader.fieldnames or [], uri)
    out = []
    for i, row in enumerate(reader):
        extra = row.pop(None, None)  # fields past the header
        problem = f"CSV record has {len(extra)} field(s) more than the header" if extra else None
        out.append(_record(i, row, qcol, problem))
    return out


def _read_jsonl(data: bytes, uri: str) -> list[QueryRecord]:
    lines = [ln for ln in data.decode("utf-8-sig").splitlines() if ln.strip()]  # blank: no record
    rows: list[tuple[dict, str | None]] = []
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append(({}, f"JSONL record {n} is not valid JSON: {err}"))
            continue
        if not isinstance(row, dict):
            rows.append(({}, f"JSONL record {n} is a {type(row).__name__}, not an object"))
            continue
        rows.append((row, None))
    keys = {k for row, _ in rows for k in row}
    if rows and not keys & set(QUERY_COLUMNS) and all(p is None for _, p in rows):
        _query_column(sorted(keys), uri)
    qcol = "query" if "query" in keys else "text"
    return [_record(i, row, qcol, problem) for i, (row, problem) in enumerate(rows)]


def _read_parquet(data: bytes, uri: str) -> list[QueryRecord]:
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data))
    qcol = _query_column(table.column_names, uri)
    keep = [c for c in (qcol, *OPTIONAL_COLUMNS) if c in table.column_names]
    return [_record(i, row, qcol) for i, row in enumerate(table.select(keep).to_pylist())]


READERS = {
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".parquet": _read_parquet,
    ".pq": _read_parquet,
}


def read_queries(uri: str, s3: S3Settings | None = None) -> list[QueryRecord]:
    """Every record of a query file (local or s3://); ExportError when the file itself is bad."""
    suffix = Path(uri.split("?")[0]).suffix.lower()
    if suffix not in READERS:
        raise ExportError(f"query file {uri}: unknown type {suffix!r}; expected {sorted(READERS)}")
    fs, path = filesystem_for(uri, s3)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (OSError, pa.ArrowInvalid) as err:
        raise ExportError(f"cannot read query file {uri}: {err}") from None
    try:
        return READERS[suffix](data, uri)
    except (UnicodeDecodeError, csv.Error, pa.ArrowInvalid, OSError) as err:
        raise ExportError(f"query file {uri} is not valid {suffix[1:]}: {err}") from None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def query_body(record: QueryRecord, global_filter: str | None) -> dict:
    """The search request of a record (checked by ``parse_search`` afterwards); BadRequest when
    the record cannot be one."""
    from pipelines.search.request import BadRequest

    if record.problem:
        raise BadRequest(record.problem)
    if record.query is None or (isinstance(record.query, str) and not record.query.strip()):
        raise BadRequest("the query text is missing or empty")
    if not isinstance(record.query, str):
        raise BadRequest(f"the query must be text, got {type(record.query).__name__}")
    body: dict[str, Any] = {"text": record.query}
    if record.k not in (None, ""):
        k = record.k
        if isinstance(k, str):
            if not k.strip().isdigit():
                raise BadRequest(f"`k` must be a positive integer, got {k!r}")
            k = int(k)
        body["k"] = k
    row_filter = _text(record.filter)
    row_filter = row_filter.strip() if row_filter and row_filter.strip() else None
    parts = [f for f in (global_filter, row_filter) if f]
    if parts:
        body["filter"] = parts[0] if len(parts) == 1 else " AND ".join(f"({p})" for p in parts)
    return body


class BatchedScorer:
    """The engine's scorer with query texts encoded a batch at a time (one model call)."""

    def __init__(self, scorer):
        from pipelines.search.engine import LocalScorer

        self.local = LocalScorer(scorer)
        self.scorer = scorer
        self.model_id = scorer.model_id
        self._texts: dict[str, Any] = {}

    def prime(self, texts: Sequence[str]) -> None:
        unique = list(dict.fromkeys(texts))
        self._texts = (
            dict(zip(unique, self.scorer.encode_texts(unique), strict=True)) if unique else {}
        )

    def normalize_text(self, text: str) -> str:
        return self.local.normalize_text(text)

    async def encode_text(self, text: str):
        cached = self._texts.get(text)
        return cached if cached is not None else await self.local.encode_text(text)

    async def encode_image(self, image):
        return await self.local.encode_image(image)

    async def itm(self, job):
        return await self.local.itm(job)


def _result_rows(record: QueryRecord, body: dict | None, out: dict | None, error: str | None):
    base = {
        "query_index": record.index,
        "query_id": _text(record.query_id),
        "query": _text(record.query),
        "filter": (body or {}).get("filter"),
    }
    empty = dict.fromkeys(
        ("rank", "product_id", "title", "itc_score", "itm_score", "score", "lexical_score")
    )
    if error is not None:
        return [{**base, **empty, "status": "error", "error": error}]
    results = out["results"] if out else []
    if not results:
        return [{**base, **empty, "status": "no_results", "error": None}]
    return [
        {
            **base,
            "rank": rank,
            "product_id": r["product_id"],
            "title": r["title"],
            "itc_score": r["itc_score"],
            "itm_score": r["itm_score"],
            "score": r["score"],
            "lexical_score": r.get("lexical_score"),
            "status": "ok",
            "error": None,
        }
        for rank, r in enumerate(results, start=1)
    ]


async def _search_batch(records, bodies, queries, snap, scorer) -> list[dict]:
    from pipelines.search.engine import search
    from pipelines.search.request import BadRequest

    rows: list[dict] = []
    for record, body, query in zip(records, bodies, queries, strict=True):
        if isinstance(query, str):  # the record's error
            rows.extend(_result_rows(record, body, None, query))
            continue
        try:
            out = await search(query, snap, scorer)
        except BadRequest as err:  # e.g. a filter LanceDB refuses
            rows.extend(_result_rows(record, body, None, str(err)))
            continue
        rows.extend(_result_rows(record, body, out, None))
    return rows


def search_batches(
    records: Sequence[QueryRecord],
    snap,
    scorer: BatchedScorer,
    limits,
    global_filter: str | None,
    batch: int,
    counts: dict[str, int],
) -> Iterator[pa.RecordBatch]:
    """Result rows (SEARCH_SCHEMA) of every record, ``batch`` queries per model call."""
    from pipelines.search.request import BadRequest, parse_search

    for lo in range(0, len(records), batch):
        chunk = records[lo : lo + batch]
        bodies: list[dict | None] = []
        queries: list[Any] = []  # a SearchQuery, or the record's error message
        for record in chunk:
            body = None
            try:
                body = query_body(record, global_filter)
                queries.append(parse_search(body, limits))
            except BadRequest as err:
                queries.append(str(err))
            bodies.append(body)
        scorer.prime([q.text for q in queries if not isinstance(q, str) and q.text])
        rows = asyncio.run(_search_batch(chunk, bodies, queries, snap, scorer))
        per_query = {r["query_index"]: r["status"] for r in rows}
        for status in per_query.values():
            counts[status] = counts.get(status, 0) + 1
        yield pa.RecordBatch.from_pylist(rows, schema=SEARCH_SCHEMA)


def load_query_model(cfg: AppConfig, source: Source):
    """The model whose model_id the table holds: ``model.name_or_path``, or else (with
    ``serve.follow_model``) the checkpoint the run recorded."""
    from blip_ops import load_model
    from blip_ops.hub import ModelUnavailableError

    def load(path: str):
        try:
            return load_model(path, **cfg.model.query_load_args())
        except (ModelUnavailableError, OSError) as err:
            raise ExportError(f"cannot load the query model {path}: {err}") from None

    model = load(cfg.model.name_or_path)
    if source.model_id is None or model.model_id == source.model_id:
        return model
    where = f"{source.name} version {source.version} holds model {source.model_id}"
    recorded = source.model_path
    if recorded and recorded != cfg.model.name_or_path and cfg.serve.follow_model:
        logger.info("%s; loading the checkpoint its run recorded: %s", where, recorded)
        other = load(recorded)
        if other.model_id == source.model_id:
            return other
        raise ExportError(
            f"{where}, but model.name_or_path gives {model.model_id} and the run's checkpoint "
            f"{recorded} now gives {other.model_id}; set model.name_or_path to its checkpoint"
        )
    raise ExportError(
        f"{where}, but model.name_or_path={cfg.model.name_or_path} gives {model.model_id}"
        + ("" if recorded else " and the run recorded no checkpoint")
        + "; set model.name_or_path to the checkpoint that built the table"
    )
