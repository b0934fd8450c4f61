"""The nightly index job: catalog Parquet (folder or S3) → Ray Data → BLIP on an actor pool → LanceDB.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/index_catalog.py --config configs/local.yaml
    python -m pipelines.index_catalog --config FILE [key=value ...] [--source …] [--index-uri …] [--model …]

Per run: read every row with its source file and row number; validate on CPU (bad rows → ``rejects``
with a reason); skip rows whose content hash and model_id equal the published row; decode + encode
the rest in an actor pool (the model loads once per actor); stage the encoded rows in a staging
table (Ray Data tasks write them, the driver commits every ``index.stage_flush_rows`` rows and never
holds image bytes); merge them into ``products`` by product_id in one commit, streaming
(``pipelines/indexing/staging.py``); build the indexes;
write the ``runs`` row; then move the tags. Readers open the tag, so a run that dies leaves
``published`` where it was, and a rerun picks up the rows the dead run had already staged.
Every input row is exactly one of indexed, unchanged or rejected, and the job asserts it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/index_catalog.py` (ray job submit) as well as -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import faults as fault_hooks
from pipelines.config import (
    AppConfig,
    add_config_arguments,
    cli_config,
    config_digest,
    dump_config,
)
from pipelines.indexing import staging as stage_io
from pipelines.indexing import tables
from pipelines.indexing.lease import LeaseHeldError, WriterLease
from pipelines.indexing.report import Timeline, write_run_report
from pipelines.indexing.stages import (
    DETAIL,
    PEAK_RSS,
    REASON,
    ROW_NUMBER,
    SOURCE_FILE,
    STATUS,
    Columns,
    RunState,
    peak_rss_mb,
)
from pipelines.indexing.validate import REJECT_REASONS, REJECTS_SCHEMA, duplicated_ids
from pipelines.runtime.cluster import init_ray
from pipelines.storage import S3Settings, filesystem_for

logger = logging.getLogger(__name__)

_STATE_CACHE: dict[str, RunState] = {}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def list_parquet_files(uri: str, s3: S3Settings) -> list[str]:
    """The catalog's Parquet files (hidden ``_``/``.`` entries skipped, as dataset readers do)."""
    fs, root = filesystem_for(uri, s3)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not any(part.startswith(("_", ".")) for part in i.path[len(root) :].split("/") if part)
    )
    if not files:
        raise FileNotFoundError(f"no Parquet files under source {uri!r}")
    return files


def _source_ids(files: list[str], uri: str, s3: S3Settings, id_col: str) -> pa.ChunkedArray:
    """Only the id column of every file: duplicates and deletions need the whole run's ids."""
    fs, _ = filesystem_for(uri, s3)
    chunks = []
    for path in files:
        with fs.open_input_file(path) as f:
            chunks.extend(pq.read_table(f, columns=[id_col]).column(id_col).chunks)
    return pa.chunked_array(chunks, pa.string()) if chunks else pa.chunked_array([], pa.string())


def _metadata_fields(
    files: list[str], uri: str, s3: S3Settings, wanted: list[str]
) -> list[pa.Field]:
    fs, _ = filesystem_for(uri, s3)
    with fs.open_input_file(files[0]) as f:
        schema = pq.ParquetFile(f).schema_arrow
    return [schema.field(name) for name in wanted if name in schema.names]


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


ANN_INDEX = "image_embedding_idx"
FTS_INDEX = "title_normalized_idx"


def _ann_mismatch(products, existing, cfg: AppConfig) -> str | None:
    """Why the existing ANN index must be built again (None when an update will do): another index
    type, metric or configured partition count, or no live row left in it (Lance would retrain it
    on the new rows alone, with partitions of its own choosing)."""
    idx = existing[ANN_INDEX]
    if not idx.num_indexed_rows:  # the run replaced every row: nothing of the old index is live
        return "it indexes no live row"
    want = cfg.index.ann_index_type
    if idx.index_type.replace("_", "").lower() != want.replace("_", "").lower():
        return f"index type {idx.index_type}, configured {want}"
    metric = (idx.index_details or {}).get("metric_type")
    if metric and str(metric).lower() != "cosine":
        return f"metric {metric}, expected cosine"
    if cfg.index.ann_num_partitions:
        stats = products.to_lance().stats.index_stats(ANN_INDEX)
        got = {seg.get("num_partitions") for seg in stats.get("indices") or []}
        if got != {cfg.index.ann_num_partitions}:
            return f"{sorted(got, key=str)} partitions, configured {cfg.index.ann_num_partitions}"
    return None


