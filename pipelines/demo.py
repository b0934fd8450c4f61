"""`make demo`: the whole path on one screen, offline.

    python -m pipelines.demo --config configs/local.yaml [--products N] [key=value ...] [--model PATH]

Builds the tiny offline BLIP when the configured one is the local default and absent, generates the
demo catalog (``pipelines.make_catalog``) beside ``source.uri`` when it is missing, decodes the
held-out (`test`) products' photos with the safe decoder, encodes photos and queries through
``blip_ops``, and prints, for sample shopper queries in English, 汉字 and pinyin, the brute-force
ITC ranking re-ranked by ITM, plus recall@k of every held-out query. Later issues grow this into
catalog → index job → search service.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipelines.config import (
    DEFAULT_DATA_DIR,
    AppConfig,
    add_config_arguments,
    cli_config,
    write_resolved_config,
)

logger = logging.getLogger(__name__)

DEMO_PRODUCTS = 240
DEMO_SEED = 0
SAMPLE_PRODUCTS = 2  # held-out products whose queries are printed in full
RECALL_AT = (1, 5, 10)


def ensure_model(cfg: AppConfig) -> str:
    """The configured model; builds the tiny one when it is the local default and missing."""
    ref = cfg.model.name_or_path
    path = Path(ref)
    if path.is_absolute() and not path.exists() and DEFAULT_DATA_DIR / "models" in path.parents:
        from blip_ops.tiny_model import write_tiny_model

        print(f"building the tiny offline BLIP at {path} ...")
        write_tiny_model(path)
    return ref


def ensure_catalog(cfg: AppConfig, n_products: int, seed: int = DEMO_SEED) -> Path:
    """The demo catalog root (the parent of ``source.uri``), generated when absent or different."""
    from pipelines.make_catalog import make_catalog, read_manifest

    source = Path(cfg.source.uri)
    if source.name != "products" or "://" in cfg.source.uri:
        raise ValueError(
            f"the demo generates its catalog beside a local source.uri ending in /products, got {cfg.source.uri!r}"
        )
    root = source.parent
    manifest = read_manifest(str(root))
    if manifest is None or (manifest["products"], manifest["seed"]) != (n_products, seed):
        print(f"generating the demo catalog ({n_products} products, seed {seed}) at {root} ...")
        manifest = make_catalog(str(root), n_products, seed, overwrite=True)
        print(
            f"  done in {manifest['seconds']['total']}s: {manifest['splits']}, title languages {manifest['title_langs']}"
        )
    return root


def run_demo(cfg: AppConfig, n_products: int = DEMO_PRODUCTS, out_dir: Path | None = None) -> dict:
    from blip_ops import decode_batch, load_model, rerank

    started = time.perf_counter()
    model = load_model(
        ensure_model(cfg),
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        attention=cfg.model.attention,
    )
    root = ensure_catalog(cfg, n_products)
    table = pads.dataset(str(root / "products"), format="parquet").to_table(
        filter=pads.field("split") == "test"
    )
    rows = sorted(table.to_pylist(), key=lambda r: r["product_id"])
    decoded = decode_batch(
        [r["image"] for r in rows],
        target_size=model.image_settings.size,
        max_bytes=cfg.source.max_image_bytes,
        device=str(model.device),
    )
    failed = [
        (r["product_id"], e.reason)
        for r, e in zip(rows, decoded.errors, strict=True)
        if e is not None
    ]
    if failed:
        raise RuntimeError(f"demo images failed to decode: {failed}")
    pixels = model.preprocess(decoded.images)
    image_emb = model.encode_images(pixels).embeddings.numpy()  # (P, D)
    index_of = {r["product_id"]: i for i, r in enumerate(rows)}
    queries = pq.read_table(root / "queries.parquet").to_pylist()
    query_emb = model.encode_texts([q["query"] for q in queries]).numpy()  # (Q, D)
    sims = query_emb @ image_emb.T  # (Q, P): brute force, exact cosine against every product
    k = min(cfg.serve.k, len(rows), 5)
    rerank_k = min(cfg.serve.rerank_k, len(rows))

    # recall@k of ITC alone, per query language, over every held-out query.
    target = np.array([index_of[q["product_id"]] for q in queries])
    rank_of_target = (sims > sims[np.arange(len(queries)), target][:, None]).sum(
        axis=1
    )  # 0 = first
    recall = {}
    for lang in ("en", "zh", "pinyin"):
        mask = np.array([q["lang"] == lang for q in queries])
        recall[lang] = {
            f"R@{r}": round(float((rank_of_target[mask] < r).mean()), 3) for r in RECALL_AT
        }

    samples = sorted({q["product_id"] for q in queries})[:SAMPLE_PRODUCTS]
    shown = []
    for qi, q in enumerate(queries):
        if q["product_id"] not in samples:
            continue
        ann = np.argsort(-sims[qi], kind="stable")
        ranked = rerank(model, q["query"], sims[qi][ann], images=pixels[ann], rerank_k=rerank_k)
        order = [int(ann[i]) for i in ranked.order]
        shown.append(
            {
                "lang": q["lang"],
                "query": q["query"],
                "normalised": model.normalize_text(q["query"]),
                "expected": q["product_id"],
                "expected_rank": order.index(index_of[q["product_id"]]) + 1,
                "results": [
                    {
                        "rank": r + 1,
                        "product_id": rows[i]["product_id"],
                        "title": rows[i]["title"],
                        "itc_score": round(float(ranked.itc[r]), 4),
                        "itm_score": None
                        if np.isnan(ranked.itm[r])
                        else round(float(ranked.itm[r]), 4),
                        "score": round(float(ranked.score[r]), 4),
                    }
                    for r, i in enumerate(order[:k])
                ],
            }
        )
    summary = {
        "model": cfg.model.name_or_path,
        "model_id": model.model_id,
        "catalog": str(root),
        "products_searched": len(rows),
        "queries": len(queries),
        "recall_itc": recall,
        "chance_R@5": round(min(5, len(rows)) / len(rows), 3),
        "samples": shown,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "demo_results.json").write_text(
            json.dumps(summary, indent=2, ensure_ascii=False)
        )
        write_resolved_config(cfg, out_dir)
    return summary


def print_summary(summary: dict, out_dir: Path | None) -> None:
    print(f"\nmodel {summary['model']} ({summary['model_id']})")
    print(
        f"catalog {summary['catalog']}: searching the {summary['products_searched']} held-out products"
    )
    for q in summary["samples"]:
        print(
            f"\nquery [{q['lang']}] {q['query']!r} -> normalised {q['normalised']!r}; "
            f"expected {q['expected']} at rank {q['expected_rank']}"
        )
        print(f"  {'#':>2}  {'product':<9} {'itc':>7} {'itm':>7} {'score':>7}  title")
        for r in q["results"]:
            itm = "-" if r["itm_score"] is None else f"{r['itm_score']:7.3f}"
            mark = "*" if r["product_id"] == q["expected"] else " "
            print(
                f" {mark}{r['rank']:>2}  {r['product_id']:<9} {r['itc_score']:7.3f} {itm:>7} {r['score']:7.3f}  {r['title']}"
            )
    print(
        f"\nrecall of ITC over all {summary['queries']} held-out queries (chance R@5 = {summary['chance_R@5']}):"
    )
    for lang, rec in summary["recall_itc"].items():
        print(f"  {lang:<7} " + "  ".join(f"{name} {value:.3f}" for name, value in rec.items()))
    print(
        f"\ndone in {summary['seconds']}s"
        + (f"; results and resolved config in {out_dir}" if out_dir else "")
    )
    if "tiny" in summary["model"]:
        print(
            "note: the tiny model has random weights, so these rankings show the mechanics, not quality."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--products", type=int, default=DEMO_PRODUCTS, help="size of the demo catalog"
    )
    add_config_arguments(parser, ("model",))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    from blip_ops.hub import ModelUnavailableError

    out_dir = Path(cfg.output.dir) / "demo" if cfg.output.dir else None
    try:
        summary = run_demo(cfg, args.products, out_dir)
    except (ModelUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
