"""Move a tag to a completed run: model rollout (forward) and rollback (back), in one switch.

    python -m pipelines.publish --config FILE --to run-<id> [--tag published] [key=value ...]
    python -m pipelines.publish --config FILE --list

What a move does, in which order, and what a rollback restores: ``pipelines.indexing.publishing``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipelines.config import add_config_arguments, cli_config
from pipelines.indexing import tables
from pipelines.indexing.lease import LeaseHeldError
from pipelines.indexing.publishing import (
    PublishError,
    publish,
    recent_runs,
)
from pipelines.storage import S3Settings

logger = logging.getLogger(__name__)


def print_summary(s: dict) -> None:
    prev = s["previous"]
    was = (
        f"run {prev['run_id']} (model {prev['model_id']}, {prev['products_table']} "
        f"v{prev['products_version']})"
        if prev
        else "(not tracked for this tag)"
    )
    print(
        f"{s['tag']}: {was}\n"
        f"  -> run {s['run_id']} (model {s['model_id']}, {s['products_table']} "
        f"v{s['products_version']}; rejects v{s['rejects_version']}, runs v{s['runs_version']})\n"
        f"  search services follow at their next refresh (serve.refresh_seconds)"
    )
    if s["restored_as"] is not None:
        print(
            f"  {s['products_table']}: its rows restored as version {s['restored_as']} (the next "
            f"run of this model builds on them)"
        )
    if s["config_model_differs"]:
        print(
            f"  note: this run's checkpoint is {s['model_path']}, the config names "
            f"{s['config_model']}: the next index run publishes that model again unless "
            f"model.name_or_path is changed"
        )


def print_runs(db) -> None:
    published = tables.published_run(db)
    for r in recent_runs(db, 20):
        mark = "*" if published and r["run_id"] == published["run_id"] else " "
        print(
            f"{mark} run-{r['run_id']}  {r['finished_at']:%Y-%m-%d %H:%M:%S}  model {r['model_id']}"
            f"  {r['products_table']} v{r['products_version']}  in {r['rows_in']}"
            f" indexed {r['indexed']} rejected {r['rejected']}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.publish", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("index_uri",))
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="run-<id> (or the run id) to publish")
    target.add_argument("--list", action="store_true", help="list the newest runs (* = published)")
    parser.add_argument("--tag", default=None, help="tag to move (default: index.publish_tag)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    if args.list:
        print_runs(tables.connect(cfg.index.uri, S3Settings.from_config(cfg.s3)))
        return 0
    try:
        summary = publish(cfg, args.to, args.tag)
    except (PublishError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except LeaseHeldError as err:  # another writer is live: retry when it is done
        print(f"error: {err}", file=sys.stderr)
        return 3
    print_summary(summary)
    return 0



if __name__ == "__main__":
    sys.exit(main())
