"""Train-step speed of a fine-tune, word embeddings trained vs fixed, arms interleaved.

    python benchmarks/bench_train_step.py --config configs/quality.yaml [--steps 6] [--repeats 2]
        [--profile] [key=value ...]

Each arm loads the base model of ``model.name_or_path``, builds batches the way ``finetune``
does (``finetune.batching``, the feature cache), and times ``--steps`` optimiser steps after two
warm-up steps. ``--profile`` prints torch.profiler's table of two more steps of the first arm.
Prints one JSON line: samples/s per arm and repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(cfg, *, freeze: bool, steps: int, profile: bool = False) -> float:
    """Samples/s of ``steps`` train steps (after two warm-up steps) of a fresh copy of the model."""
    import torch

    from blip_ops.losses import make_temperature
    from blip_ops.train_loop import param_groups, word_embeddings
    from blip_ops.training import retrieval_train_step
    from pipelines.training.batches import build_batch
    from pipelines.training.data import distinct_titles, read_pairs, read_train_products
    from pipelines.training.features import decode_cache
    from pipelines.training.recipe import load_for_training, train_settings
    from pipelines.training.samplers import batch_sampler

    f = cfg.finetune
    rows = read_train_products(f.catalog, cfg)
    model = load_for_training(cfg, cfg.model.device)
    titles = distinct_titles(read_pairs(f.catalog, cfg), model.normalize_text)
    inputs = decode_cache(model, rows, f.feature_cache)
    sampler, _ = batch_sampler(cfg, rows, model.model_id)
    settings = train_settings(cfg).replace(freeze_word_embeddings=freeze)
    if freeze:
        word_embeddings(model).requires_grad_(False)
    temp = torch.nn.Parameter(make_temperature(0.07))
    opt = torch.optim.AdamW(param_groups(model, temp, settings))
    model.model.train()

    def step(i: int) -> int:
        batch = build_batch(model, sampler.rows_for(i), titles, inputs, None, i)
        out = retrieval_train_step(
            model, batch, temp, itm_titles=f.itm_titles, itm_balanced=f.itm_balanced
        )
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        return len(batch.image_ids)

    step(0), step(1)
    started, samples = time.perf_counter(), 0
    for i in range(2, 2 + steps):
        samples += step(i)
    rate = samples / (time.perf_counter() - started)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(2 + steps), step(3 + steps)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20))
    return rate


def main(argv=None) -> int:
    from pipelines.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "quality.yaml"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rates: dict[str, list[float]] = {"trained": [], "frozen": []}
    for rep in range(args.repeats):
        for name in rates:
            rate = measure(cfg, freeze=name == "frozen", steps=args.steps,
                           profile=args.profile and rep == 0 and name == "trained")  # fmt: skip
            rates[name].append(round(rate, 2))
    print(json.dumps({"samples_per_s": rates, "steps": args.steps, "config": args.config}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
