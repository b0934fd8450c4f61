"""The nightly index job: catalog Parquet (folder or S3) → Ray Data → BLIP on an actor pool → LanceDB.

``run_index(cfg)`` runs it once (``pipelines/index_catalog.py`` is its command line).
Per run: read every row with its source file and row number; validate on CPU (bad rows → ``rejects``
with a reason); skip rows whose content hash and model_id equal the published row; decode + encode
the rest in an actor pool (the model loads once per actor); stage the encoded rows in a staging
table (Ray Data tasks write them, the driver commits every ``index.stage_flush_rows`` rows and never
holds image bytes); merge them into ``products`` by product_id in one commit, streaming
(``pipelines/indexing/staging.py``); build the indexes;
write the ``runs`` row; then move the tags. Readers open the tag, so a run that dies leaves
``published`` where it was, and a rerun picks up the rows the dead run had already staged.
Every input row is exactly one of indexed, unchanged or rejected, and the job asserts it.

The publish guard: a run that rejects more than ``index.max_reject_fraction`` of its input rows,
or accepts none, is held back (``pipelines.indexing.publishing.publish_guard``): it writes its
``rejects`` rows and its ``runs`` row (status ``held``, with the reason) and its report, but merges
nothing, builds no index and moves no tag, keeps its staging table for the rerun, and raises
RunHeldBack. Each step logs a ``phase: <name> ...`` line (plan, encode, staging, merge, indexes,
record, tags, then published or held), which the kill-point tests wait for.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import faults as fault_hooks
from pipelines.config import AppConfig, config_digest, dump_config
from pipelines.indexing import staging as stage_io
from pipelines.indexing import tables
from pipelines.indexing.indexes import build_indexes
from pipelines.indexing.lease import WriterLease
from pipelines.indexing.publishing import (
    HELD,
    PASSED,
    RunHeldBack,
    publish_guard,
)
from pipelines.indexing.report import Timeline, write_run_report
from pipelines.indexing.source import metadata_fields, source_ids
from pipelines.indexing.stages import (
    DETAIL,
    PEAK_RSS,
    REASON,
    ROW_NUMBER,
    SOURCE_FILE,
    STATUS,
    Columns,
    RunState,
    note_itm_tokens,
    peak_rss_mb,
)
from pipelines.indexing.validate import REJECT_REASONS, REJECTS_SCHEMA, duplicated_ids
from pipelines.runtime.cluster import init_ray
from pipelines.storage import S3Settings, list_parquet_files

logger = logging.getLogger(__name__)

_STATE_CACHE: dict[str, RunState] = {}


def _phase(name: str, detail: str = "started") -> None:
    """One line per step of the run: operators see where a run was, kill-point tests wait on it."""
    logger.info("phase: %s %s", name, detail)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _validate_stage(batch: pa.Table, state_ref: list) -> pa.Table:
    """Validation UDF: fetches the run state (duplicates, published hashes) once per worker."""
    import ray

    from pipelines.indexing.stages import validate

    key = state_ref[0].hex()
    if key not in _STATE_CACHE:
        _STATE_CACHE.clear()
        _STATE_CACHE[key] = ray.get(state_ref[0])
    return validate(batch, state=_STATE_CACHE[key])


def _open_staging(db, name: str):
    """The staging table an interrupted run left, or None when there is none it could read.

    A run killed inside its first staging write can leave data files without a committed
    manifest: nothing in it was saved, so it is dropped and the run starts its staging afresh.
    """
    try:
        return db.open_table(name)
    except (ValueError, OSError, RuntimeError) as err:
        logger.warning(
            "staging table %s left by an interrupted run is unreadable (%s); dropping it", name, err
        )
        try:
            db.drop_table(name)
        except Exception as drop_err:  # noqa: BLE001 - the first staging commit overwrites it anyway
            logger.warning("could not drop %s (%s); it will be overwritten", name, drop_err)
        return None


def _reject_table(batch: pa.Table, run_id: str) -> pa.Table:
    reasons = batch.column(REASON).to_pylist()
    stages = ["validate" if r in REJECT_REASONS else "decode" for r in reasons]
    return pa.table(
        {
            "run_id": pa.array([run_id] * batch.num_rows, pa.string()),
            "product_id": batch.column("product_id").cast(pa.string()),
            "source_file": batch.column(SOURCE_FILE),
            "row_number": batch.column(ROW_NUMBER),
            "stage": pa.array(stages, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "detail": batch.column(DETAIL),
        },
        schema=REJECTS_SCHEMA,
    )


def run_index(cfg: AppConfig, *, run_id: str | None = None) -> dict:
    """Run the job once and return its summary (also stored as the ``runs`` row).

    The whole run holds the index's writer lease (``pipelines/indexing/lease.py``): a second
    writer, or a maintenance, refuses to start beside it (LeaseHeldError). With
    ``maintain.after_index`` the run then maintains the index under the same lease; a failed
    maintenance is logged and reported in ``summary["maintenance"]``, never fails the run.
    A run the publish guard holds back raises RunHeldBack (its summary attached) and is not
    followed by maintenance."""
    run_id = run_id or new_run_id()
    lease = WriterLease(
        cfg.index.uri,
        S3Settings.from_config(cfg.s3),
        kind="index",
        run_id=run_id,
        stale_after=timedelta(minutes=cfg.maintain.writer_stale_minutes),
    )
    with lease:
        summary = _index_run(cfg, run_id, lease)
        if cfg.maintain.after_index:
            summary["maintenance"] = _maintain_after_index(cfg, lease, run_id)
    return summary


def _maintain_after_index(cfg: AppConfig, lease: WriterLease, run_id: str) -> dict:
    from pipelines.indexing.maintenance import run_maintenance

    try:
        return run_maintenance(cfg, lease=lease, maintenance_id=f"after-{run_id}")
    except Exception as err:  # noqa: BLE001 - the run is published: maintenance only reports
        logger.exception("maintenance after run %s failed (the run is published)", run_id)
        return {"error": f"{type(err).__name__}: {err}"}


@dataclass
class RunPlan:
    """What the driver knows before the stream starts."""

    cfg: AppConfig
    run_id: str
    s3: S3Settings
    files: list[str]
    ids: pa.ChunkedArray  # every source row's product id
    model_id: str
    db: object
    products_name: str
    staging_name: str
    staging_uri: str
    storage_options: dict | None
    staging: object | None  # the staging table an interrupted run left, if any
    state: RunState
    schema: pa.Schema
    faults: object
    store_itm_tokens: bool  # decided once here, from the model's token shape; actors follow


@dataclass
class StreamResult:
    """What the stream of encoded batches left on the driver."""

    counts: Counter = field(default_factory=Counter)  # rows by status
    reasons: Counter = field(default_factory=Counter)  # rejected rows by reason
    rejects: list[pa.Table] = field(default_factory=list)
    keep: dict[str, str] = field(default_factory=dict)  # product_id -> hash of the rows published
    timeline: Timeline = field(default_factory=Timeline)
    worker_rss: float = 0.0
    encode_seconds: float = 0.0
    staged_exists: bool = False  # a staging table holds rows to merge


def _index_run(cfg: AppConfig, run_id: str, lease: WriterLease) -> dict:
    """The job's body, run under ``lease``: plan, stream, account, guard, merge, index, record,
    publish (or, held back by the guard: record only, then RunHeldBack)."""
    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    _phase("plan")
    plan = _plan_run(cfg, run_id)
    init_ray(cfg)
    stream = _consume(_encode_dataset(plan), plan)
    counts = _account(plan, stream)
    held = publish_guard(counts, cfg.index.max_reject_fraction)
    if held is None:
        products, deleted, merged = _merge_and_index(plan, stream)
    else:  # nothing merged: the products table (if any) stays as the published run left it
        products, deleted, merged = None, 0, {"products_rows": None, "ann_index": None}
    _phase("record")
    rejects_table = tables.append(
        plan.db, tables.REJECTS_TABLE, REJECTS_SCHEMA,
        pa.concat_tables(stream.rejects) if stream.rejects else None,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    summary = _summary(plan, stream, counts, deleted=deleted, seconds=seconds)
    summary.update(
        merged,
        driver_peak_rss_mb=round(peak_rss_mb(), 1),
        worker_peak_rss_mb=round(stream.worker_rss, 1),
        products_version=None if products is None else products.version,
        rejects_version=rejects_table.version,
        status=PASSED if held is None else HELD,
        held_reason=held,
    )
    runs_table = _record_run(plan, summary, started_at, seconds)
    if held is None:
        _publish(plan, lease, (products, rejects_table, runs_table), stream.staged_exists)
    summary["report"] = _write_report(plan, summary, stream.timeline)
    if held is not None:
        _phase("held", f"back: {held}; `{cfg.index.publish_tag}` not moved")
        raise RunHeldBack(summary)
    return summary


def _merge_and_index(plan: RunPlan, stream: StreamResult) -> tuple[object, int, dict]:
    """Merge the staged rows and bring the indexes up to date: (products table, rows deleted as
    missing, figures for the summary)."""
    products, deleted = _merge(plan, stream)
    n_rows = products.count_rows()
    _phase("indexes")
    ann = build_indexes(products, plan.cfg, n_rows, changed=bool(stream.keep) or deleted > 0)
    return products, deleted, {"products_rows": n_rows, "ann_index": ann}


def _write_report(plan: RunPlan, summary: dict, timeline: Timeline) -> str | None:
    """The run's HTML report; None when it could not be written (it never fails a run)."""
    try:
        return write_run_report(
            plan.cfg.index.uri, plan.s3, summary, timeline, dump_config(plan.cfg)
        )
    except OSError as err:
        logger.warning("could not write the run report: %s", err)
        return None


