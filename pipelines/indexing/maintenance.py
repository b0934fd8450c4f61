"""Table maintenance: drop old run tags, compact fragments, merge index deltas, delete old versions.

Never a tagged version, never a staging table, never beside a live writer.

Run by ``python -m pipelines.maintain`` or, with ``maintain.after_index=true``, at the end of every
index run (under the run's own lease).

Steps, all under the index's writer lease (``pipelines/indexing/lease.py``; a live holder makes
the command refuse with exit code 3, a stale one is taken over):

1. **Tags.** Keep the ``run-*`` tags of the newest ``maintain.keep_runs`` completed runs (by
   ``finished_at`` in the ``runs`` table), of the published run, and of every run whose version
   another tag (``published``, or any tag that is not a run's) points to; delete the other
   ``run-*`` tags on every table. Tags that are not ``run-*`` are never touched.
2. **Per table** (``_staging__*`` tables are skipped: an index run's workers write uncommitted
   files into them): merge the index's delta segments (new rows assigned to the trained
   partitions, no retraining), so fragments indexed by different deltas can be compacted together;
   compact fragments smaller than ``maintain.target_rows_per_fragment``; fold any rows the indexes
   do not cover yet into them; then delete versions older than ``maintain.cleanup_older_than_hours``
   that no tag points to, with ``delete_unverified=False`` (files no version references, such as a
   writer's uncommitted ones, are kept until Lance's own 7-day limit).

Maintenance never moves a tag: readers keep the version they were given (the compacted version
becomes the base of the next index run, which publishes it). Old versions of a kept run stay
openable and answer the same queries; their files are freed once their tags age out.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.config import AppConfig
from pipelines.indexing import staging as stage_io
from pipelines.indexing import tables
from pipelines.indexing.lease import LeaseLostError, WriterLease
from pipelines.storage import S3Settings, filesystem_for, is_s3

logger = logging.getLogger(__name__)


STAGING_PREFIX = "_staging__"


EXIT_LEASE_HELD = 3


_OLDEST = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class TableState:
    """What maintenance changes in one table, measured at its latest version."""

    versions: int  # len(list_versions()): versions still on disk
    fragments: int  # fragments of the latest version
    bytes: int  # everything under <table>.lance (data, deletions, indexes, manifests)
    run_tags: int  # run-* tags
    index_segments: int  # index segments (deltas) over all indexes


@dataclass
class TableResult:
    name: str
    before: TableState
    after: TableState | None = None
    tags_deleted: list[str] = field(default_factory=list)
    compaction: dict | None = None  # fragments_removed/added, files_removed/added
    bytes_removed: int = 0  # what cleanup reported
    versions_removed: int = 0
    error: str | None = None


@dataclass(frozen=True)
class KeepPlan:
    kept: dict[str, str]  # run_id -> why its run-* tags stay
    completed: int  # completed runs found in the runs table


def new_maintenance_id() -> str:
    return (
        "maintain-"
        + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        + "-"
        + uuid.uuid4().hex[:6]
    )


def maintained_tables(db) -> tuple[list[str], list[str]]:
    """(tables maintenance works on, staging tables it never touches)."""
    names = sorted(tables.table_names(db))
    staging = [n for n in names if n.startswith(STAGING_PREFIX)]
    return [n for n in names if n not in staging], staging


def dataset_bytes(index_uri: str, name: str, s3: S3Settings | None) -> int:
    """Bytes under ``<index_uri>/<name>.lance`` (local folder or S3 prefix)."""
    fs, root = filesystem_for(stage_io.dataset_uri(index_uri, name), s3)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def table_state(db, name: str, index_uri: str, s3: S3Settings | None) -> TableState:
    table = db.open_table(name)
    return TableState(
        versions=len(table.list_versions()),
        fragments=len(table.to_lance().get_fragments()),
        bytes=dataset_bytes(index_uri, name, s3),
        run_tags=sum(t.startswith(tables.RUN_TAG_PREFIX) for t in table.tags.list()),
        index_segments=sum(i.num_segments or 0 for i in table.list_indices()),
    )


# ---------------------------------------------------------------- 1. which run tags stay
def plan_kept_runs(db, names: list[str], keep_runs: int) -> KeepPlan:
    """The runs whose ``run-*`` tags stay: the newest ``keep_runs`` completed runs, the published
    run, and for every version a non-run tag (``published``, …) of a table points to, the newest
    run tagged at that version (versions are shared by runs that changed nothing in a table, e.g.
    every run without rejects tags the same ``rejects`` version: one run names it)."""
    if keep_runs < 1:
        raise ValueError(f"keep_runs must be at least 1, got {keep_runs}")
    tags = {name: db.open_table(name).tags.list() for name in names}
    rows: list[dict] = []
    if tables.RUNS_TABLE in tags:
        rows = (
            db.open_table(tables.RUNS_TABLE)
            .search()
            .select(["run_id", "finished_at", "products_table"])
            .limit(None)
            .to_arrow()
            .to_pylist()
        )
    finished = {r["run_id"]: r["finished_at"] or _OLDEST for r in rows}
    # A run that died after writing its row but before tagging its data never completed.
    completed = [
        r
        for r in rows
        if tables.run_tag(r["run_id"]) in tags.get(r["products_table"], {})
        or tables.run_tag(r["run_id"]) in tags[tables.RUNS_TABLE]
    ]
    completed.sort(key=lambda r: finished[r["run_id"]], reverse=True)
    kept = {r["run_id"]: "newest" for r in completed[:keep_runs]}
    published = tables.published_run(db)
    if published is not None:
        kept[published["run_id"]] = "published"
    for name, table_tags in sorted(tags.items()):
        for pin, ref in sorted(table_tags.items()):
            if pin.startswith(tables.RUN_TAG_PREFIX):
                continue
            at_pin = [
                tag[len(tables.RUN_TAG_PREFIX) :]
                for tag, v in table_tags.items()
                if tag.startswith(tables.RUN_TAG_PREFIX) and v["version"] == ref["version"]
            ]
            if at_pin:
                newest = max(at_pin, key=lambda run: (finished.get(run, _OLDEST), run))
                kept.setdefault(newest, f"at tag {pin!r} of {name}")
    return KeepPlan(kept=kept, completed=len(completed))


def prune_run_tags(table, kept: set[str]) -> list[str]:
    """Delete the table's ``run-*`` tags of runs not in ``kept``; other tags are never touched."""
    deleted = []
    for tag in sorted(table.tags.list()):
        if tag.startswith(tables.RUN_TAG_PREFIX) and tag[len(tables.RUN_TAG_PREFIX) :] not in kept:
            table.tags.delete(tag)
            deleted.append(tag)
    return deleted


