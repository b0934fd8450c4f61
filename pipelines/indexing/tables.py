"""The LanceDB side of the index: table schemas, connections (local or S3) and publishing by tag.

Readers never open "the latest version" of a table: they open a **tag** (``published`` by default),
which the job moves only after all data, indexes and the ``runs`` row are committed. A run that dies leaves the tag where it was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pyarrow as pa

from pipelines.storage import S3Settings, is_s3

logger = logging.getLogger(__name__)

PUBLISHED = "published"
RUN_TAG_PREFIX = "run-"


def products_schema(dim: int, metadata: Sequence[pa.Field] = ()) -> pa.Schema:
    """The ``products`` table for ``dim``-d ITC embeddings (what the README's nightly index job section lists)."""
    if dim < 1:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    return pa.schema(
        [
            pa.field("product_id", pa.string(), nullable=False),
            pa.field("title", pa.string()),
            pa.field("title_normalized", pa.string()),  # what full-text search and the model see
            *metadata,
            pa.field("image_embedding", pa.list_(pa.float32(), dim)),  # L2-normalised ITC embedding
            pa.field(
                "model_image", pa.binary()
            ),  # JPEG at the model's input size, for ITM re-ranking
            pa.field("thumbnail", pa.binary()),  # small JPEG for display
            pa.field("content_hash", pa.string()),  # image bytes + title: unchanged-row detection
            pa.field("model_id", pa.string()),  # the embedding space the row belongs to
            pa.field("indexed_at", pa.timestamp("us", tz="UTC")),
            pa.field("run_id", pa.string()),
            # Last, so a table or staging dataset written before them only gains fields at its end.
            *TOKEN_FIELDS,
        ]
    )


ITM_TOKENS, ITM_TOKENS_SHAPE = "itm_tokens", "itm_tokens_shape"
TOKEN_FIELDS = (
    # The ITM image tokens the encode pass made with the row's embedding, float16 (N, H) in C
    # order; null when not stored (index.store_itm_tokens): the re-rank recomputes them from
    # model_image.
    pa.field(ITM_TOKENS, pa.binary()),
    pa.field(ITM_TOKENS_SHAPE, pa.list_(pa.int32(), 2)),  # (N, H); 8 bytes: cheap to count
)


def missing_token_fields(schema: pa.Schema) -> list[pa.Field]:
    """The token columns a table or staging dataset written before they existed lacks."""
    return [f for f in TOKEN_FIELDS if f.name not in schema.names]


def rows_without_tokens(table) -> int:
    """Rows of a products table with no stored ITM tokens (reads only the small shape column)."""
    if ITM_TOKENS_SHAPE not in table.schema.names:
        return table.count_rows()
    return table.count_rows(f"{ITM_TOKENS_SHAPE} IS NULL")


RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("config_digest", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("model_path", pa.string()),  # the checkpoint (dir or hub id) the run encoded with
        pa.field("source_uri", pa.string()),
        pa.field("products_table", pa.string()),  # a new model_id writes a new (shadow) table
        pa.field("rows_in", pa.int64()),
        pa.field("indexed", pa.int64()),
        pa.field("unchanged", pa.int64()),
        pa.field("rejected", pa.int64()),
        pa.field("deleted", pa.int64()),
        pa.field("rejected_by_reason", pa.string()),  # JSON object reason -> count
        pa.field("seconds", pa.float64()),
        pa.field("images_per_s", pa.float64()),
        pa.field("products_version", pa.int64()),  # the version the `published` tag points to
        pa.field("rejects_version", pa.int64()),
        # The publish guard's decision: passed (the run moved its tags) or held (it did not), and
        # why. Rows written before these columns read null: they predate the guard.
        pa.field("status", pa.string()),
        pa.field("held_reason", pa.string()),
    ]
)


def storage_options(uri: str, s3: S3Settings | None = None) -> dict[str, str]:
    """LanceDB/Lance object-store options for an ``s3://`` URI (no credentials: the AWS chain)."""
    if not is_s3(uri):
        return {}
    settings = (s3 or S3Settings()).resolved()
    options: dict[str, str] = {}
    if settings.region:
        options["region"] = settings.region
    if settings.endpoint_url:
        options["endpoint"] = settings.endpoint_url
        options["allow_http"] = "true" if settings.allow_http else "false"
    return options