def _plan_run(cfg: AppConfig, run_id: str) -> RunPlan:
    """The source files and ids, the model's id, the published and staged hashes, the schema."""
    from blip_ops import load_model
    from blip_ops.token_cache import token_shape

    s3 = S3Settings.from_config(cfg.s3)
    files = list_parquet_files(cfg.source.uri, s3)
    model = load_model(
        cfg.model.name_or_path, device="cpu", dtype="float32", attention=cfg.model.attention
    )
    model_id, dim = model.model_id, model.embedding_dim
    itm_shape = token_shape(model)  # what index.store_itm_tokens weighs
    del model

    db = tables.connect(cfg.index.uri, s3)
    products_name = tables.products_table_name(cfg.index.table, model_id)
    staging_name = f"_staging__{model_id}"
    published = tables.open_tagged(db, products_name, cfg.index.publish_tag)
    published_hash = _hashes(published) if published is not None else {}
    store_tokens = note_itm_tokens(
        cfg.index.store_itm_tokens, cfg.index.max_stored_token_bytes, itm_shape, published
    )
    staging = _open_staging(db, staging_name) if staging_name in tables.table_names(db) else None
    staged_hash = _hashes(staging) if staging is not None else {}
    if staging is not None:  # an interrupted run of this model saved these rows
        logger.info("resuming: %d rows staged by an interrupted run", len(staged_hash))

    ids = source_ids(files, cfg.source.uri, s3, cfg.source.columns.product_id)
    state = RunState(
        duplicates=frozenset(duplicated_ids(ids)),
        published=published_hash,
        staged=staged_hash,
        max_image_bytes=cfg.source.max_image_bytes,
    )
    metadata = metadata_fields(files, cfg.source.uri, s3, list(cfg.source.metadata_columns))
    return RunPlan(
        cfg=cfg, run_id=run_id, s3=s3, files=files, ids=ids, model_id=model_id, db=db,
        products_name=products_name, staging_name=staging_name,
        staging_uri=stage_io.dataset_uri(cfg.index.uri, staging_name),
        storage_options=tables.storage_options(cfg.index.uri, s3) or None,
        staging=staging, state=state, schema=tables.products_schema(dim, metadata),
        faults=fault_hooks.FaultPlan.from_env(),  # test hook: empty unless BLIP_FAULTS is set
        store_itm_tokens=store_tokens,
    )  # fmt: skip


