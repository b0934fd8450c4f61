"""Table maintenance: drop old run tags, compact fragments, merge index deltas, delete old versions.

    python -m pipelines.maintain --config configs/local.yaml [key=value ...] [--index-uri …]

The steps (tags, index deltas, compaction, cleanup) and what they never touch are described in
``pipelines.indexing.maintenance``. Exit codes: 0 done, 1 a table failed, 2 bad configuration,
3 another writer holds the index's lease.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/maintain.py` as well as -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import add_config_arguments, cli_config
from pipelines.indexing.lease import LeaseHeldError, LeaseLostError
from pipelines.indexing.maintenance import (
    EXIT_LEASE_HELD,
    format_summary,
    run_maintenance,
)

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.maintain", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("index_uri",))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    try:
        summary = run_maintenance(cfg)
    except (LeaseHeldError, LeaseLostError) as err:  # another writer: not a configuration error
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LEASE_HELD
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
