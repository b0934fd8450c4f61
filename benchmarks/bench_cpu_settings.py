"""CPU inference settings of the text side, float32 vs dynamic int8 (``model.cpu_quantize``) vs
bfloat16 matrix products (``model.cpu_bf16``): speed and what each costs in recall.

    python benchmarks/bench_cpu_settings.py --model CHECKPOINT [--runs 50] [--threads 1 2] \
        [--variants int8 bf16] [--config configs/quality.yaml --catalog DIR --split val \
        [key=value ...]] [--json FILE]

Speed, per torch thread count (``pipelines.runtime.threads.configure_torch_threads``): ms p50 /
p90 of encoding one query (``encode_texts``, batch 1), of the ITM scores of one query against
16 cached image tokens (``itm_scores``, the re-rank's call) and of 8 queries' ITM at once (what
``@serve.batch`` runs under 8 clients), every variant's runs interleaved so that load from other
processes hits them alike. The tokens come from random pixels: the cost of ITM does not depend on
what the image shows.

Quality, with ``--catalog``: the split's products rank the products' own titles (Task A's texts)
and the shopper queries (Task B's), ITC and ITC→ITM at k_test 16, text→product R@1 of the float
model and of each variant, and the variant-minus-float difference with a paired bootstrap 95%
interval over the same texts. Tune on ``val``; ``test`` is for reporting only. The image side is
float in every variant (the index's embeddings), so the figures say whether the variant's queries
still find float-encoded products.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.config import add_config_arguments, cli_config  # noqa: E402

ITM_PAIRS = 16  # the re-rank's candidates per query in the quality config (serve.rerank_k)
BATCHED_QUERIES = 8  # queries in one batched ITM call: 8 clients' re-ranks gathered by serve.batch
# load_model's arguments of each variant; "float32" is the reference every variant is compared to.
VARIANTS = {"int8": {"cpu_quantize": True}, "bf16": {"cpu_bf16": True}}
K_TEST = 16
WARMUP = 5
# Shopper-style queries for the speed runs when no catalog is given (the three languages).
DEFAULT_QUERIES = (
    "red cotton sofa", "wooden dining chair with arms", "蓝色 羊毛 毛衣", "lan se mao yi",
    "black leather handbag", "striped linen shirt", "不锈钢 水壶", "bu xiu gang shui hu",
)  # fmt: skip


# ---- speed -----------------------------------------------------------------------------------
def percentiles(ms: Sequence[float]) -> dict:
    values = sorted(ms)
    p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
    return {"p50": round(statistics.median(values), 3), "p90": round(p90, 3), "n": len(values)}


def time_interleaved(
    calls: dict[str, Callable[[int], object]], runs: int, warmup: int = WARMUP
) -> dict[str, dict]:
    """{name: percentiles (ms)} of ``calls[name](i)`` for i in range(runs), the calls taking turns
    on each i so that a busy moment of the machine costs every variant alike."""
    for i in range(warmup):
        for call in calls.values():
            call(i)
    ms: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            call(i)
            ms[name].append((time.perf_counter() - started) * 1000)
    return {name: percentiles(values) for name, values in ms.items()}


def speed(models: dict, queries: Sequence[str], threads: int, runs: int) -> dict:
    """Text encode (batch 1) and ITM of one query vs :data:`ITM_PAIRS` cached tokens, per model."""
    from pipelines.runtime.threads import configure_torch_threads

    configure_torch_threads(threads)
    first = next(iter(models.values()))
    size = first.image_settings.size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(ITM_PAIRS, 3, size, size, generator=generator)
    pixels = (pixels - 0.5) / 0.25  # roughly the range of normalised pixels
    tokens = first.encode_images(pixels, return_tokens=True).tokens  # cached, as the service does

    def text_call(model):
        return lambda i: model.encode_texts([queries[i % len(queries)]])

    def itm_call(model):
        return lambda i: model.itm_scores(queries[i % len(queries)], tokens)

    batch_tokens = tokens.repeat(BATCHED_QUERIES, 1, 1)
    batch_texts = [
        queries[j % len(queries)] for j in range(BATCHED_QUERIES) for _ in range(ITM_PAIRS)
    ]

    def batched_call(model):
        return lambda i: model.itm_scores(batch_texts, batch_tokens)

    # {name: (call maker, timed runs)}: a batched call is 8x the work, so a quarter of the runs.
    calls = {
        "text_encode_1": (text_call, runs),
        f"itm_{ITM_PAIRS}_pairs": (itm_call, runs),
        f"itm_{BATCHED_QUERIES}x{ITM_PAIRS}_pairs": (batched_call, max(3, runs // 4)),
    }
    out: dict = {"threads": threads}
    for name, (make, n) in calls.items():
        out[name] = time_interleaved({v: make(m) for v, m in models.items()}, n)
    return out


# ---- quality ----------------------------------------------------------------------------------
def own_product_rank(top: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(T,) 0-based rank of each text's own product in its ranked list ``top`` (T, depth); the
    depth where it is not in the list."""
    found = top == own[:, None]  # (T, depth)
    return np.where(found.any(axis=1), found.argmax(axis=1), top.shape[1])