def _hashes(table) -> dict[str, str]:
    """{product_id: content_hash} of a products or staging table."""
    state = tables.published_state(table, ("product_id", "content_hash"))
    return dict(
        zip(
            state.column("product_id").to_pylist(),
            state.column("content_hash").to_pylist(),
            strict=True,
        )
    )


def _encode_dataset(plan: RunPlan):
    """read → validate → decode + encode on the actor pool → write staged rows, as Ray Data."""
    import ray

    from pipelines.indexing.stages import EncodeBatch, read_files

    cfg = plan.cfg
    cols = Columns(
        cfg.source.columns.product_id,
        cfg.source.columns.title,
        cfg.source.columns.image,
        cfg.source.columns.image_uri,
        tuple(cfg.source.metadata_columns),
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    return (
        ray.data.from_items([{"path": p} for p in plan.files], override_num_blocks=len(plan.files))
        .map_batches(
            read_files,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"source_uri": cfg.source.uri, "s3": plan.s3, "columns": cols},
        )
        .map_batches(
            _validate_stage,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"state_ref": [ray.put(plan.state)]},
        )
        .map_batches(
            EncodeBatch,
            batch_format="pyarrow",
            batch_size=cfg.encode.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.encode.num_actors),
            num_cpus=cfg.encode.num_cpus_per_actor,
            num_gpus=cfg.encode.num_gpus_per_actor,
            fn_constructor_kwargs=_encoder_arguments(plan),
        )
        # Workers write the encoded rows into the staging dataset themselves (uncommitted files);
        # only accounting rows and fragment metadata come back to the driver.
        .map_batches(
            stage_io.write_staged_rows,
            batch_format="pyarrow",
            batch_size=cfg.index.stage_flush_rows,
            fn_kwargs={
                "uri": plan.staging_uri,
                "schema": plan.schema,
                "run_id": plan.run_id,
                "storage_options": plan.storage_options,
            },
        )
    )