def connect(uri: str, s3: S3Settings | None = None):
    """A LanceDB connection to a local directory or an ``s3://`` URI."""
    import lancedb

    return lancedb.connect(uri, storage_options=storage_options(uri, s3) or None)


def table_names(db) -> list[str]:
    listed = db.list_tables()
    return list(getattr(listed, "tables", listed))


def append(db, name: str, schema: pa.Schema, rows: pa.Table | None = None):
    """Open table ``name`` (created with ``schema`` on first use) and add ``rows``, if any.

    A table written before ``schema`` gained a nullable column gets that column (null in its old
    rows) before the add, so older indexes keep working."""
    rows = rows if rows is not None and rows.num_rows else None
    if name in table_names(db):
        table = db.open_table(name)
        missing = [f for f in schema if f.name not in table.schema.names]
        if missing and rows is not None:
            table.add_columns({f.name: f"CAST(NULL AS {_SQL_TYPES[f.type]})" for f in missing})
            logger.info("table %s: added columns %s", name, [f.name for f in missing])
        if rows is not None:
            table.add(rows)
        return table
    return db.create_table(name, rows, schema=schema)


_SQL_TYPES = {pa.string(): "string", pa.int64(): "bigint", pa.float64(): "double"}


def open_tagged(db, name: str, tag: str = PUBLISHED):
    """The table ``name`` checked out at ``tag``, or None when the table or the tag does not exist."""
    if name not in table_names(db):
        return None
    table = db.open_table(name)
    if tag not in table.tags.list():
        return None
    table.checkout(tag)
    return table


def move_tag(table, tag: str, version: int) -> None:
    """Point ``tag`` at ``version`` of ``table``, creating it on first use."""
    if tag in table.tags.list():
        table.tags.update(tag, version)
    else:
        table.tags.create(tag, version)
    logger.info("tag %s -> version %d", tag, version)


def published_state(
    table, columns: Sequence[str] = ("product_id", "content_hash", "model_id")
) -> pa.Table:
    """The few columns "unchanged" detection needs, without reading embeddings or images."""
    return table.search().select(list(columns)).limit(None).to_arrow()


RUNS_TABLE = "runs"
REJECTS_TABLE = "rejects"


def products_table_name(base: str, model_id: str) -> str:
    """One products table per embedding space: a new model_id writes a new (shadow) table."""
    return f"{base}__{model_id}"


def published_run(db) -> dict | None:
    """The newest ``runs`` row at the runs table's ``published`` tag: which products table and
    version readers should open. Moving that one tag is the atomic switch of a publish."""
    runs = open_tagged(db, RUNS_TABLE)
    if runs is None:
        return None
    wanted = ["run_id", "finished_at", "products_table", "products_version", "model_id"]
    wanted += [c for c in ("model_path",) if c in runs.schema.names]
    rows = runs.search().select(wanted).limit(None).to_arrow()
    # A run that died after writing its row but before tagging its data never completed.
    existing = set(table_names(db))
    run_tags = {
        name: set(db.open_table(name).tags.list()) if name in existing else set()
        for name in set(rows.column("products_table").to_pylist())
    }
    done = [
        r
        for r in rows.to_pylist()
        if f"{RUN_TAG_PREFIX}{r['run_id']}" in run_tags[r["products_table"]]
    ]
    if not done:
        return None
    run = max(done, key=lambda r: r["finished_at"])
    run.setdefault("model_path", None)  # runs rows written before the column existed
    return run


def run_tag(run_id: str) -> str:
    return f"{RUN_TAG_PREFIX}{run_id}"


def find_run(db, run_id: str) -> dict | None:
    """The ``runs`` row of ``run_id`` at the runs table's newest version (any run, published or
    not), or None."""
    if RUNS_TABLE not in table_names(db):
        return None
    runs = db.open_table(RUNS_TABLE)
    quoted = run_id.replace("'", "''")
    rows = runs.search().where(f"run_id = '{quoted}'").limit(None).to_arrow().to_pylist()
    if not rows:
        return None
    row = rows[-1]
    row.setdefault("model_path", None)
    return row


def open_published(db, run: dict | None = None):
    """(the published products table checked out at its published version, its ``runs`` row),
    or None before any run: what every reader of the published index opens. ``run``: the
    :func:`published_run` row when the caller has already read it (the runs table is read once)."""
    run = run if run is not None else published_run(db)
    if run is None:
        return None
    table = db.open_table(run["products_table"])
    table.checkout(int(run["products_version"]))
    return table, run