def build_indexes(products, cfg: AppConfig, n_rows: int, *, changed: bool) -> str | None:
    """The ANN index (IVF-type once there are enough rows to train it; exact search below) and the
    full-text index on the normalised title.

    An index is built from scratch only when there is none (or the ANN index's type, metric or
    configured partitions changed); otherwise a run that changed rows updates the existing indexes
    incrementally: only its new rows are indexed, as a delta segment of each index (the ANN delta
    uses the trained partitions: no retraining); ``pipelines.maintain`` merges the deltas.
    Unchanged data keeps its indexes. Rows an index does not cover yet are still found (searched
    exhaustively), so correctness never depends on this step, only latency."""
    from lancedb.index import FTS

    existing = {i.name: i for i in products.list_indices()}
    ann = None
    update: list[str] = []
    if n_rows >= cfg.index.ann_min_rows:
        partitions = cfg.index.ann_num_partitions or max(1, int(n_rows**0.5))
        why = _ann_mismatch(products, existing, cfg) if ANN_INDEX in existing else "none yet"
        if why is not None:
            logger.info("building the ANN index from scratch (%s)", why)
            products.create_index(
                metric="cosine",
                vector_column_name="image_embedding",
                index_type=cfg.index.ann_index_type,
                num_partitions=partitions,
                replace=True,
            )
            stats = products.index_stats(ANN_INDEX)
            if (
                stats is None or stats.num_indexed_rows == 0
            ):  # an index trained on too few rows indexes nothing
                raise RuntimeError(f"ANN index on {n_rows} rows indexed nothing: {stats}")
            ann = f"{cfg.index.ann_index_type}({partitions})"
        else:
            ann = f"{cfg.index.ann_index_type} ({'updated incrementally' if changed else 'unchanged'})"
            update += [ANN_INDEX] if changed else []
    elif ANN_INDEX in existing and changed:  # fewer rows than ann_min_rows now: keep it current
        update.append(ANN_INDEX)
    if n_rows and FTS_INDEX not in existing:
        products.create_index("title_normalized", config=FTS(), replace=True)
    elif FTS_INDEX in existing and changed:
        update.append(FTS_INDEX)
    if update:
        # num_indices_to_merge=0: index only the new rows, as a delta segment beside the old
        # ones (Lance's default may rewrite a small index whole); maintenance merges the deltas.
        products.to_lance().optimize.optimize_indices(index_names=update, num_indices_to_merge=0)
        products.checkout_latest()
        logger.info("indexes %s updated incrementally", update)
    return ann


def run_index(cfg: AppConfig, *, run_id: str | None = None) -> dict:
    """Run the job once and return its summary (also stored as the ``runs`` row).

    The whole run holds the index's writer lease (``pipelines/indexing/lease.py``): a second
    writer, or a maintenance, refuses to start beside it (LeaseHeldError). With
    ``maintain.after_index`` the run then maintains the index under the same lease; a failed
    maintenance is logged and reported in ``summary["maintenance"]``, never fails the run."""
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
    from pipelines.maintain import run_maintenance

    try:
        return run_maintenance(cfg, lease=lease, maintenance_id=f"after-{run_id}")
    except Exception as err:  # noqa: BLE001 - the run is published: maintenance only reports
        logger.exception("maintenance after run %s failed (the run is published)", run_id)
        return {"error": f"{type(err).__name__}: {err}"}