def _encoder_arguments(plan: RunPlan) -> dict:
    cfg = plan.cfg
    return {
        "model": cfg.model.name_or_path,
        "device": cfg.model.device,
        "dtype": cfg.model.dtype,
        "attention": cfg.model.attention,
        "thumbnail_size": cfg.encode.thumbnail_size,
        "source_uri": cfg.source.uri,
        "s3": plan.s3,
        "max_image_bytes": cfg.source.max_image_bytes,
        "torch_threads": cfg.encode.torch_threads,
        "derivative_threads": cfg.encode.derivative_threads,
        "malloc_mmap_threshold_mb": cfg.encode.malloc_mmap_threshold_mb,
        "faults": plan.faults or None,  # explicitly: actors never see the driver's env
        "store_itm_tokens": plan.store_itm_tokens,
    }


def _consume(ds, plan: RunPlan) -> StreamResult:
    """Account every batch the stream returns and commit the staged rows as they pile up."""
    out = StreamResult()
    committer = stage_io.StagingCommitter(
        plan.staging_uri, plan.schema, exists=plan.staging is not None,
        storage_options=plan.storage_options,
    )  # fmt: skip
    encode_started = time.perf_counter()
    _phase("encode", f"started ({len(plan.files)} files)")
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if batch.num_rows:
            out.worker_rss = max(out.worker_rss, float(pc.max(batch.column(PEAK_RSS)).as_py()))
        status = batch.column(STATUS)
        out.counts.update(status.to_pylist())
        rejected = batch.filter(pc.equal(status, "rejected"))
        if rejected.num_rows:
            out.rejects.append(_reject_table(rejected, plan.run_id))
            out.reasons.update(rejected.column(REASON).to_pylist())
        kept = batch.filter(pc.is_in(status, value_set=pa.array(["indexed", "staged"])))
        out.keep.update(
            zip(
                kept.column("product_id").to_pylist(),
                kept.column("content_hash").to_pylist(),
                strict=True,
            )
        )
        committer.add(batch.column(stage_io.FRAGMENTS).drop_null().to_pylist())
        out.timeline.add(sum(out.counts.values()), out.counts["indexed"])
        encoded_now = batch.filter(pc.equal(status, "indexed")).column("indexed_at")
        out.timeline.add_encoded(t.timestamp() for t in encoded_now.to_pylist())
        if committer.pending_rows >= plan.cfg.index.stage_flush_rows:
            _commit_staged(committer)
    _commit_staged(committer)
    if committer.committed_rows != out.counts["indexed"]:
        raise AssertionError(
            f"staged {committer.committed_rows} rows, encoded {out.counts['indexed']}"
        )
    out.encode_seconds = time.perf_counter() - encode_started
    out.staged_exists = committer.exists
    logger.info(
        "stream done: driver peak %.0f MB, encoder peak %.0f MB", peak_rss_mb(), out.worker_rss
    )
    return out


def _commit_staged(committer: stage_io.StagingCommitter) -> None:
    pending = committer.pending_rows
    committer.commit()
    if pending:  # the rows a rerun would now find staged
        _phase("staging", f"committed {pending} rows ({committer.committed_rows} this run)")