# ---------------------------------------------------------------- 2. per table
def _index_work(table) -> tuple[int, int]:
    """(most segments of any index, rows some index does not cover yet)."""
    indices = list(table.list_indices())
    if not indices:
        return 0, 0
    segments = max(i.num_segments or 1 for i in indices)
    unindexed = max(i.num_unindexed_rows or 0 for i in indices)
    return segments, unindexed


def optimize_indexes(db, name: str) -> bool:
    """Fold unindexed rows into the indexes and merge their delta segments into one, reusing the
    trained partitions (no retraining). Returns whether there was anything to do."""
    segments, unindexed = _index_work(db.open_table(name))
    if segments <= 1 and not unindexed:
        return False
    db.open_table(name).to_lance().optimize.optimize_indices(num_indices_to_merge=max(1, segments))
    logger.info("%s: indexes optimised (%d segments, %d unindexed rows)", name, segments, unindexed)
    return True


def compact(db, name: str, target_rows_per_fragment: int) -> dict:
    """Merge small fragments (and materialise heavy deletions); index row ids are remapped."""
    metrics = (
        db.open_table(name)
        .to_lance()
        .optimize.compact_files(target_rows_per_fragment=target_rows_per_fragment)
    )
    out = {
        k: getattr(metrics, k)
        for k in ("fragments_removed", "fragments_added", "files_removed", "files_added")
    }
    logger.info("%s: compaction %s", name, out)
    return out


def cleanup(db, name: str, older_than: timedelta) -> tuple[int, int]:
    """Delete the untagged versions older than ``older_than`` (never the latest, never a tagged
    one) and the files only they used. ``delete_unverified=False``: files no version references
    (an in-progress writer's) are left alone. Returns (bytes removed, versions removed)."""
    stats = (
        db.open_table(name)
        .to_lance()
        .cleanup_old_versions(
            older_than=older_than, delete_unverified=False, error_if_tagged_old_versions=False
        )
    )
    return int(stats.bytes_removed), int(stats.old_versions)


def check_tags_intact(db, name: str) -> None:
    """Every tag of the table still points to a version that exists (cleanup never deletes a
    tagged version; this guards against a Lance change of behaviour)."""
    table = db.open_table(name)
    versions = {v["version"] for v in table.list_versions()}
    lost = {t: v["version"] for t, v in table.tags.list().items() if v["version"] not in versions}
    if lost:
        raise RuntimeError(f"{name}: tagged versions missing after cleanup: {lost}")


def maintain_table(db, name: str, cfg: AppConfig, result: TableResult, lease: WriterLease) -> None:
    """Compaction, incremental index optimisation and cleanup of one (non-staging) table."""
    m = cfg.maintain
    optimize_indexes(db, name)  # one index segment set, so compaction can merge across deltas
    result.compaction = compact(db, name, m.target_rows_per_fragment)
    optimize_indexes(db, name)  # anything compaction left unindexed
    lease.check()  # never delete files after another writer took the index over
    result.bytes_removed, result.versions_removed = cleanup(
        db, name, timedelta(hours=m.cleanup_older_than_hours)
    )
    check_tags_intact(db, name)


