"""A fine-tune that is skipped when its result is already there: the same catalog, base model and
settings give the same model, so ``make demo`` trains once and reuses ``out_dir/best`` after."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from pipelines.config import AppConfig
from pipelines.runtime.inputs import ensure_model

logger = logging.getLogger(__name__)

CACHE_FILE = "demo_cache.json"


def cache_key(cfg: AppConfig, catalog: Path, base_model_id: str) -> dict:
    manifest = json.loads((catalog / "manifest.json").read_text(encoding="utf-8"))
    settings = cfg.finetune.model_dump(mode="json", exclude={"out_dir", "resume", "log_every"})
    settings["catalog"] = None  # the manifest below names the catalog's content
    return {
        "catalog": {k: manifest.get(k) for k in ("products", "seed", "generator_version")},
        "base_model_id": base_model_id,
        "finetune": settings,
    }


def finetuned_model(cfg: AppConfig, catalog: Path) -> tuple[str, dict]:
    """Fine-tune ``model.name_or_path`` on the train split unless a matching result is cached;
    returns (the model to index and serve, what happened)."""
    from blip_ops import load_model
    from pipelines.training.runners import run_finetune

    base = load_model(ensure_model(cfg.model.name_or_path), device="cpu", dtype="float32")
    f = cfg.finetune
    out = Path(f.out_dir)
    key = cache_key(cfg, catalog, base.model_id)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = out / CACHE_FILE
    best = out / "best"
    if (best / "blip_catalog.json").is_file() and cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("digest") == digest:
            print(f"fine-tuned model {best} (cached: same catalog, base model and settings)")
            return str(best), {"cached": True, **cached}
    print(
        f"fine-tuning {cfg.model.name_or_path} on the train split: {f.steps} steps of "
        f"{f.batch_size} products (negatives: {f.negatives}) ...",
        flush=True,
    )
    del base
    if out.exists():  # settings changed: start over, never resume another run's state
        shutil.rmtree(out)
    summary = run_finetune(cfg)
    info = {
        "digest": digest,
        "key": key,
        "best_mean_recall": summary.get("best_mean_recall"),
        "samples_per_s": summary.get("samples_per_s"),
        "model_id": summary.get("model_id"),
    }
    if not (best / "blip_catalog.json").is_file():
        raise RuntimeError(f"fine-tuning wrote no best checkpoint in {out}")
    cache.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return str(best), {"cached": False, **info}
