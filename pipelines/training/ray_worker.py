"""Ray Train's per-worker loop: this worker's shard of the train split, one rank of ``fit``.

The train step calls the model's submodules directly, so gradients are averaged by an explicit
all-reduce (``blip_ops.train_loop.sync_gradients``), not by a DDP wrapper.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from pipelines.config import dump_config
from pipelines.training.batches import build_batch
from pipelines.training.recipe import load_for_training, train_settings
from pipelines.training.validation import make_eval_fn

if TYPE_CHECKING:
    from pipelines.config import AppConfig, FinetuneConfig

SEEN_BATCHES = 4  # product ids of the first batches each rank writes, for the shard checks


class WorkerConfig(TypedDict, total=False):
    """``train_loop_config`` of the TorchTrainer (plain data: it travels to every worker)."""

    cfg: dict  # AppConfig.model_dump(mode="json")
    titles: dict[str, list[str]]  # product id -> its distinct titles
    evaluate: bool  # rank 0 evaluates on finetune.eval_split
    fit_overrides: dict  # TrainSettings fields replaced (tests: plain SGD)
    first_candidate_negatives: bool  # deterministic ITM negatives (tests)
    no_shuffle: bool  # shard rows in file order (tests)


def train_worker(config: WorkerConfig) -> None:
    """One rank: train on this worker's shard; write its summary and first batches' ids."""
    import ray.train

    from blip_ops.train_loop import fit
    from pipelines.config import AppConfig

    cfg = AppConfig.model_validate(config["cfg"])
    f = cfg.finetune
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = load_for_training(cfg, _device(f))
    shard = ray.train.get_dataset_shard("train")
    rows = _shard_rows(shard, f, rank, world, shuffle=not config.get("no_shuffle"))
    seen: list[list[str]] = []
    next_batch = _resuming(rows, lambda r: build_batch(model, r, config["titles"]), seen)
    evaluate = rank == 0 and config.get("evaluate", True)
    eval_fn = make_eval_fn(cfg, f.catalog, f.eval_k_test) if evaluate else None
    settings = train_settings(cfg).replace(**config.get("fit_overrides", {}))
    summary = fit(
        model, next_batch, settings, eval_fn=eval_fn, config_yaml=dump_config(cfg),
        log=print if rank == 0 else None, negative_sampler=_negative_sampler(config),
    )  # fmt: skip
    summary.update(rank=rank, world=world)
    _write_rank_files(cfg, rank, seen, summary)
    ray.train.report({"steps": summary["steps"], "rank": rank})


def _device(f: FinetuneConfig) -> str:
    """This worker's GPU, or the CPU with ``cpus_per_worker`` torch threads."""
    import torch

    if f.gpus_per_worker > 0:
        import ray.train.torch

        return str(ray.train.torch.get_device())
    torch.set_num_threads(max(1, int(f.cpus_per_worker)))
    return "cpu"


def _shard_rows(
    shard, f: FinetuneConfig, rank: int, world: int, *, shuffle: bool
) -> Iterator[list[dict]]:
    """Endless batches of this worker's ``shard``, epoch after epoch (drop last)."""
    per_worker = f.batch_size // world
    epoch = 0
    while True:
        got = 0
        local = {
            "local_shuffle_buffer_size": per_worker * 4,
            "local_shuffle_seed": f.seed * 1000 + epoch * world + rank,
        } if shuffle else {}  # fmt: skip
        for b in shard.iter_batches(
            batch_size=per_worker, batch_format="numpy", drop_last=True, **local
        ):
            got += 1
            yield [
                {"product_id": str(p), "image": i, "split": str(s)}
                for p, i, s in zip(b["product_id"], b["image"], b["split"], strict=True)
            ]
        if got == 0:
            raise ValueError(
                f"rank {rank}: shard holds fewer than {per_worker} products (batch_size "
                f"{f.batch_size} over {world} workers)"
            )
        epoch += 1


def _resuming(
    stream: Iterator[list[dict]], build: Callable[[list[dict]], object], seen: list[list[str]]
) -> Callable[[int], object]:
    """``next_batch(step)`` over ``stream``, recording the first batches' ids into ``seen``."""
    consumed = 0

    def next_batch(step: int):
        # A resumed run starts at its checkpoint's step: skip the batches the first run trained
        # on (read, not decoded), so the data position continues instead of restarting epoch 0.
        nonlocal consumed
        while consumed < step:
            next(stream)
            consumed += 1
        rows = next(stream)
        consumed += 1
        if len(seen) < SEEN_BATCHES:
            seen.append([r["product_id"] for r in rows])
        return build(rows)

    return next_batch


def _negative_sampler(config: WorkerConfig) -> Callable:
    from blip_ops.losses import first_candidate_negatives, sample_hard_negatives

    if config.get("first_candidate_negatives"):
        return first_candidate_negatives
    return sample_hard_negatives


def _write_rank_files(cfg: AppConfig, rank: int, seen: list[list[str]], summary: dict) -> None:
    shards = Path(cfg.finetune.out_dir) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    (shards / f"rank-{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    # Ray Train 2.60 (Train V2) attaches metrics to checkpoints only: the driver reads this file.
    (shards / f"summary-rank-{rank}.json").write_text(
        json.dumps(summary, default=str), encoding="utf-8"
    )
