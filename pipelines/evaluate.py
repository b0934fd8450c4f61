"""Retrieval evaluation: Recall@1/5/10 both ways, ITC alone and ITC→ITM over the top k_test.

    python -m pipelines.evaluate --config FILE [key=value ...] [--model PATH] --out results.json
        [--catalog DIR | --karpathy ANNOTATION.json --images DIR] [--k-test 16 32 ...]
        [--split test] [--texts queries|titles] [--batch-size N] [--token-cache-mb MB]

Inputs:
- ``--catalog DIR`` (default: ``source.uri``, or the folder above it when it is a demo catalog's
  ``products/``): any catalog the index job reads, local or ``s3://`` (Parquet files with a product
  id, titles, and the image inline or by ``image_uri``), or the folder ``pipelines.make_catalog``
  writes. The products of ``--split`` (``test``: never trained on) are the pool: the
  ``source.split_column`` says each product's split, or a hash of ``source.split_by`` when the
  files have no such column. The texts are the held-out queries (``source.queries``, or the
  folder's ``queries.parquet``: shopper queries in English, 汉字, pinyin), so the figures come per
  query language too; a catalog without a queries file is ranked by its titles.
  ``--texts titles`` uses the products' own titles (``source.title_columns``, one text per column)
  instead; with ``--split train`` that measures how well a fine-tuned model fits what it was
  trained on.
- ``--karpathy ANNOTATION.json --images DIR``: the Karpathy-split test/val annotation BLIP and
  ALBEF publish for COCO and Flickr30K (a JSON list of ``{"image": "relative/path.jpg",
  "caption": [...]}``), images under DIR. Captions get BLIP's ``pre_caption`` (lowercase, its
  punctuation stripped, 30 words) and images are decoded at full size, as BLIP's evaluation does,
  so real checkpoints reproduce the paper's tables (BLIP uses k_test 256 on COCO, 128 on Flickr).

Outputs: ``--out`` (JSON: every figure, model_id, inputs, k_test), ``<stem>.md`` (tables) and
``<stem>_recall_vs_k_test.png`` beside it, plus ``<stem>.config.resolved.yaml``. The re-rank is
``blip_ops.rerank.combine_scores``, the search service's rule.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipelines.config import add_config_arguments, cli_config
from pipelines.evaluation.catalog import TEXT_SOURCES
from pipelines.evaluation.report import fmt, method_rows, table_cells
from pipelines.evaluation.run import DEFAULT_K_TEST, run_evaluation


def print_summary(results: dict) -> None:
    m = results["metrics"]
    inputs = results["inputs"]
    where = (
        f"catalog {inputs['catalog']} (split {inputs['split']})"
        if inputs["kind"] == "catalog"
        else f"Karpathy annotation {inputs['annotation']}"
    )
    print(f"\nmodel {results['model']} ({results['model_id']})")
    print(f"{where}: {m['counts']['products']} products, {m['counts']['texts']} texts")
    names = list(m["itc"]["text_to_product"])
    print(f"\n{'recall %':<22}" + f"{'text→product':^21}" + f"{'product→text':^21}")
    print(f"{'method':<22}" + "".join(f"{n:>7}" for n in names * 2) + f"{'mean':>7}")
    for name, fig in method_rows(m):
        print(f"{name:<22}" + "".join(f"{c:>7}" for c in table_cells(fig)))
    if m.get("by_lang"):
        k = str(max(m["k_test"])) if m.get("k_test") else None
        print(
            f"\nper query language (ITC{f' | ITC→ITM k_test={k}' if k else ''}), text→product R@1/5/10:"
        )
        for lang, block in m["by_lang"].items():
            line = "/".join(fmt(v) for v in block["itc"]["text_to_product"].values())
            if k:
                line += "  |  " + "/".join(
                    fmt(v) for v in block["itm"][k]["text_to_product"].values()
                )
            print(f"  {lang:<8}{block['counts']['texts']:>5} texts  {line}")
    s = m["seconds"]
    print(
        f"\n{m['itm_pairs']} ITM pairs; {s['total']:.1f}s (images {s['embed_images']:.1f}s, "
        f"texts {s['embed_texts']:.1f}s, rank + re-rank {s['rank']:.1f}s)"
    )
    print("wrote " + ", ".join(results["outputs"].values()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="results JSON (md and png beside it)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--catalog",
        help="catalog folder or s3:// prefix (default: source.uri, or the demo catalog above it)",
    )
    source.add_argument("--karpathy", metavar="ANNOTATION.json", help="Karpathy-split annotation")
    parser.add_argument("--images", help="image folder of --karpathy")
    parser.add_argument(
        "--k-test", type=int, nargs="+", default=list(DEFAULT_K_TEST),
        help="ITC→ITM re-rank depths (BLIP: 256 COCO, 128 Flickr30K); clipped to the pool size",
    )  # fmt: skip
    parser.add_argument("--split", default="test", help="catalog split whose products are the pool")
    parser.add_argument(
        "--texts", choices=TEXT_SOURCES, default="queries",
        help="catalog texts: held-out queries (titles when the catalog has none), or the "
        "products' own titles (source.title_columns)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=None, help="default: encode.batch_size")
    parser.add_argument(
        "--token-cache-mb", type=float, default=2048,
        help="ITM image tokens kept between queries (evicted ones are recomputed)",
    )  # fmt: skip
    add_config_arguments(parser, ("model",))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("blip_ops.evaluate").setLevel(logging.INFO)
    if any(k < 1 for k in args.k_test):
        print(f"error: --k-test values must be >= 1, got {args.k_test}", file=sys.stderr)
        return 2
    if args.images and not args.karpathy:
        print("error: --images goes with --karpathy", file=sys.stderr)
        return 2
    cfg = cli_config(args)
    if cfg is None:
        return 2
    from blip_ops.hub import ModelUnavailableError

    try:
        results = run_evaluation(
            cfg, args.out.expanduser().absolute(), catalog=args.catalog, karpathy=args.karpathy,
            images_dir=args.images, k_test=args.k_test, split=args.split, texts=args.texts,
            batch_size=args.batch_size, token_cache_mb=args.token_cache_mb,
        )  # fmt: skip
    except (ModelUnavailableError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
