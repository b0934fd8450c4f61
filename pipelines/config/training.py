"""The fine-tuning section.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from pipelines.config.base import (
    DEFAULT_DATA_DIR,
    Section,
)

logger = logging.getLogger(__name__)

class FinetuneConfig(Section):
    """``python -m pipelines.finetune``: ITC + ITM fine-tuning on the catalog's train split."""

    catalog: str = Field(
        str(DEFAULT_DATA_DIR / "catalog"),
        description="the catalog to train on: any catalog the index job reads (a folder or "
        "s3:// prefix of Parquet files; source.* names its columns, titles and split), or the "
        "folder pipelines.make_catalog writes",
    )
    out_dir: str = Field(
        str(DEFAULT_DATA_DIR / "finetune"), description="checkpoints: best/, last/ and the summary"
    )
    steps: int = Field(300, gt=0, description="optimiser steps (the schedule spans them)")
    batch_size: int = Field(
        16, ge=2, description="products per step over all workers (each with all its titles)"
    )
    lr: float = Field(
        1e-4, gt=0,
        description="peak AdamW learning rate of the fresh parts (cross-attention, adapter, "
        "projections, ITM head); of every part when lr_pretrained is null",
    )  # fmt: skip
    lr_pretrained: float | None = Field(
        None, gt=0,
        description="peak learning rate of the pretrained encoders (the family says which "
        "parameters those are); null = lr",
    )  # fmt: skip
    lr_temp: float | None = Field(
        None, gt=0, description="peak learning rate of the ITC temperature (no decay); null = lr"
    )
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (BLIP: 0.05)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps before the cosine decay")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm (0 = no clipping)")
    negatives: Literal["hard", "random"] = Field(
        "hard", description="ITM negatives: similarity-weighted (BLIP) or uniform (the ablation)"
    )
    seed: int = Field(0, description="seeds init order, batch order and negative sampling")
    eval_every: int = Field(
        100, ge=0, description="evaluate + checkpoint every N steps (0 = at the end only)"
    )
    eval_k_test: int = Field(
        16, gt=0, description="ITC→ITM re-rank depth of the periodic evaluation"
    )
    resume: bool = Field(True, description="continue from out_dir/last when it exists")
    workers: int = Field(1, gt=0, description="1 = this process; >1 = Ray Train TorchTrainer")
    storage_path: str | None = Field(
        None,
        description="Ray Train's storage for checkpoints and run state (workers > 1): a folder "
        "every node can reach, or s3://bucket/prefix; null = out_dir/ray_train (one node)",
    )
    run_name: str | None = Field(
        None,
        description="Ray Train run name under storage_path: a run of the same name resumes from "
        "its latest checkpoint (with resume: true); null = finetune-<out_dir's folder name>",
    )
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs per Ray Train worker (fractions on small machines)"
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (>0: NCCL, else gloo)")
    mixed_precision: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    log_every: int = Field(10, gt=0, description="progress line every N steps")
    momentum: bool = Field(
        False, description="BLIP's momentum encoder + feature queue for ITC (off by default)"
    )
    momentum_m: float = Field(
        0.995, ge=0, le=1, description="EMA momentum of the momentum encoder (BLIP: 0.995)"
    )
    queue_size: int = Field(4096, ge=0, description="momentum feature queue length (BLIP: 57,600)")
    alpha: float = Field(
        0.4, ge=0, le=1,
        description="distillation weight, ramped from 0 over warmup_steps (BLIP: 0.4)",
    )  # fmt: skip
    batching: Literal["random", "family"] = Field(
        "random",
        description="batch makeup: random train products, or whole near-duplicate families "
        "(P x K) so in-batch hard negatives are one-attribute twins; every train product once "
        "per epoch either way",
    )
    random_share: float = Field(
        0.5, ge=0, le=1,
        description="family batching: share of each batch filled with random single products "
        "(easy negatives beside the twins)",
    )  # fmt: skip
    swap_negatives: bool = Field(
        False,
        description="extra ITM negatives: each product's own title with one attribute word "
        "(colour, pattern, material or brand) swapped, in the title's language; needs the "
        "catalog's attribute columns (kind, color, pattern, material, brand) and is off without them",
    )
    feature_cache: str | None = Field(
        None,
        description="folder that keeps the decoded training images (a frozen CNN's feature "
        "maps for the compact family) between runs of the same base model and catalog; "
        "null = recompute each run",
    )
    itm_balanced: bool = Field(
        False,
        description="ITM loss with positives and negatives weighted to equal totals (BLIP: "
        "unweighted, 1 positive : 2 negatives)",
    )
    easy_steps: int = Field(
        0, ge=0,
        description="curriculum: the first N steps draw ITM negatives at random and leave the "
        "swapped titles out, so the fresh ITM head learns the easy cases first",
    )  # fmt: skip
    freeze_word_embeddings: bool = Field(
        False,
        description="keep the text encoder's word-embedding table fixed (on a CPU its dense "
        "update is a large share of a step)",
    )
    eval_split: Literal["val"] = Field(
        "val",
        description="the split fitting evaluates for checkpoint selection (never test: that "
        "split is read only by the final evaluation)",
    )
    eval_texts: Literal["titles", "queries"] = Field(
        "titles",
        description="what the periodic evaluation ranks: the val products' own titles (the "
        "paper's task) or their shopper queries",
    )
    itm_titles: Literal["all", "one"] = Field(
        "all",
        description="ITM pairs per step: every title (2T+B pairs) or one drawn title per image "
        "(3B pairs, BLIP's one caption per image; about half the text-side cost)",
    )
    mined_negatives: str | None = Field(
        None,
        description="Parquet of pipelines.mine_negatives: batches hold anchors' mined neighbours "
        "(single process only); None = off",
    )
    mined_per_batch: int | None = Field(
        None, gt=0,
        description="products of each batch that are anchors' mined neighbours (at most half); "
        "None = batch_size // 2",
    )  # fmt: skip
    mined_weight: float = Field(
        1.0, ge=0,
        description="sampling mass of a row's mined candidates relative to all in-batch "
        "candidates (1.0: about half the ITM negatives are mined ones; 0 = batch makeup only)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_mined(self) -> FinetuneConfig:
        if self.mined_negatives is None:
            return self
        if self.workers > 1:
            raise ValueError(
                "finetune.mined_negatives works in a single process only (finetune.workers=1, "
                f"got {self.workers}): Ray Train shards the data per worker, so a batch cannot "
                "be built around each anchor's mined neighbours"
            )
        if self.mined_per_batch is not None and self.mined_per_batch > self.batch_size // 2:
            raise ValueError(
                f"finetune.mined_per_batch ({self.mined_per_batch}) must not exceed half of "
                f"finetune.batch_size ({self.batch_size}): each neighbour needs an anchor"
            )
        return self

    @property
    def mined_slots(self) -> int:
        """Products per batch that are mined neighbours (the rest are anchors)."""
        return self.mined_per_batch or max(1, self.batch_size // 2)


