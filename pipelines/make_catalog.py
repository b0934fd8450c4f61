"""Generate the demo product catalog: bilingual noisy titles, rendered photos, near-duplicate families.

    python -m pipelines.make_catalog --out DIR|s3://bucket/prefix --products N --seed S
        [--image-mode inline|files] [--rows-per-file R] [--workers W] [--overwrite]
        [--contact-sheet PNG] [--config FILE] [key=value ...]

Writes, deterministically for a seed, the catalog that ``pipelines.catalog.writer`` describes:
``OUT/products/`` (the catalog contract), ``pairs.parquet``, ``queries.parquet``, the resolved
config and, last, ``manifest.json``; splits are by family (train / val / test, 70 / 10 / 20).
Point ``source.uri`` at ``OUT/products``. S3 endpoint/region come from ``s3.*`` config keys or the
AWS chain, credentials from the AWS chain only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pipelines.catalog.plan import plan_catalog
from pipelines.catalog.writer import make_catalog
from pipelines.storage import S3Settings, is_s3, join


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.config import add_config_arguments, cli_config, dump_config

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.make_catalog", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--products", type=int, required=True, help="number of products")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same catalog")
    parser.add_argument(
        "--image-mode",
        choices=("inline", "files"),
        default="inline",
        help="images inside the Parquet rows (image) or as files referenced by image_uri",
    )
    parser.add_argument("--rows-per-file", type=int, default=1000, help="products per Parquet file")
    parser.add_argument(
        "--workers", type=int, default=None, help="render processes (default: all cores)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing catalog at --out"
    )
    parser.add_argument(
        "--contact-sheet", metavar="PNG", help="also write a contact sheet of sample products"
    )
    add_config_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    if args.products < 1 or args.rows_per_file < 1:
        print(
            f"error: --products and --rows-per-file must be at least 1, got {args.products} and "
            f"{args.rows_per_file}",
            file=sys.stderr,
        )
        return 2
    try:
        manifest = make_catalog(
            args.out,
            args.products,
            args.seed,
            image_mode=args.image_mode,
            rows_per_file=args.rows_per_file,
            workers=args.workers,
            s3=S3Settings.from_config(cfg.s3),
            overwrite=args.overwrite,
            resolved_config=dump_config(cfg),
        )
    except (FileExistsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    secs = manifest["seconds"]
    where = args.out if is_s3(args.out) else os.path.abspath(args.out)
    print(
        f"catalog: {manifest['products']} products in {manifest['families']} families, "
        f"{len(manifest['files'])} Parquet files, {manifest['image_bytes'] / 1e6:.1f} MB of images ({args.image_mode})\n"
        f"  splits {manifest['splits']}, title languages {manifest['title_langs']}\n"
        f"  formats {manifest['image_formats']}, families vary in {manifest['differs_by']}\n"
        f"  {manifest['queries']} held-out queries; plan {secs['plan']}s, render+write {secs['render_and_write']}s "
        f"({manifest['products'] / max(secs['render_and_write'], 1e-9):.0f} products/s on {manifest['workers']} workers), "
        f"total {secs['total']}s\n  written to {where} (source.uri = {join(where, 'products')})"
    )
    if args.contact_sheet:
        from pipelines.catalog.contact_sheet import write_contact_sheet

        write_contact_sheet(plan_catalog(args.products, args.seed), args.contact_sheet)
        print(f"  contact sheet: {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
