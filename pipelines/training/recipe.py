"""``finetune.*`` as the training loop takes it: its settings, the model loaded for training and
the checkpoint's text rule."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blip_ops.family import RetrievalModel
    from blip_ops.train_loop import TrainSettings
    from pipelines.config import AppConfig


def train_settings(cfg: AppConfig) -> TrainSettings:
    """The training-loop settings of ``finetune.*``."""
    from blip_ops.train_loop import TrainSettings

    f = cfg.finetune
    return TrainSettings(
        steps=f.steps, lr=f.lr, lr_pretrained=f.lr_pretrained, lr_temp=f.lr_temp,
        weight_decay=f.weight_decay, warmup_steps=f.warmup_steps, grad_clip=f.grad_clip,
        negatives=f.negatives, seed=f.seed, eval_every=f.eval_every, out_dir=f.out_dir,
        resume=f.resume, mixed_precision=f.mixed_precision, log_every=f.log_every,
        momentum=f.momentum, momentum_m=f.momentum_m, queue_size=f.queue_size, alpha=f.alpha,
        mined_weight=f.mined_weight, itm_titles=f.itm_titles, itm_balanced=f.itm_balanced,
        easy_steps=f.easy_steps, freeze_word_embeddings=f.freeze_word_embeddings,
    )  # fmt: skip


def load_for_training(cfg: AppConfig, device: str) -> RetrievalModel:
    """``model.name_or_path`` on ``device`` with float32 weights."""
    from blip_ops import load_model
    from pipelines.runtime.inputs import ensure_model

    # float32 weights: mixed precision is autocast, never bf16 master weights.
    return load_model(
        ensure_model(cfg.model.name_or_path),
        device=device,
        dtype="float32",
        attention=cfg.model.attention,
    )


def text_normalizer(cfg: AppConfig) -> Callable[[str], str]:
    """The checkpoint's own text rule, read without loading its weights."""
    from blip_ops.family import read_catalog_config
    from blip_ops.text import TextSettings, normalize_text
    from pipelines.runtime.inputs import ensure_model

    path = Path(ensure_model(cfg.model.name_or_path))
    text = read_catalog_config(path).get("text") if path.is_dir() else None
    settings = TextSettings.from_dict(text)
    return lambda t: normalize_text(t, settings)