def _index_run(cfg: AppConfig, run_id: str, lease: WriterLease) -> dict:
    """The job's body, run under ``lease``."""
    import ray

    from blip_ops import load_model

    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    faults = fault_hooks.FaultPlan.from_env()  # test hook: empty unless BLIP_FAULTS is set
    s3 = S3Settings.from_config(cfg.s3)
    cols = Columns(
        cfg.source.columns.product_id,
        cfg.source.columns.title,
        cfg.source.columns.image,
        cfg.source.columns.image_uri,
        tuple(cfg.source.metadata_columns),
    )
    files = list_parquet_files(cfg.source.uri, s3)
    model = load_model(
        cfg.model.name_or_path, device="cpu", dtype="float32", attention=cfg.model.attention
    )
    model_id, dim = model.model_id, model.embedding_dim
    del model

    db = tables.connect(cfg.index.uri, s3)
    products_name = tables.products_table_name(cfg.index.table, model_id)
    staging_name = f"_staging__{model_id}"
    staging_uri = stage_io.dataset_uri(cfg.index.uri, staging_name)
    storage_options = tables.storage_options(cfg.index.uri, s3) or None
    existing = tables.table_names(db)
    published = tables.open_tagged(db, products_name, cfg.index.publish_tag)
    published_hash: dict[str, str] = {}
    published_ids: list[str] = []
    if published is not None:
        state = tables.published_state(published)
        published_ids = state.column("product_id").to_pylist()
        published_hash = dict(
            zip(published_ids, state.column("content_hash").to_pylist(), strict=True)
        )
    staged_hash: dict[str, str] = {}
    staging = _open_staging(db, staging_name) if staging_name in existing else None
    if staging is not None:  # an interrupted run of this model saved these rows
        prior = tables.published_state(staging, ("product_id", "content_hash"))
        staged_hash = dict(
            zip(
                prior.column("product_id").to_pylist(),
                prior.column("content_hash").to_pylist(),
                strict=True,
            )
        )
        logger.info("resuming: %d rows staged by an interrupted run", len(staged_hash))

    ids = _source_ids(files, cfg.source.uri, s3, cols.product_id)
    state = RunState(
        duplicates=frozenset(duplicated_ids(ids)),
        published=published_hash,
        staged=staged_hash,
        max_image_bytes=cfg.source.max_image_bytes,
    )
    metadata = _metadata_fields(files, cfg.source.uri, s3, list(cols.metadata))
    schema = tables.products_schema(dim, metadata)

    init_ray(cfg)
    from pipelines.indexing.stages import EncodeBatch, read_files

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ds = (
        ray.data.from_items([{"path": p} for p in files], override_num_blocks=len(files))
        .map_batches(
            read_files,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"source_uri": cfg.source.uri, "s3": s3, "columns": cols},
        )
        .map_batches(
            _validate_stage,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"state_ref": [ray.put(state)]},
        )
        .map_batches(
            EncodeBatch,
            batch_format="pyarrow",
            batch_size=cfg.encode.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.encode.num_actors),
            num_cpus=cfg.encode.num_cpus_per_actor,
            num_gpus=cfg.encode.num_gpus_per_actor,
            fn_constructor_kwargs={
                "model": cfg.model.name_or_path,
                "device": cfg.model.device,
                "dtype": cfg.model.dtype,
                "attention": cfg.model.attention,
                "thumbnail_size": cfg.encode.thumbnail_size,
                "source_uri": cfg.source.uri,
                "s3": s3,
                "max_image_bytes": cfg.source.max_image_bytes,
                "torch_threads": cfg.encode.torch_threads,
                "derivative_threads": cfg.encode.derivative_threads,
                "malloc_mmap_threshold_mb": cfg.encode.malloc_mmap_threshold_mb,
                "faults": faults or None,  # explicitly: actors never see the driver's env
            },
        )
        # Workers write the encoded rows into the staging dataset themselves (uncommitted files);
        # only accounting rows and fragment metadata come back to the driver.
        .map_batches(
            stage_io.write_staged_rows,
            batch_format="pyarrow",
            batch_size=cfg.index.stage_flush_rows,
            fn_kwargs={
                "uri": staging_uri,
                "schema": schema,
                "run_id": run_id,
                "storage_options": storage_options,
            },
        )
    )

    counts: Counter = Counter()
    reasons: Counter = Counter()
    rejects: list[pa.Table] = []
    keep: dict[str, str] = {}  # product_id -> content hash of the rows this run publishes
    committer = stage_io.StagingCommitter(
        staging_uri, schema, exists=staging is not None, storage_options=storage_options
    )
    encode_started = time.perf_counter()
    worker_rss = 0.0
    timeline = Timeline()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if batch.num_rows:
            worker_rss = max(worker_rss, float(pc.max(batch.column(PEAK_RSS)).as_py()))
        status = batch.column(STATUS)
        counts.update(status.to_pylist())
        rejected = batch.filter(pc.equal(status, "rejected"))
        if rejected.num_rows:
            rejects.append(_reject_table(rejected, run_id))
            reasons.update(rejected.column(REASON).to_pylist())
        kept = batch.filter(pc.is_in(status, value_set=pa.array(["indexed", "staged"])))
        keep.update(
            zip(
                kept.column("product_id").to_pylist(),
                kept.column("content_hash").to_pylist(),
                strict=True,
            )
        )
        committer.add(batch.column(stage_io.FRAGMENTS).drop_null().to_pylist())
        timeline.add(sum(counts.values()), counts["indexed"])
        encoded_now = batch.filter(pc.equal(status, "indexed")).column("indexed_at")
        timeline.add_encoded(t.timestamp() for t in encoded_now.to_pylist())
        if committer.pending_rows >= cfg.index.stage_flush_rows:
            committer.commit()
    committer.commit()
    if committer.committed_rows != counts["indexed"]:
        raise AssertionError(f"staged {committer.committed_rows} rows, encoded {counts['indexed']}")
    encode_seconds = time.perf_counter() - encode_started
    logger.info("stream done: driver peak %.0f MB, encoder peak %.0f MB", peak_rss_mb(), worker_rss)

    rows_in = len(ids)
    indexed_n = counts["indexed"] + counts["staged"]
    summary_counts = {
        "in": rows_in,
        "indexed": indexed_n,
        "unchanged": counts["unchanged"],
        "rejected": counts["rejected"],
    }
    if rows_in != indexed_n + counts["unchanged"] + counts["rejected"]:
        raise AssertionError(f"row accounting broken: {summary_counts}")

    # Merge the staged rows into products in one commit (create the table on first use); with
    # delete_missing the same commit deletes the products absent from the source.
    tables.append(db, products_name, schema)
    _version, _merged, deleted = stage_io.merge_staged(
        stage_io.dataset_uri(cfg.index.uri, products_name),
        staging_uri if committer.exists else None,
        keep,
        source_ids=ids.drop_null().combine_chunks() if cfg.index.delete_missing else None,
        storage_options=storage_options,
    )
    products = db.open_table(products_name)
    logger.info("merge done: driver peak %.0f MB", peak_rss_mb())
    n_rows = products.count_rows()
    changed = bool(keep) or deleted > 0
    ann = build_indexes(products, cfg, n_rows, changed=changed)
    rejects_table = tables.append(
        db, tables.REJECTS_TABLE, REJECTS_SCHEMA, pa.concat_tables(rejects) if rejects else None
    )

    seconds = time.perf_counter() - started
    summary = {
        "run_id": run_id,
        "model_id": model_id,
        "products_table": products_name,
        **summary_counts,
        "deleted": deleted,
        "rejected_by_reason": dict(reasons),
        "encoded_this_run": counts["indexed"],
        "resumed_from_staging": counts["staged"],
        "seconds": round(seconds, 2),
        "images_per_s": round(counts["indexed"] / encode_seconds, 2) if encode_seconds > 0 else 0.0,
        "steady_images_per_s": round(steady, 2) if (steady := timeline.steady_rate()) else None,
        "products_rows": n_rows,
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "worker_peak_rss_mb": round(worker_rss, 1),
        "ann_index": ann,
        "products_version": products.version,
        "rejects_version": rejects_table.version,
    }
    run_row = {
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc),
        "config_digest": config_digest(cfg),
        "model_id": model_id,
        "model_path": cfg.model.name_or_path,
        "source_uri": cfg.source.uri,
        "products_table": products_name,
        "rows_in": rows_in,
        "indexed": indexed_n,
        "unchanged": counts["unchanged"],
        "rejected": counts["rejected"],
        "deleted": deleted,
        "rejected_by_reason": json.dumps(dict(reasons), sort_keys=True),
        "seconds": seconds,
        "images_per_s": summary["images_per_s"],
        "products_version": products.version,
        "rejects_version": rejects_table.version,
    }
    runs_rows = pa.Table.from_pylist([run_row], schema=tables.RUNS_SCHEMA)
    runs_table = tables.append(db, tables.RUNS_TABLE, tables.RUNS_SCHEMA, runs_rows)

    # Publish: data, indexes and the runs row are committed; now the tags. `run-<id>` first on
    # all three tables (it marks the run as complete: readers ignore runs rows without it, and
    # `pipelines.publish` moves `published` back to it), the runs table's `published` tag last:
    # that single move is the switch readers see. A run that dies before it leaves readers where
    # they were.
    lease.check()  # never publish after another writer took the index over
    fault_hooks.kill_before_tags(faults)
    for table in (products, rejects_table, runs_table):
        tables.move_tag(table, tables.run_tag(run_id), table.version)
    tables.move_tag(products, cfg.index.publish_tag, products.version)
    tables.move_tag(rejects_table, cfg.index.publish_tag, rejects_table.version)
    tables.move_tag(runs_table, cfg.index.publish_tag, runs_table.version)
    if committer.exists:
        db.drop_table(staging_name)
    try:  # the report is for people: a failure to write it never fails a published run
        summary["report"] = write_run_report(cfg.index.uri, s3, summary, timeline, dump_config(cfg))
    except OSError as err:
        logger.warning("could not write the run report: %s", err)
        summary["report"] = None
    return summary


