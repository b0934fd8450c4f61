"""Move a tag to a completed run: model rollout (forward) and rollback (back), in one switch.

``publish(cfg, "run-<id>")`` does it under the index's writer lease (``pipelines/publish.py`` is its
command line).

Every completed index run tags ``run-<id>`` on its products table, on ``rejects`` and on ``runs``
(``pipelines.indexing.job``). Publishing run ``<id>`` points ``--tag`` (``index.publish_tag`` by
default) at those versions: the products table first, then ``rejects``, and the ``runs`` table last.
Readers resolve the published version through the runs table's tag alone (the run it shows
names the products table and version), so that last move is the switch, and the search service
follows it at its next refresh, loading the query encoder of that run's model (the checkpoint the
run recorded) before it swaps; a request is answered wholly by the old or by the new version.

A rollback moves tags; nothing is re-encoded. When the run's products table has moved on since
that run (a rollback to an older run of the same model), its run's version is also restored as the
table's newest one (no data copied), so that the next run of that model builds on the published
rows and not on the ones rolled back from. The next nightly run
publishes whatever model its config names, so a rollback of a model is followed by pointing
``model.name_or_path`` back at the run's checkpoint (the summary says so when they differ).

A run the publish guard held back (more than ``index.max_reject_fraction`` of its input rows
rejected, or none accepted: :func:`publish_guard`) wrote its ``rejects`` and ``runs`` rows (status
``held`` and the reason) but merged nothing and tagged nothing: readers, maintenance and the search
service ignore it, and publishing it is refused (PublishError) with what to do instead."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from pipelines.config import AppConfig
from pipelines.indexing import tables
from pipelines.indexing.lease import WriterLease
from pipelines.storage import S3Settings

logger = logging.getLogger(__name__)

PASSED, HELD = "passed", "held"


class PublishError(ValueError):
    """The run cannot be published (unknown, incomplete, held back, or its versions were cleaned
    up)."""


class RunHeldBack(Exception):
    """The publish guard held the run back: its ``rejects`` and ``runs`` rows are committed, its rows
    were not merged and no tag moved. ``summary``: the run's summary (counts by reason)."""

    def __init__(self, summary: dict):
        super().__init__(summary["held_reason"])
        self.summary = summary


def publish_guard(counts: dict, max_reject_fraction: float) -> str | None:
    """Why a run with ``counts`` ({in, rejected, ...}) must not be published, or None when it may.

    A run with no accepted row is held whatever ``max_reject_fraction`` says: publishing it would
    show readers an empty index (on a first run) or nothing new."""
    n_in, rejected = counts["in"], counts["rejected"]
    if n_in - rejected <= 0:
        return f"no row accepted: {rejected} of {n_in} input rows rejected"
    share = rejected / n_in
    if share > max_reject_fraction:
        return (
            f"rejected {rejected} of {n_in} input rows ({share:.1%}), over "
            f"index.max_reject_fraction={max_reject_fraction:g}"
        )
    return None


@dataclass(frozen=True)
class RunVersions:
    """The versions of each table that make up one completed run."""

    run: dict
    products_table: str
    products_version: int
    rejects_version: int | None
    runs_version: int


def parse_run_id(to: str) -> str:
    run_id = to.strip()
    if run_id.startswith(tables.RUN_TAG_PREFIX):
        run_id = run_id[len(tables.RUN_TAG_PREFIX) :]
    if not run_id:
        raise PublishError(f"--to expects run-<id> or a run id, got {to!r}")
    return run_id


def recent_runs(db, n: int = 10) -> list[dict]:
    """The newest ``n`` runs rows (any state), newest first."""
    if tables.RUNS_TABLE not in tables.table_names(db):
        return []
    rows = db.open_table(tables.RUNS_TABLE).search().limit(None).to_arrow().to_pylist()
    return sorted(rows, key=lambda r: r["finished_at"], reverse=True)[:n]


def _tag_version(table, tag: str) -> int | None:
    found = table.tags.list().get(tag)
    return None if found is None else int(found["version"])


def _first_version_with(table, run_id: str) -> int | None:
    """The runs table's first version holding ``run_id``'s row: for runs written before the
    runs table carried run tags. None when cleanup has removed it."""
    quoted = run_id.replace("'", "''")
    for v in sorted(int(x["version"]) for x in table.list_versions()):
        table.checkout(v)
        if table.count_rows(f"run_id = '{quoted}'"):
            table.checkout_latest()
            return v
    table.checkout_latest()
    return None


