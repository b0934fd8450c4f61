"""Hard negatives mined from the published index: each train product's nearest other train products.

    python -m pipelines.mine_negatives --config FILE [key=value ...] [--index-uri URI]
        [--per-product N] [--out negatives.parquet]

Reads the products table at the version the ``published`` tag points to (never "the latest"),
keeps its ``train`` rows (a table without a ``split`` column is refused) and, for each, finds the
``mine.per_product`` other train products whose stored ITC image embeddings are closest by exact
cosine (:mod:`pipelines.training.mining`). Test products are never candidates.

Output (``mine.out``, default ``<index.uri>/_negatives/negatives-<model_id>-v<version>.parquet``,
local or ``s3://``): one row per train product, ``product_id``, ``negative_ids`` (nearest first)
and ``similarities``, with the provenance in the Parquet file metadata and the resolved config
beside it (:mod:`pipelines.training.mined`). ``pipelines.finetune`` reads it through
``finetune.mined_negatives``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipelines.config import ConfigError, add_config_arguments, load_config
from pipelines.training import mining


def print_summary(s: dict) -> None:
    near = f"{s['nearest_mean']:.4f}" if s["nearest_mean"] is not None else "-"
    far = f"{s['farthest_mean']:.4f}" if s["farthest_mean"] is not None else "-"
    print("\nmined hard negatives")
    print(f"  table        {s['products_table']} version {s['table_version']} (run {s['run_id']})")
    print(f"  model        {s['model_id']}")
    print(
        f"  products     {s['train_products']} of split {s['split']!r} "
        f"({s['table_rows'] - s['train_products']} other rows never used)"
    )
    print(
        f"  per product  {s['per_product_written']} (asked {s['per_product']}; exact cosine of the "
        f"stored ITC image embeddings), {s['neighbours']} pairs"
    )
    print(f"  cosine       nearest mean {near}, last kept mean {far}")
    print(
        f"  time         {s['seconds']}s (read {s['read_seconds']}s, search {s['search_seconds']}s)"
    )
    print(f"  out          {s['out']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.mine_negatives", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("index_uri",))
    parser.add_argument("--per-product", type=int, default=None, help="alias of mine.per_product")
    parser.add_argument("--out", default=None, help="alias of mine.out (local path or s3://)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mining.logger.setLevel(logging.INFO)  # the neighbour search reports its progress
    try:
        cfg = load_config(
            args.config,
            args.overrides,
            {
                "index_uri": args.index_uri,
                "mine.per_product": args.per_product,
                "mine.out": args.out,
            },
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = mining.mine(cfg)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
