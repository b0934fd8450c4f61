"""The nightly index job: catalog Parquet (folder or S3) → Ray Data → BLIP on an actor pool → LanceDB.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/index_catalog.py --config "$PWD/configs/local.yaml"
    python -m pipelines.index_catalog --config FILE [key=value ...] [--source …] [--index-uri …] [--model …]

What a run does, and what it guarantees (every input row indexed, unchanged or rejected; readers
see the new version only once the ``published`` tag moves): ``pipelines.indexing.job``.
Exit codes: 0 published, 1 storage failed past its retries (nothing published), 2 bad input or
configuration, 3 another writer holds the index's lease, 4 held back by the publish guard: more
than ``index.max_reject_fraction`` (0.5) of the input rows rejected, or none accepted; its rejects
and runs rows are committed (the counts by reason are printed), ``published`` did not move, and
the rerun reuses its encoded rows. ``index.max_reject_fraction=1.0`` publishes such a run anyway,
except one that accepted no row: an empty index is never published.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/index_catalog.py` (ray job submit) as well as -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import add_config_arguments, cli_config
from pipelines.indexing.job import run_index
from pipelines.indexing.lease import LeaseHeldError
from pipelines.indexing.publishing import RunHeldBack

logger = logging.getLogger(__name__)


def _outcome(s: dict) -> str:
    if s.get("held_reason"):
        return f"NOT published, held back by the publish guard: {s['held_reason']}"
    return (
        f"table {s['products_table']} ({s['products_rows']} rows, ANN "
        f"{s['ann_index'] or 'none: exact search'}) published at version {s['products_version']}"
    )


def print_summary(s: dict) -> None:
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "none"
    print(
        f"run {s['run_id']}  model {s['model_id']}\n"
        f"  rows in {s['in']}: indexed {s['indexed']} (encoded now {s['encoded_this_run']}, "
        f"resumed {s['resumed_from_staging']}), unchanged {s['unchanged']}, rejected {s['rejected']}, "
        f"deleted {s['deleted']}\n"
        f"  rejected by reason: {by_reason}\n"
        f"  {s['seconds']}s, {s['images_per_s']} images/s (steady, model loaded: "
        f"{s['steady_images_per_s'] or 'n/a'})\n"
        f"  {_outcome(s)}\n"
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
    except RunHeldBack as held:  # the rows are counted and the rejects kept: print them
        print_summary(held.summary)
        print(
            f"error: run {held.summary['run_id']} held back: {held}; `{cfg.index.publish_tag}` "
            f"was not moved. Its rejects are in the `rejects` table (run_id "
            f"{held.summary['run_id']}); to publish such a run anyway: index.max_reject_fraction=1.0",
            file=sys.stderr,
        )
        return 4
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
        from pipelines.indexing.maintenance import format_summary

        done = summary["maintenance"]
        failed = f"  maintenance FAILED: {done.get('error')}"
        print(format_summary(done) if "error" not in done else failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