# ---------------------------------------------------------------- the command
def run_maintenance(
    cfg: AppConfig, *, lease: WriterLease | None = None, maintenance_id: str | None = None
) -> dict:
    """Maintain every table of ``cfg.index.uri`` and return the summary. With ``lease`` (the index
    job's, after it published) that lease is used; otherwise the writer lease is acquired here
    (LeaseHeldError while a live writer holds it)."""
    started = time.perf_counter()
    s3 = S3Settings.from_config(cfg.s3)
    uri = cfg.index.uri
    if not is_s3(uri) and not Path(uri).is_dir():
        raise FileNotFoundError(f"index.uri {uri!r} is not a folder: nothing to maintain")
    db = tables.connect(uri, s3)
    names, staging = maintained_tables(db)
    if not names:
        raise FileNotFoundError(f"index.uri {uri!r} holds no LanceDB tables: nothing to maintain")
    maintenance_id = maintenance_id or new_maintenance_id()
    own = lease is None
    if own:
        lease = WriterLease(
            uri,
            s3,
            kind="maintain",
            run_id=maintenance_id,
            stale_after=timedelta(minutes=cfg.maintain.writer_stale_minutes),
        )
        lease.acquire()
        lease.start_renewing()
    assert lease is not None
    try:
        summary = _maintain(cfg, db, names, staging, s3, lease)
    finally:
        if own:
            lease.release()
    summary.update(
        maintenance_id=maintenance_id,
        index_uri=uri,
        took_over=lease.took_over.describe() if lease.took_over else None,
        seconds=round(time.perf_counter() - started, 2),
    )
    return summary


def _maintain(
    cfg: AppConfig, db, names: list[str], staging: list[str], s3: S3Settings, lease: WriterLease
) -> dict:
    uri = cfg.index.uri
    published_before = tables.published_run(db)
    results = {name: TableResult(name, table_state(db, name, uri, s3)) for name in names}
    plan = plan_kept_runs(db, names, cfg.maintain.keep_runs)
    lease.check()
    for name in names:
        results[name].tags_deleted = prune_run_tags(db.open_table(name), set(plan.kept))
    for name in names:
        result = results[name]
        try:
            maintain_table(db, name, cfg, result, lease)
        except LeaseLostError:
            raise
        except Exception as err:  # noqa: BLE001 - one table's failure is reported, the rest go on
            logger.exception("maintenance of %s failed", name)
            result.error = f"{type(err).__name__}: {err}"
        result.after = table_state(db, name, uri, s3)
    published_after = tables.published_run(db)
    if (published_before or {}).get("run_id") != (published_after or {}).get("run_id"):
        raise RuntimeError(
            f"the published run changed during maintenance: {published_before} -> {published_after}"
        )
    before = [r.before for r in results.values()]
    after = [r.after or r.before for r in results.values()]
    return {
        "kept_runs": plan.kept,
        "completed_runs": plan.completed,
        "published_run": published_after["run_id"] if published_after else None,
        "skipped_staging": staging,
        "tables": {
            name: {k: v for k, v in asdict(r).items() if k != "name"} for name, r in results.items()
        },
        "totals": {
            "bytes_before": sum(s.bytes for s in before),
            "bytes_after": sum(s.bytes for s in after),
            "versions_before": sum(s.versions for s in before),
            "versions_after": sum(s.versions for s in after),
            "fragments_before": sum(s.fragments for s in before),
            "fragments_after": sum(s.fragments for s in after),
            "tags_deleted": sum(len(r.tags_deleted) for r in results.values()),
        },
        "errors": {name: r.error for name, r in results.items() if r.error},
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def format_summary(s: dict) -> str:
    t = s["totals"]
    kept = ", ".join(f"{run} ({why})" for run, why in sorted(s["kept_runs"].items())) or "none"
    lines = [
        f"maintenance {s['maintenance_id']} of {s['index_uri']}  ({s['seconds']}s)",
        f"  run tags kept for {len(s['kept_runs'])} of {s['completed_runs']} completed runs: {kept}",
        f"  run tags deleted: {t['tags_deleted']}; published run: {s['published_run'] or 'none'}",
        f"  {'table':<40} {'versions':>11} {'fragments':>11} {'disk':>22}",
    ]
    for name, r in s["tables"].items():
        b, a = r["before"], r["after"] or r["before"]
        lines.append(
            f"  {name[:40]:<40} {b['versions']:>4} -> {a['versions']:<4} "
            f"{b['fragments']:>4} -> {a['fragments']:<4} "
            f"{_mb(b['bytes']):>10} -> {_mb(a['bytes']):<10}"
        )
    lines.append(
        f"  {'total':<40} {t['versions_before']:>4} -> {t['versions_after']:<4} "
        f"{t['fragments_before']:>4} -> {t['fragments_after']:<4} "
        f"{_mb(t['bytes_before']):>10} -> {_mb(t['bytes_after']):<10}"
    )
    if s["skipped_staging"]:
        lines.append(f"  staging tables left untouched: {', '.join(s['skipped_staging'])}")
    if s.get("took_over"):
        lines.append(f"  took over a stale writer lease: {s['took_over']}")
    for name, err in s["errors"].items():
        lines.append(f"  FAILED {name}: {err}")
    return "\n".join(lines)