def _account(plan: RunPlan, stream: StreamResult) -> dict:
    """{in, indexed, unchanged, rejected}; every input row is exactly one of the three."""
    c = stream.counts
    counts = {
        "in": len(plan.ids),
        "indexed": c["indexed"] + c["staged"],
        "unchanged": c["unchanged"],
        "rejected": c["rejected"],
    }
    if counts["in"] != counts["indexed"] + counts["unchanged"] + counts["rejected"]:
        raise AssertionError(f"row accounting broken: {counts}")
    return counts


def _merge(plan: RunPlan, stream: StreamResult) -> tuple[object, int]:
    """Merge the staged rows into products in one commit (the table is created on first use);
    with ``index.delete_missing`` the same commit deletes the products absent from the source.
    Returns (the products table, rows deleted)."""
    cfg = plan.cfg
    _phase("merge")
    tables.append(plan.db, plan.products_name, plan.schema)
    _version, _merged, deleted = stage_io.merge_staged(
        stage_io.dataset_uri(cfg.index.uri, plan.products_name),
        plan.staging_uri if stream.staged_exists else None,
        stream.keep,
        source_ids=plan.ids.drop_null().combine_chunks() if cfg.index.delete_missing else None,
        storage_options=plan.storage_options,
    )
    logger.info("merge done: driver peak %.0f MB", peak_rss_mb())
    return plan.db.open_table(plan.products_name), deleted


def _summary(
    plan: RunPlan, stream: StreamResult, counts: dict, *, deleted: int, seconds: float
) -> dict:
    c, enc = stream.counts, stream.encode_seconds
    steady = stream.timeline.steady_rate()
    return {
        "run_id": plan.run_id,
        "model_id": plan.model_id,
        "products_table": plan.products_name,
        **counts,
        "deleted": deleted,
        "rejected_by_reason": dict(stream.reasons),
        "encoded_this_run": c["indexed"],
        "resumed_from_staging": c["staged"],
        "seconds": round(seconds, 2),
        "images_per_s": round(c["indexed"] / enc, 2) if enc > 0 else 0.0,
        "steady_images_per_s": round(steady, 2) if steady else None,
    }


def _record_run(plan: RunPlan, summary: dict, started_at: datetime, seconds: float):
    """Append the run's ``runs`` row (with the guard's decision); returns the runs table."""
    cfg = plan.cfg
    row = {
        "run_id": plan.run_id,
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc),
        "config_digest": config_digest(cfg),
        "model_id": plan.model_id,
        "model_path": cfg.model.name_or_path,
        "source_uri": cfg.source.uri,
        "products_table": plan.products_name,
        "rows_in": summary["in"],
        "indexed": summary["indexed"],
        "unchanged": summary["unchanged"],
        "rejected": summary["rejected"],
        "deleted": summary["deleted"],
        "rejected_by_reason": json.dumps(summary["rejected_by_reason"], sort_keys=True),
        "seconds": seconds,
        "images_per_s": summary["images_per_s"],
        "products_version": summary["products_version"],
        "rejects_version": summary["rejects_version"],
        "status": summary["status"],
        "held_reason": summary["held_reason"],
    }
    rows = pa.Table.from_pylist([row], schema=tables.RUNS_SCHEMA)
    return tables.append(plan.db, tables.RUNS_TABLE, tables.RUNS_SCHEMA, rows)


def _publish(plan: RunPlan, lease: WriterLease, committed: tuple, staged_exists: bool) -> None:
    """Data, indexes and the runs row are committed; now the tags. ``run-<id>`` first on all three
    tables (it marks the run as complete: readers ignore runs rows without it, and
    ``pipelines.publish`` moves ``published`` back to it), the runs table's ``published`` tag
    last: that single move is the switch readers see. A run that dies before it leaves readers
    where they were."""
    _phase("tags")
    lease.check()  # never publish after another writer took the index over
    fault_hooks.kill_before_tags(plan.faults)
    for table in committed:
        tables.move_tag(table, tables.run_tag(plan.run_id), table.version)
    for table in committed:  # products, rejects, runs: the runs table's move is the switch
        tables.move_tag(table, plan.cfg.index.publish_tag, table.version)
    _phase("published", f"(run {plan.run_id})")
    if staged_exists:
        plan.db.drop_table(plan.staging_name)
