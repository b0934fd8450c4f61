"""Fine-tuning over ``finetune.workers`` Ray Train workers (gloo on CPU, NCCL with GPUs).

The train split is read with Ray Data and split into one shard per worker; each worker runs
:func:`pipelines.training.ray_worker.train_worker`. ``cpus_per_worker`` may be fractional (on 2
cores, 0.5 leaves Ray Data a CPU; a pool holding every CPU hangs). Batches built around families
or mined neighbours need the whole split in one process, so those settings are refused here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.training.data import read_titles
from pipelines.training.recipe import text_normalizer
from pipelines.training.splits import TRAIN_SPLIT

if TYPE_CHECKING:
    from pipelines.config import AppConfig, FinetuneConfig


def train_dataset(cfg: AppConfig, *, shuffle: bool = True):
    """The train split as a Ray Data dataset (``product_id``, ``image``, ``split``).

    With ``shuffle`` the block order is randomised again for every epoch (Ray Data reseeds from
    ``finetune.seed`` and the execution index), and each worker shuffles rows locally on top.
    """
    import ray
    from ray.data.expressions import col

    cols = cfg.source.columns
    products_dir = str(Path(cfg.finetune.catalog) / "products")
    ds = ray.data.read_parquet(products_dir).select_columns([cols.product_id, cols.image, "split"])
    if (cols.product_id, cols.image) != ("product_id", "image"):
        ds = ds.rename_columns({cols.product_id: "product_id", cols.image: "image"})
    ds = ds.filter(expr=col("split") == TRAIN_SPLIT)
    if shuffle:
        seed = ray.data.RandomSeedConfig(seed=cfg.finetune.seed, reseed_after_execution=True)
        ds = ds.randomize_block_order(seed=seed)
    return ds


def check_distributed(f: FinetuneConfig) -> None:
    """Refuse settings that need every train product in one process, and uneven batches."""
    if f.mined_negatives is not None:
        raise ValueError(
            "finetune.mined_negatives works in a single process only (finetune.workers=1): Ray "
            "Train shards the data per worker, so a batch cannot be built around each anchor's "
            "mined neighbours"
        )
    if f.batching != "random" or f.swap_negatives:
        raise ValueError(
            "finetune.batching=family and finetune.swap_negatives work in a single process only "
            "(finetune.workers=1): Ray Train shards the data per worker, so a batch cannot be "
            "built from whole families"
        )
    if f.batch_size % f.workers or f.batch_size // f.workers < 2:
        raise ValueError(
            f"finetune.batch_size ({f.batch_size}) must split into >= 2 products per worker over "
            f"{f.workers} workers"
        )


def run_ray(
    cfg: AppConfig,
    *,
    evaluate: bool = True,
    fit_overrides: dict | None = None,
    first_negatives: bool = False,
    shuffle: bool = True,
) -> dict:
    """Fine-tune with Ray Train; returns rank 0's summary with ``workers``.

    ``fit_overrides``, ``first_negatives`` and ``shuffle=False`` make runs comparable in tests
    (plain SGD, deterministic ITM negatives, shards in file order).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.runtime.cluster import init_ray
    from pipelines.training.ray_worker import train_worker

    f = cfg.finetune
    check_distributed(f)
    init_ray(cfg)
    use_gpu = f.gpus_per_worker > 0
    resources = {"CPU": f.cpus_per_worker, **({"GPU": f.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "titles": read_titles(f.catalog, text_normalizer(cfg), cfg),
            "evaluate": evaluate,
            "fit_overrides": fit_overrides or {},
            "first_candidate_negatives": first_negatives,
            "no_shuffle": not shuffle,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=f.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        datasets={"train": train_dataset(cfg, shuffle=shuffle)},
        run_config=RunConfig(
            name=f"finetune-{int(time.time())}",
            storage_path=str(Path(f.out_dir).absolute() / "ray_train"),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary_file = Path(f.out_dir) / "shards" / "summary-rank-0.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    summary["workers"] = f.workers
    return summary
