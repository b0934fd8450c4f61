"""The fixed quality benchmark: fine-tune each setting, choose on val, report on test (Tasks A-C).

    python benchmarks/bench_quality.py [--products 2000] [--seed 0] [--steps 300]
        [--settings random,hard,family,family_swap] [--work-dir .data/quality]
        [--json docs/results/quality.json] [--results-md docs/results.md]

1. A generated catalog (``pipelines.make_catalog``: family-disjoint train / val / test) and the
   compact base model (``blip_ops.compact_model``; a [CLS]-pooling twin for that ablation).
2. Each setting fine-tunes from the base model (``pipelines.finetune`` with the setting's
   ``key=value`` overrides on ``configs/quality.yaml``); fitting and checkpoint choice read
   train and val only.
3. On val: the re-rank weight of each setting (``pipelines.quality.selection``), and the setting
   with the best text→product R@1 is ``best`` (``random``, its random-negative twin, is fixed).
4. On test, once: Task A (own titles, ITC vs ITC→ITM at k_test 4/8/16), the ITM AUCs, Task B
   (shopper queries, relevance by attributes); for ``best`` and ``random`` the real index job
   publishes a table and Task C runs the service's own search on it.
5. ``quality.json`` (every figure with its bootstrap 95% interval, the command of every row, the
   wall time) and the tables of ``docs/results.md`` between its generated-table markers.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import header, save  # noqa: E402
from benchmarks.quality_report import choose_best, plot_quality, write_results_md  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quality.yaml"
LANGS = ("en", "zh", "pinyin")
# name -> key=value overrides of configs/quality.yaml ("@x": start from base model x of
# BASE_MODELS instead of "compact"). "random" is the ablation twin.
SETTINGS: dict[str, list[str]] = {
    "random": ["finetune.negatives=random"],
    "hard": [],  # the recipe before: random batches, in-batch hard negatives
    # family batches; the fresh ITM head starts on random negatives (a curriculum: with twins
    # as its only negatives it stays at "no match" for hundreds of steps)
    "family": ["finetune.batching=family", "finetune.easy_steps=150"],
    "family_swap": ["finetune.batching=family", "finetune.easy_steps=150", "finetune.swap_negatives=true"],
    # opt-in ablations (--settings): [CLS] pooling, split learning rates
    "family_swap_cls": [
        "finetune.batching=family", "finetune.easy_steps=150", "finetune.swap_negatives=true", "@cls",
    ],
    # ALBEF's layout: ITM runs fusion layers of its own (copies of MiniLM's top 3) on the fresh rate
    "family_fusion": ["finetune.batching=family", "finetune.easy_steps=150", "@fusion"],
    "family_swap_split_lr": [
        "finetune.batching=family", "finetune.easy_steps=150", "finetune.swap_negatives=true",
        "finetune.lr=0.001", "finetune.lr_pretrained=0.0001",
    ],
}  # fmt: skip
DEFAULT_SETTINGS = ("random", "hard", "family", "family_swap")
# base model directory name -> write_compact_model arguments; "@name" in a setting picks one
BASE_MODELS: dict[str, dict] = {
    "compact": {"text_pooling": "mean"},
    "cls": {"text_pooling": "cls"},
    "fusion": {"text_pooling": "mean", "fusion_layers": 3},
}
TWIN = "random"
K_TESTS = (4, 8, 16)
logger = logging.getLogger("bench_quality")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--products", type=int, default=2000, help="catalog size (>= 2,000 for results)")
    p.add_argument("--seed", type=int, default=0, help="catalog and training seed")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per setting")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="comma-separated")
    p.add_argument("--work-dir", type=Path, default=REPO / ".data" / "quality")
    p.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "quality.json")
    p.add_argument("--results-md", type=Path, default=REPO / "docs" / "results.md")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "results" / "quality.png")
    p.add_argument("--task-c", default="best,random", help="settings that get an index + Task C")
    args = p.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or TWIN not in names or len(names) < 2:
        p.error(f"--settings must name {TWIN!r} and another of {list(SETTINGS)}; got {names}")
    args.names = names
    return args


def base_overrides(args) -> list[str]:
    w = args.work_dir.resolve()
    out = [
        f"model.name_or_path={w / 'models' / 'compact'}",
        f"source.uri={w / 'catalog' / 'products'}",
        f"finetune.catalog={w / 'catalog'}",
        f"finetune.seed={args.seed}",
        f"finetune.feature_cache={w / 'features'}",
    ]
    return out + ([f"finetune.steps={args.steps}"] if args.steps else [])


def setting_overrides(args, name: str) -> list[str]:
    w = args.work_dir.resolve()
    extra = [o for o in SETTINGS[name] if not o.startswith("@")]
    base = base_model(name)
    if base != "compact":
        extra.append(f"model.name_or_path={w / 'models' / f'compact-{base}'}")
    return [*base_overrides(args), f"finetune.out_dir={w / 'finetune' / name}", *extra]


def base_model(name: str) -> str:
    """The BASE_MODELS entry setting ``name`` starts from."""
    marks = [o[1:] for o in SETTINGS[name] if o.startswith("@")]
    return marks[0] if marks else "compact"


def load(overrides):
    from pipelines.config import load_config

    return load_config(str(CONFIG), overrides)


def prepare(args) -> dict:
    """The catalog and the base models (kept when already there for these arguments)."""
    from blip_ops.compact_model import write_compact_model
    from pipelines.runtime.inputs import ensure_catalog

    manifest, _ = ensure_catalog(args.work_dir / "catalog", args.products, args.seed)
    models = args.work_dir / "models"
    for base in dict.fromkeys(base_model(n) for n in args.names):
        out = models / ("compact" if base == "compact" else f"compact-{base}")
        if not (out / "model.safetensors").is_file():
            write_compact_model(out, seed=0, **BASE_MODELS[base])
    return manifest


def finetune(args, name: str) -> dict:
    from pipelines.training.runners import run_single

    overrides = setting_overrides(args, name)
    started = time.perf_counter()
    summary = run_single(load(overrides))
    rel = [o.replace(str(REPO) + "/", "") for o in overrides]
    return {
        "command": shlex.join(["python", "-m", "pipelines.finetune", "--config",
                               "configs/quality.yaml", *rel]),
        "overrides": SETTINGS[name],
        "model": summary["best_dir"] or summary["last_dir"],
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "train": {
            k: summary.get(k)
            for k in ("steps", "samples", "seconds", "samples_per_s", "best_mean_recall",
                      "history", "itm_accuracy_recent", "batching", "swap_negatives")
        },
    }  # fmt: skip


def evaluate_setting(args, name: str, row: dict) -> None:
    """Val: the re-rank weight. Test: Task A, ITM AUCs, Task B (in place into ``row``)."""
    from blip_ops import load_model
    from pipelines.quality.selection import sweep_itm_weight
    from pipelines.quality.tasks import itm_auc, task_a, task_b

    cfg = load(setting_overrides(args, name))
    catalog = str(cfg.finetune.catalog)
    model = load_model(row["model"], device="cpu", dtype="float32")
    k = cfg.serve.rerank_k
    row["val"] = sweep_itm_weight(model, catalog, cfg, k_test=k)
    w = row["val"]["best"]
    started = time.perf_counter()
    a = task_a(model, catalog, cfg, split="test", k_tests=K_TESTS, k_default=k, itm_weight=w)
    auc = itm_auc(model, catalog, cfg, split="test", seed=args.seed)
    b = task_b(model, catalog, cfg, split="test", k_test=k, itm_weight=w)
    row.update(k_test=k, itm_weight=w, task_a=a, task_b=b)
    row.update(
        itm_auc_sibling=auc["auc_sibling"], itm_auc_random=auc["auc_random"],
        itm_auc_sibling_by_attribute=auc["auc_sibling_by_attribute"], itm_auc=auc,
    )  # fmt: skip
    row["eval_minutes"] = round((time.perf_counter() - started) / 60, 2)


def index_and_task_c(args, name: str, row: dict) -> None:
    """The real index job publishes a table of ``row``'s model; Task C searches it."""
    from blip_ops import load_model
    from pipelines.indexing.job import run_index
    from pipelines.quality.tasks import catalog_products, catalog_queries, open_service, task_c
    from pipelines.runtime.cluster import init_ray

    uri = args.work_dir.resolve() / "lancedb" / name
    cfg = load([*setting_overrides(args, name), f"model.name_or_path={row['model']}",
                f"index.uri={uri}", f"serve.itm_weight={row['itm_weight']}"])  # fmt: skip
    init_ray(cfg)
    started = time.perf_counter()
    index = run_index(cfg)
    row["index"] = {k: index.get(k) for k in ("in", "indexed", "rejected", "products_version")}
    row["index"]["seconds"] = round(time.perf_counter() - started, 1)
    service = open_service(cfg, load_model(row["model"], device="cpu", dtype="float32"))
    catalog = str(cfg.finetune.catalog)
    modes = tuple(dict.fromkeys([("off", False), ("off", True), ("rrf", False), ("rrf", True),
                                 (cfg.serve.hybrid, True)]))  # fmt: skip
    c = task_c(
        service.snapshot, service.scorer, catalog_queries(catalog, cfg, "test"),
        catalog_products(catalog, cfg, "test"), limits=service.limits, modes=modes,
    )  # fmt: skip
    row["task_c"] = service_defaults(c, cfg.serve.hybrid)
    row["task_c_modes"] = c