def print_summary(s: dict) -> None:
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "none"
    print(
        f"run {s['run_id']}  model {s['model_id']}\n"
        f"  rows in {s['in']}: indexed {s['indexed']} (encoded now {s['encoded_this_run']}, "
        f"resumed {s['resumed_from_staging']}), unchanged {s['unchanged']}, rejected {s['rejected']}, "
        f"deleted {s['deleted']}\n"
        f"  rejected by reason: {by_reason}\n"
        f"  {s['seconds']}s, {s['images_per_s']} images/s (steady, model loaded: "
        f"{s['steady_images_per_s'] or 'n/a'}); table {s['products_table']} "
        f"({s['products_rows']} rows, ANN {s['ann_index'] or 'none: exact search'}) "
        f"published at version {s['products_version']}\n"
        f"  peak memory: driver {s['driver_peak_rss_mb']} MB, encoder actor {s['worker_peak_rss_mb']} MB\n"
        f"  report: {s.get('report') or 'not written'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.index_catalog", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("source", "index_uri", "model"))
    parser.add_argument("--run-id", default=None, help="run id (default: UTC time + random suffix)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    from blip_ops.hub import ModelUnavailableError

    try:
        summary = run_index(cfg, run_id=args.run_id)
    except LeaseHeldError as err:  # another writer is live: not a configuration error
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ModelUnavailableError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # storage failed past its retries: nothing was published
        logger.debug("storage failure", exc_info=True)
        print(
            f"error: storage I/O failed after retries ({type(err).__name__}: {err}); nothing "
            f"was published (`{cfg.index.publish_tag}` is where it was); rerun to resume",
            file=sys.stderr,
        )
        return 1
    print_summary(summary)
    if "maintenance" in summary:
        from pipelines.maintain import format_summary

        done = summary["maintenance"]
        failed = f"  maintenance FAILED: {done.get('error')}"
        print(format_summary(done) if "error" not in done else failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
