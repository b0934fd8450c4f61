"""What an export reads: the table and version a ``--version`` spec names (``published``, a run,
another tag, a version number or ``latest``; the rules are in ``pipelines.export``), the columns
it writes, the ``--filter`` check, and the streaming scan of the table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.config import ExportConfig
from pipelines.exporting.errors import ExportError
from pipelines.indexing import tables

EMBEDDING = "image_embedding"
IMAGE_COLUMNS = ("model_image", "thumbnail")  # JPEG bytes: only when named in --columns
# The stored ITM image tokens (float16, up to index.max_stored_token_bytes a row, larger than the
# rest of the row): only with --with-itm-tokens or when named in --columns.
TOKEN_COLUMNS = tuple(f.name for f in tables.TOKEN_FIELDS)
_CARGO_PATH = re.compile(r",\s*/\S*\.rs:\d+:\d+.*$", re.S)


@dataclass
class Source:
    """One table checked out at the version an export reads."""

    table: Any  # lancedb table, checked out
    name: str
    version: int
    version_spec: str  # what --version asked
    tag: str | None
    run_id: str | None
    model_id: str | None
    model_path: str | None  # the checkpoint the run recorded (search follows it)


def _products_tables(db, base: str) -> list[str]:
    return sorted(n for n in tables.table_names(db) if n.startswith(f"{base}__"))


def _model_from_name(name: str, base: str) -> str | None:
    return name.removeprefix(f"{base}__") if name.startswith(f"{base}__") else None


def _known_runs(db, limit: int = 5) -> str:
    if tables.RUNS_TABLE not in tables.table_names(db):
        return "no runs"
    rows = db.open_table(tables.RUNS_TABLE).search().select(["run_id"]).limit(None).to_arrow()
    ids = rows.column("run_id").to_pylist()
    shown = ", ".join(ids[-limit:])
    return f"runs: {shown}" + (f" (and {len(ids) - limit} older)" if len(ids) > limit else "")


def _table_name(db, what: str, base: str, published: dict | None) -> str:
    """The table a non-run version spec reads: rejects, runs, or the published products table
    (the only products table when nothing is published yet)."""
    if what in ("rejects", "runs"):
        name = tables.REJECTS_TABLE if what == "rejects" else tables.RUNS_TABLE
        if name not in tables.table_names(db):
            raise ExportError(f"the index has no {name!r} table: run the index job first")
        return name
    if published is not None:
        return published["products_table"]
    candidates = _products_tables(db, base)
    if len(candidates) != 1:
        raise ExportError(
            f"nothing is published and there are {len(candidates)} products tables "
            f"({candidates}); name a run with --version run-<id>"
        )
    return candidates[0]


def _versions(table) -> list[int]:
    return sorted(int(v["version"]) for v in table.list_versions())


def _matching_run(db, name: str, version: int, what: str) -> dict | None:
    """The runs row that published ``version`` of ``name`` (products or rejects), if one did."""
    if what == "runs" or tables.RUNS_TABLE not in tables.table_names(db):
        return None
    column = "rejects_version" if what == "rejects" else "products_version"
    rows = db.open_table(tables.RUNS_TABLE).search().limit(None).to_arrow().to_pylist()
    for row in reversed(rows):
        if row[column] == version and (what == "rejects" or row["products_table"] == name):
            row.setdefault("model_path", None)
            return row
    return None


def _source(table, name: str, spec: str, tag: str | None, run: dict | None, base: str) -> Source:
    return Source(
        table=table,
        name=name,
        version=int(table.version),
        version_spec=spec,
        tag=tag,
        run_id=run["run_id"] if run else None,
        model_id=(run or {}).get("model_id") or _model_from_name(name, base),
        model_path=(run or {}).get("model_path"),
    )


def resolve_source(db, what: str, spec: str | None, base: str = "products") -> Source:
    """The table ``what`` reads (search: the products table) checked out at ``spec``."""
    spec = (spec or tables.PUBLISHED).strip()
    published = tables.published_run(db)
    if spec == tables.PUBLISHED:
        if published is None:
            raise ExportError(
                f"nothing is published in this index (tables: {tables.table_names(db)}): run the "
                "index job first, or name a version"
            )
        if what in ("products", "search"):
            table, _ = tables.open_published(db, published)
            return _source(table, published["products_table"], spec, spec, published, base)
        name = _table_name(db, what, base, published)
        table = tables.open_tagged(db, name, spec)
        if table is None:
            raise ExportError(f"table {name!r} has no {spec!r} tag")
        return _source(table, name, spec, spec, published, base)
    if spec == "latest" or spec.isdigit():
        name = _table_name(db, what, base, published)
        table = db.open_table(name)
        if spec.isdigit():
            versions = _versions(table)
            if int(spec) not in versions:
                raise ExportError(
                    f"table {name!r} has no version {spec}; it has versions "
                    f"{versions[0]}..{versions[-1]}"
                )
            table.checkout(int(spec))
        run = _matching_run(db, name, int(table.version), what)
        return _source(table, name, spec, None, run, base)
    return _tagged_source(db, what, spec, base, published)


def _tagged_source(db, what: str, spec: str, base: str, published: dict | None) -> Source:
    run_id = spec.removeprefix(tables.RUN_TAG_PREFIX)
    run = tables.find_run(db, run_id) or (tables.find_run(db, spec) if run_id != spec else None)
    if run is None and spec.startswith(tables.RUN_TAG_PREFIX):
        raise ExportError(f"unknown run {run_id!r}; {_known_runs(db)}")
    tag = tables.run_tag(run["run_id"]) if run else spec
    if what in ("products", "search"):
        if run is not None:
            name = run["products_table"]
        else:
            having = [n for n in _products_tables(db, base) if tag in db.open_table(n).tags.list()]
            if not having:
                raise ExportError(
                    f"unknown version {spec!r}: not a tag of any products table, not a run id, "
                    f"not a number; {_known_runs(db)}"
                )
            preferred = (published or {}).get("products_table")
            name = preferred if preferred in having else having[0]
    else:
        name = _table_name(db, what, base, published)
    table = tables.open_tagged(db, name, tag)
    if table is None and run is not None and what == "rejects" and run.get("rejects_version"):
        table = db.open_table(name)  # runs written before rejects carried run-<id> tags
        table.checkout(int(run["rejects_version"]))
        tag = None
    if table is None:
        tags = sorted(db.open_table(name).tags.list()) if name in tables.table_names(db) else []
        if run is not None:
            raise ExportError(
                f"table {name!r} has no tag {tag!r} (its tags: {tags}): run {run['run_id']} "
                "did not complete"
            )
        raise ExportError(
            f"unknown version {spec!r}: not a tag of table {name!r} (its tags: {tags}), not a "
            f"run id, not a number; {_known_runs(db)}"
        )
    return _source(table, name, spec, tag, run, base)


# --------------------------------------------------------------------------- columns and filter


def parse_columns(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise ExportError("--columns is empty; give a comma-separated list of column names")
    duplicated = sorted({c for c in names if names.count(c) > 1})
    if duplicated:
        raise ExportError(f"--columns names {duplicated} more than once")
    return names


def select_columns(
    available: Sequence[str],
    what: str,
    columns: Sequence[str] | None,
    with_embeddings: bool,
    partition_by: Sequence[str] = (),
    with_itm_tokens: bool = False,
) -> list[str]:
    """The columns an export writes, in table order: ``columns`` (or the default set), plus the
    embedding with ``with_embeddings``, the stored ITM tokens and their shape with
    ``with_itm_tokens``, and the hive partition columns."""
    if with_embeddings and EMBEDDING not in available:
        raise ExportError(f"--with-embeddings: the {what} table has no {EMBEDDING!r} column")
    if with_itm_tokens and not set(TOKEN_COLUMNS) <= set(available):
        raise ExportError(
            f"--with-itm-tokens: the {what} table has no {list(TOKEN_COLUMNS)} columns (written "
            "by index runs that store ITM tokens)"
        )
    unknown = [c for c in [*(columns or ()), *partition_by] if c not in available]
    if unknown:
        raise ExportError(f"unknown column(s) {unknown}; the {what} table has {list(available)}")
    if columns is not None:
        wanted = set(columns)
    else:
        hidden = {EMBEDDING, *IMAGE_COLUMNS, *TOKEN_COLUMNS} if what == "products" else set()
        wanted = {c for c in available if c not in hidden}
    wanted |= set(partition_by)
    if with_embeddings:
        wanted.add(EMBEDDING)
    if with_itm_tokens:
        wanted |= set(TOKEN_COLUMNS)
    return [c for c in available if c in wanted]


def _clean(err: Exception) -> str:
    """LanceDB's message without the Rust source location it appends."""
    return _CARGO_PATH.sub("", str(err)).strip()[:400]


def check_filter(dataset, where: str | None) -> str | None:
    """``where`` when LanceDB can plan it over ``dataset``, else ExportError (nothing is read)."""
    if where is None:
        return None
    where = where.strip()
    if not where:
        raise ExportError("--filter is empty")
    try:
        dataset.scanner(filter=where, columns=[]).explain_plan()
    except (ValueError, OSError) as err:
        raise ExportError(f"--filter {where!r} is not valid here: {_clean(err)}") from None
    return where


def table_batches(
    dataset, columns: Sequence[str], where: str | None, ex: ExportConfig
) -> pa.RecordBatchReader:
    """A streaming reader over ``dataset`` (``ex.batch_rows`` rows at a time, table order)."""
    scanner = dataset.scanner(
        columns=list(columns),
        filter=where,
        batch_size=ex.batch_rows,
        scan_in_order=True,
        # LanceDB's default read-ahead (2 GiB) lets the reader outrun the writer by that much.
        io_buffer_size=ex.read_ahead_mb * 2**20,
    )
    return scanner.to_reader()