def run_versions(db, run_id: str) -> RunVersions:
    """Where run ``run_id`` left each table, from its ``run-<id>`` tags; PublishError when the run
    is unknown, never completed, or maintenance has removed its tags."""
    run = tables.find_run(db, run_id)
    if run is None:
        known = ", ".join(r["run_id"] for r in recent_runs(db, 5)) or "none"
        raise PublishError(f"no run {run_id!r} in the runs table (newest runs: {known})")
    if run.get("status") == HELD:
        raise PublishError(
            f"run {run_id} was held back by the publish guard ({run['held_reason']}): its rows "
            f"were never merged, so there is nothing to publish; fix the source and rerun, or "
            f"rerun with index.max_reject_fraction=1.0 to publish the rows it accepts"
        )
    tag = tables.run_tag(run_id)
    name = run["products_table"]
    if name not in tables.table_names(db):
        raise PublishError(f"run {run_id}'s products table {name} no longer exists")
    products_version = _tag_version(db.open_table(name), tag)
    if products_version is None:
        raise PublishError(
            f"run {run_id} has no {tag} tag on {name}: it never completed, or maintenance removed "
            f"its tag (maintain.keep_runs); publish a newer run"
        )
    runs_table = db.open_table(tables.RUNS_TABLE)
    runs_version = _tag_version(runs_table, tag) or _first_version_with(runs_table, run_id)
    if runs_version is None:
        raise PublishError(f"the runs table no longer has a version with run {run_id}")
    rejects_version = None
    if tables.REJECTS_TABLE in tables.table_names(db):
        rejects = db.open_table(tables.REJECTS_TABLE)
        rejects_version = _tag_version(rejects, tag)
        if rejects_version is None:  # runs written before rejects carried run tags
            existing = {int(v["version"]) for v in rejects.list_versions()}
            rejects_version = run["rejects_version"] if run["rejects_version"] in existing else None
    return RunVersions(run, name, products_version, rejects_version, runs_version)


def publish(cfg: AppConfig, to: str, tag: str | None = None) -> dict:
    """Point ``tag`` (default ``index.publish_tag``) at run ``to``; the summary of the move."""
    tag = tag or cfg.index.publish_tag
    if tag.startswith(tables.RUN_TAG_PREFIX):
        raise PublishError(f"--tag {tag!r}: run-* tags belong to their runs and never move")
    s3 = S3Settings.from_config(cfg.s3)
    run_id = parse_run_id(to)
    # Under the writer lease: a maintenance pruning run-* tags, or an index run moving the tags,
    # never interleaves with this switch (LeaseHeldError while one is live).
    with WriterLease(
        cfg.index.uri,
        s3,
        kind="publish",
        run_id=run_id,
        stale_after=timedelta(minutes=cfg.maintain.writer_stale_minutes),
    ):
        return _publish(cfg, tables.connect(cfg.index.uri, s3), run_id, tag)


def _publish(cfg: AppConfig, db, run_id: str, tag: str) -> dict:
    target = run_versions(db, run_id)
    before = tables.published_run(db) if tag == tables.PUBLISHED else None
    products = db.open_table(target.products_table)
    restored = None
    if tag == cfg.index.publish_tag and products.version != target.products_version:
        # The next run of this model merges into the table's latest version: make that the
        # published run's rows (a new version, no data copied), not the rows rolled back from.
        products.restore(target.products_version)
        restored = products.version
        logger.info(
            "%s: restored version %d as %d", products.name, target.products_version, restored
        )
    tables.move_tag(products, tag, target.products_version)
    if target.rejects_version is not None:
        tables.move_tag(db.open_table(tables.REJECTS_TABLE), tag, target.rejects_version)
    tables.move_tag(db.open_table(tables.RUNS_TABLE), tag, target.runs_version)  # the switch
    run = target.run
    summary = {
        "tag": tag,
        "run_id": run["run_id"],
        "model_id": run["model_id"],
        "model_path": run["model_path"],
        "products_table": target.products_table,
        "products_version": target.products_version,
        "rejects_version": target.rejects_version,
        "runs_version": target.runs_version,
        "restored_as": restored,
        "previous": None
        if before is None
        else {k: before[k] for k in ("run_id", "model_id", "products_table", "products_version")},
        "config_model_differs": bool(
            run["model_path"] and run["model_path"] != cfg.model.name_or_path
        ),
        "config_model": cfg.model.name_or_path,
    }
    logger.info("tag %s -> run %s", tag, run["run_id"])
    return summary