def text_to_product_ranks(model, texts, own, image_emb, cache) -> dict[str, np.ndarray]:
    """{"itc" | "itm": (T,) ranks of each text's own product}: cosine order, and cosine + ITM
    logit over the first :data:`K_TEST` (the service's rule, ``rerank_top``)."""
    from blip_ops.evaluate import embed_texts
    from pipelines.quality.common import DEPTH
    from pipelines.quality.task_b import rerank_top

    sims = embed_texts(model, texts) @ image_emb.T  # (T, P) cosines
    top_itc = np.argsort(-sims, axis=1, kind="stable")[:, :DEPTH]
    top_itm = rerank_top(model, texts, sims, cache, k_test=K_TEST)
    return {"itc": own_product_rank(top_itc, own), "itm": own_product_rank(top_itm, own)}


def compare_recall(float_ranks: dict, quant_ranks: dict, groups: dict, n_boot: int = 1000) -> dict:
    """{group: {"itc" | "itm": {"float", "variant", "delta" (paired summary), "texts"}}}: R@1
    over the texts of each group (``groups``: {name: (T,) bool mask})."""
    from blip_ops.metrics import hits_at_k, paired_summary

    out: dict = {}
    for group, mask in groups.items():
        out[group] = {}
        for method, ranks in float_ranks.items():
            a = hits_at_k(ranks[mask], 1)
            b = hits_at_k(quant_ranks[method][mask], 1)
            out[group][method] = {
                "float": round(float(a.mean()), 4),
                "variant": round(float(b.mean()), 4),
                "delta": paired_summary(a, b, n_boot=n_boot),
                "texts": len(a),
            }
    return out


def quality(models: dict, cfg, catalog: str, split: str) -> dict:
    """R@1 text→product on the split's titles and its shopper queries, float vs each variant.

    Image embeddings and ITM tokens are computed once, by the float model: every variant's vision
    tower is the same float tower (checked on the first images), as in the service, whose image
    side comes from the index job."""
    from blip_ops.evaluate import ImageTokenCache, embed_images
    from pipelines.evaluation.catalog import load_catalog
    from pipelines.quality.common import TOKEN_CACHE_BYTES

    ref = models["float32"]
    size = ref.image_settings.size
    by_texts = {
        t: load_catalog(catalog, split, cfg, target_size=size, texts=t)
        for t in ("titles", "queries")
    }
    images = by_texts["titles"].images
    sample = [images[i] for i in range(min(4, len(images)))]
    for name, model in models.items():
        if not torch.equal(
            ref.encode_images(sample).embeddings, model.encode_images(sample).embeddings
        ):
            raise RuntimeError(f"the {name} model's image embeddings differ from the float model's")
    cache = ImageTokenCache(ref, images, max_bytes=TOKEN_CACHE_BYTES)
    image_emb = embed_images(ref, images, token_cache=cache)  # (P, D)
    out = {}
    for name, data in by_texts.items():
        if data.product_ids != by_texts["titles"].product_ids:
            raise RuntimeError(f"{name}: the split's products differ from the titles' run")
        started = time.perf_counter()
        own = np.asarray(data.text_product)
        ranks = {
            n: text_to_product_ranks(m, data.texts, own, image_emb, cache)
            for n, m in models.items()
        }
        langs = np.asarray(data.languages, dtype=object)
        groups = {"overall": np.ones(len(own), bool)}
        groups.update({str(lang): langs == lang for lang in dict.fromkeys(data.languages)})
        out[name] = {
            "products": len(data.product_ids),
            "recall_at_1": {
                v: compare_recall(ranks["float32"], ranks[v], groups)
                for v in models
                if v != "float32"
            },
            "seconds": round(time.perf_counter() - started, 1),
        }
    return out


