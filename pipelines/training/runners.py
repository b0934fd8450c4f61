"""Fine-tuning runs: :func:`run_single` in this process, or Ray Train for ``finetune.workers > 1``
(:func:`run_finetune` picks)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipelines.config import dump_config
from pipelines.training.batches import SwapNegatives, build_batch
from pipelines.training.data import distinct_titles, read_pairs, read_train_products
from pipelines.training.features import decode_cache
from pipelines.training.recipe import load_for_training, train_settings
from pipelines.training.samplers import MinedSampler, batch_sampler
from pipelines.training.splits import require_split
from pipelines.training.validation import make_eval_fn

if TYPE_CHECKING:
    from blip_ops.train_loop import TrainSettings
    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)


def run_finetune(cfg: AppConfig) -> dict:
    """Fine-tune as ``cfg`` says: this process for one worker, Ray Train for more."""
    if cfg.finetune.workers == 1:
        return run_single(cfg)
    from pipelines.training.distributed import run_ray

    return run_ray(cfg)


def run_single(
    cfg: AppConfig,
    *,
    evaluate: bool = True,
    settings: TrainSettings | None = None,
    stop_at: int | None = None,
) -> dict:
    """Fine-tune in this process; ``settings`` (default: from ``cfg``) and ``stop_at`` as
    :func:`blip_ops.train_loop.fit` takes them."""
    from blip_ops.train_loop import fit

    f = cfg.finetune
    rows = read_train_products(f.catalog, cfg)
    model = load_for_training(cfg, cfg.model.device)
    pairs = read_pairs(f.catalog, cfg)
    titles = distinct_titles(pairs, model.normalize_text)
    initial_id = model.model_id
    pixels = decode_cache(model, rows, f.feature_cache)
    sampler, mined = batch_sampler(cfg, rows, initial_id)
    swaps = _swap_negatives(pairs, f.swap_negatives, f.seed)
    next_batch = _batches(model, rows, sampler, titles, pixels, swaps)
    eval_fn = make_eval_fn(cfg, f.catalog, f.eval_k_test) if evaluate else None
    if evaluate:
        require_split(cfg, f.eval_split)
    summary = fit(
        model, next_batch, settings or train_settings(cfg), eval_fn=eval_fn,
        config_yaml=dump_config(cfg), stop_at=stop_at,
    )  # fmt: skip
    summary.update(
        initial_model_id=initial_id, workers=1, train_products=len(rows), mined=mined,
        batching=f.batching, swap_negatives=swaps is not None,
    )  # fmt: skip
    return summary


def _swap_negatives(pairs: dict[str, dict], enabled: bool, seed: int) -> SwapNegatives | None:
    if not enabled:
        return None
    swaps = SwapNegatives(pairs, seed)
    if not swaps.usable:
        logger.warning("finetune.swap_negatives: the catalog has no attribute columns: off")
        return None
    return swaps


def _batches(model, rows, sampler, titles, pixels, swaps) -> Callable:
    """``next_batch(step)`` for ``fit``: the sampler's products of ``step`` as a batch."""

    def next_batch(step: int):
        if isinstance(sampler, MinedSampler):
            chosen, pairs_in_batch = sampler.plan(step)
            batch = build_batch(model, [rows[i] for i in chosen], titles, pixels, swaps, step)
            batch.mined_pairs = pairs_in_batch
            return batch
        return build_batch(model, sampler.rows_for(step), titles, pixels, swaps, step)

    return next_batch
