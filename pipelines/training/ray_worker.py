"""Ray Train's per-worker loop: this worker's shard of the train split, one rank of ``fit``.

The train step calls the model's submodules directly, so gradients are averaged by an explicit
all-reduce (``blip_ops.train_loop.sync_gradients``), not by a DDP wrapper. Each worker keeps its
checkpoints in a local temporary folder: a resumed run starts from ``ray.train.get_checkpoint()``
(downloaded by every rank), and rank 0 hands each evaluation's state to
``ray.train.report(checkpoint=...)``, which persists it to the run's storage.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from pipelines.config import dump_config
from pipelines.training.batches import build_batch
from pipelines.training.recipe import load_for_training, train_settings
from pipelines.training.validation import make_eval_fn

if TYPE_CHECKING:
    from pipelines.config import FinetuneConfig

SEEN_BATCHES = 4  # product ids of the first batches each rank records, for the shard checks


class WorkerConfig(TypedDict, total=False):
    """``train_loop_config`` of the TorchTrainer (plain data: it travels to every worker)."""

    cfg: dict  # AppConfig.model_dump(mode="json")
    titles: dict[str, list[str]]  # product id -> its distinct titles
    evaluate: bool  # rank 0 evaluates on finetune.eval_split
    fit_overrides: dict  # TrainSettings fields replaced (tests: plain SGD)
    first_candidate_negatives: bool  # deterministic ITM negatives (tests)
    no_shuffle: bool  # shard rows in file order (tests)


def train_worker(config: WorkerConfig) -> None:
    """One rank: train on this worker's shard, reporting checkpoints and the final summary."""
    import ray.train

    from blip_ops.train_loop import fit
    from pipelines.config import AppConfig

    cfg = AppConfig.model_validate(config["cfg"])
    f = cfg.finetune
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local = _restore(f.resume)
    try:
        model = load_for_training(cfg, _device(f))
        shard = ray.train.get_dataset_shard("train")
        rows = _shard_rows(shard, f, rank, world, shuffle=not config.get("no_shuffle"))
        seen: list[list[str]] = []
        next_batch = _resuming(rows, lambda r: build_batch(model, r, config["titles"]), seen)
        evaluate = rank == 0 and config.get("evaluate", True)
        eval_fn = make_eval_fn(cfg, f.catalog, f.eval_k_test) if evaluate else None
        overrides = config.get("fit_overrides", {})
        settings = train_settings(cfg).replace(**{**overrides, "out_dir": local, "resume": True})
        reporter = _Reporter(rank, local)
        summary = fit(
            model, next_batch, settings, eval_fn=eval_fn, config_yaml=dump_config(cfg),
            log=print if rank == 0 else None, negative_sampler=_negative_sampler(config),
            on_checkpoint=reporter.on_checkpoint,
        )  # fmt: skip
        summary.update(rank=rank, world=world, shards=_gather(seen, world))
        reporter.finish(summary)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _restore(resume: bool) -> Path:
    """A local folder for this rank's checkpoints, holding the run's latest as ``last/``."""
    import ray.train

    local = Path(tempfile.mkdtemp(prefix="finetune-worker-"))
    checkpoint = ray.train.get_checkpoint()
    if resume and checkpoint is not None:
        checkpoint.to_directory(str(local / "last"))
    return local


class _Reporter:
    """``fit``'s checkpoint hook: every rank reports (a barrier); rank 0 attaches ``last/``."""

    def __init__(self, rank: int, local: Path):
        self.rank, self.local = rank, local
        self.final: dict = {}

    def on_checkpoint(self, step: int, metrics: dict, final: bool) -> None:
        if final:  # reported after fit returns, with the run's summary as its metrics
            self.final = metrics
        else:
            self._report(metrics)

    def finish(self, summary: dict) -> None:
        self._report({**summary, **self.final})

    def _report(self, metrics: dict) -> None:
        import ray.train

        checkpoint = None
        if self.rank == 0 and (self.local / "last").is_dir():
            checkpoint = ray.train.Checkpoint.from_directory(str(self.local / "last"))
        plain = json.loads(json.dumps(metrics, default=str))  # Ray stores metrics as JSON
        mean = plain.get("mean_recall")
        plain["checkpoint_score"] = mean if mean is not None else -1.0  # see distributed.SCORE
        ray.train.report(plain, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)


def _gather(seen: list[list[str]], world: int) -> list[list[list[str]]]:
    """Every rank's first batches' product ids, by rank (a collective on every rank)."""
    if world == 1:
        return [seen]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, seen)
    return out


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