JSON_NAMES = {"success@1": "success_at_1", "ndcg@10": "ndcg_at_10", "R@10": "labelled_r_at_10"}


def service_defaults(c: dict, hybrid: str) -> dict:
    """Task C at the service's defaults (its hybrid mode, re-rank on), per language:
    {lang: {"success_at_1", "ndcg_at_10", "labelled_r_at_10", "ci": {same: [lo, hi]}}}."""
    block = c["modes"][hybrid]["rerank_on"]
    out = {}
    for lang, figures in block["by_lang"].items():
        out[lang] = {JSON_NAMES[m]: figures[m]["value"] for m in JSON_NAMES}
        out[lang]["ci"] = {JSON_NAMES[m]: figures[m]["ci"] for m in JSON_NAMES}
    return out


def run(args) -> dict:
    started = time.perf_counter()
    result = header("quality", None)
    manifest = prepare(args)
    result.update(products=args.products, seed=args.seed, splits=manifest["splits"])
    rows: dict[str, dict] = {}
    for name in args.names:
        logger.info("setting %s: fine-tuning", name)
        rows[name] = finetune(args, name)
        evaluate_setting(args, name, rows[name])
        _checkpoint(args, result, rows, started)
    best = choose_best(rows, TWIN)
    result.update(best=best, random=TWIN)
    for name in dict.fromkeys(best if n == "best" else n for n in args.task_c.split(",") if n):
        if name in rows:
            index_and_task_c(args, name, rows[name])
    _checkpoint(args, result, rows, started)
    return result


def _checkpoint(args, result: dict, rows: dict, started: float) -> None:
    """Write what is measured so far (a long run that dies keeps its finished settings)."""
    result["settings"] = rows
    result["minutes"] = round((time.perf_counter() - started) / 60, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args)
    result["command"] = shlex.join(["python", "benchmarks/bench_quality.py", *(argv or sys.argv[1:])])
    save(result, args.json, plot_quality, args.plot)
    write_results_md(result, args.results_md)
    print(f"quality benchmark: {result['minutes']} min; best {result['best']}; wrote {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
