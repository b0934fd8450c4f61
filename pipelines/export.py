"""Analyst exports: the index tables, or batch search results, as Parquet (local or S3).

    python -m pipelines.export --config FILE [key=value ...] --what products|rejects|runs|search
        --out DIR|s3://bucket/prefix [--version TAG|RUN_ID|N|latest] [--columns a,b,...]
        [--filter SQL] [--with-embeddings] [--with-itm-tokens] [--queries FILE] [--k N]
        [--index-uri URI] [--model M]

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
leaves out ``image_embedding`` (``--with-embeddings`` adds it), the stored ITM image tokens
``itm_tokens`` (float16 bytes) and ``itm_tokens_shape`` (``--with-itm-tokens`` adds both) and the
JPEG bytes ``model_image`` and ``thumbnail`` (name any of them in ``--columns`` to get it).
``--filter`` is a LanceDB SQL predicate over any column, checked before anything is written. Rows
are streamed, so memory is bounded by the configuration (``export.batch_rows``,
``export.read_ahead_mb``, ``export.row_group_rows``, ``export.max_open_files``), never by the table
size (``pipelines.exporting.parquet``).

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
import logging
import os
import sys
from collections.abc import Sequence

from pipelines.config import (
    ConfigError,
    add_config_arguments,
    load_config,
)
from pipelines.exporting.errors import ExportError
from pipelines.exporting.job import (
    WHATS,
    ExportRequest,
    export,
)
from pipelines.exporting.output import SUCCESS
from pipelines.exporting.source import (
    parse_columns,
)
from pipelines.storage import is_s3

logger = logging.getLogger(__name__)


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
    parser.add_argument(
        "--with-itm-tokens",
        action="store_true",
        help="products: add itm_tokens (float16 bytes) and itm_tokens_shape",
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
            with_itm_tokens=args.with_itm_tokens,
        )
        summary = export(cfg, req)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0



if __name__ == "__main__":
    sys.exit(main())