# ---- report ----------------------------------------------------------------------------------
def format_speed(rows: list[dict]) -> list[str]:
    lines = [
        "| threads | call | variant | p50 ms | float32 p50 ms | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for call, by_variant in row.items():
            if call == "threads":
                continue
            f = by_variant["float32"]["p50"]
            for variant, r in by_variant.items():
                q = r["p50"]
                lines.append(
                    f"| {row['threads']} | {call} | {variant} | {q:.2f} | {f:.2f} | {f / q:.2f}x |"
                )
    return lines


def format_quality(figures: dict) -> list[str]:
    lines = [
        "| texts | variant | group | method | n | float R@1 | variant R@1 | delta (pts) | 95% CI (pts) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for texts, block in figures.items():
        for variant, by_group in block["recall_at_1"].items():
            for group, by_method in by_group.items():
                for method, r in by_method.items():
                    d = r["delta"]
                    lo, hi = (100 * x for x in d["ci"])
                    lines.append(
                        f"| {texts} | {variant} | {group} | {method} | {r['texts']} | "
                        f"{100 * r['float']:.1f} | {100 * r['variant']:.1f} | "
                        f"{100 * d['value']:+.1f} | [{lo:+.1f}, {hi:+.1f}] |"
                    )
    return lines


def catalog_identity(root: str) -> dict | None:
    """What regenerates a generated catalog (products, seed, generator version); None for another
    catalog."""
    from pipelines.catalog.writer import read_manifest

    manifest = read_manifest(root) or {}
    keys = ("products", "seed", "generator_version")
    return {k: manifest[k] for k in keys} if all(k in manifest for k in keys) else None


def load_variants(path: str, variants: Sequence[str]) -> dict:
    """{"float32": model, variant: the same checkpoint with the variant's settings} on the CPU."""
    from blip_ops import load_model
    from blip_ops.quantize import quantization_of

    models = {"float32": load_model(path, device="cpu", dtype="float32")}
    for name in variants:
        models[name] = load_model(path, device="cpu", dtype="float32", **VARIANTS[name])
        if quantization_of(models[name]) == "none":
            raise RuntimeError(f"{name}: load_model left the model float32 ({VARIANTS[name]})")
    ids = {m.model_id for m in models.values()}
    if len(ids) != 1:
        raise RuntimeError(f"a CPU setting changed the model_id: {sorted(ids)}")
    return models


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, ("model",))
    parser.add_argument("--runs", type=int, default=50, help="timed calls per figure")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=sorted(VARIANTS),
        help="settings compared with float32",
    )
    parser.add_argument("--catalog", default=None, help="catalog folder: also measure recall")
    parser.add_argument("--split", default="val", help="catalog split (tune on val, never test)")
    parser.add_argument("--skip-speed", action="store_true", help="only the recall figures")
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_intermixed_args(argv)
    if args.runs < 1 or any(t < 1 for t in args.threads):
        parser.error(f"--runs and --threads must be >= 1, got {args.runs} and {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    models = load_variants(cfg.model.name_or_path, args.variants)
    first = models["float32"]
    results: dict = {
        "model": cfg.model.name_or_path, "model_id": first.model_id,
        "torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine,
    }  # fmt: skip
    if not args.skip_speed:
        queries = list(DEFAULT_QUERIES)
        results["speed"] = [speed(models, queries, t, args.runs) for t in args.threads]
        print("\n".join(format_speed(results["speed"])), flush=True)
    if args.catalog:
        results["quality"] = quality(models, cfg, args.catalog, args.split)
        results["split"] = args.split
        results["catalog"] = catalog_identity(args.catalog)
        print("\n".join(format_quality(results["quality"])), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
