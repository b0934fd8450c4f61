"""Fine-tuning over ``finetune.workers`` Ray Train workers (gloo on CPU, NCCL with GPUs).

The train split is read with Ray Data through the catalog reader's rules (any catalog the index
job reads: local or ``s3://``, inline images or ``image_uri``, a split column or a hash split) and
split into one shard per worker; each worker runs
:func:`pipelines.training.ray_worker.train_worker`. ``cpus_per_worker`` may be fractional (on 2
cores, 0.5 leaves Ray Data a CPU; a pool holding every CPU hangs). Batches built around families
or mined neighbours need the whole split in one process, so those settings are refused here.

Checkpoints go through Ray Train: rank 0 reports each evaluation's ``last`` state with
``ray.train.report(checkpoint=...)`` to ``finetune.storage_path`` (a folder every node reaches,
or ``s3://``), Ray keeps the best by val mean recall and the latest, and a run of the same
``finetune.run_name`` resumes from its latest checkpoint (``ray.train.get_checkpoint``). The
driver reads the summary from the :class:`ray.train.Result` and downloads its best and latest
checkpoints into ``out_dir/best`` and ``out_dir/last``.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.catalog.reader import CatalogReader
from pipelines.storage import filesystem_for, is_s3
from pipelines.training.data import read_titles
from pipelines.training.recipe import text_normalizer
from pipelines.training.splits import TRAIN_SPLIT

if TYPE_CHECKING:
    import pyarrow as pa

    from pipelines.config import AppConfig, FinetuneConfig

logger = logging.getLogger(__name__)

# What Ray keeps the best checkpoints by: the val mean recall, or -1 for a checkpoint written
# without an evaluation (a run with evaluation off), so that one never counts as the best.
SCORE = "checkpoint_score"
CHECKPOINTS_KEPT = 2  # the best by SCORE; Ray keeps the latest as well


def train_dataset(cfg: AppConfig, *, shuffle: bool = True):
    """The train split as a Ray Data dataset (``product_id``, ``image`` bytes, ``split``).

    With ``shuffle`` the block order is randomised again for every epoch (Ray Data reseeds from
    ``finetune.seed`` and the execution index), and each worker shuffles rows locally on top.
    """
    import ray

    reader = CatalogReader(cfg.finetune.catalog, cfg)
    column, hashed = reader.split_source()
    names = set(reader.products_dataset().schema.names)
    cols = reader.columns
    wanted = [cols.product_id, cols.image, cols.image_uri, column]
    columns = list(dict.fromkeys(c for c in wanted if c in names))
    ds = ray.data.read_parquet(reader.parquet_files(), filesystem=reader.fs)
    ds = ds.select_columns(columns)
    ds = ds.map_batches(
        _train_rows, batch_format="pyarrow",
        fn_kwargs={"reader": reader, "column": column, "hashed": hashed},
    )
    if shuffle:
        seed = ray.data.RandomSeedConfig(seed=cfg.finetune.seed, reseed_after_execution=True)
        ds = ds.randomize_block_order(seed=seed)
    return ds


def _train_rows(batch: pa.Table, reader: CatalogReader, column: str, hashed: bool) -> pa.Table:
    """The train products of ``batch`` with their image bytes (read by ``image_uri`` if need be)."""
    import pyarrow as pa

    cols = reader.columns
    splits = reader.splits_of(batch.column(column).to_pylist(), hashed)
    rows = batch.take([i for i, s in enumerate(splits) if s == TRAIN_SPLIT]).to_pylist()
    out = []
    for r in rows:
        row = {"product_id": str(r[cols.product_id]), "image": r.get(cols.image),
               "image_uri": r.get(cols.image_uri)}  # fmt: skip
        out.append({"product_id": row["product_id"], "image": reader.image_loader(row)(),
                    "split": TRAIN_SPLIT})  # fmt: skip
    schema = pa.schema(
        [("product_id", pa.string()), ("image", pa.binary()), ("split", pa.string())]
    )
    return pa.Table.from_pylist(out, schema=schema)


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


def run_name(f: FinetuneConfig) -> str:
    """``finetune.run_name``, else one named after ``out_dir``; a fresh one when not resuming."""
    name = f.run_name or "finetune-" + re.sub(r"[^\w.-]+", "-", Path(f.out_dir).name)
    return name if f.resume else f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage(cfg: AppConfig) -> tuple[str, object | None, str]:
    """``(storage_path, storage_filesystem, shown)`` for Ray Train's RunConfig."""
    f = cfg.finetune
    path = f.storage_path or str(Path(f.out_dir).absolute() / "ray_train")
    if not is_s3(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        return path, None, path
    from pipelines.storage import S3Settings

    fs, fs_path = filesystem_for(path, S3Settings.from_config(cfg.s3))
    return fs_path, fs, path


def run_ray(
    cfg: AppConfig,
    *,
    evaluate: bool = True,
    fit_overrides: dict | None = None,
    first_negatives: bool = False,
    shuffle: bool = True,
) -> dict:
    """Fine-tune with Ray Train; returns rank 0's summary from the Result, with ``workers``.

    ``fit_overrides``, ``first_negatives`` and ``shuffle=False`` make runs comparable in tests
    (plain SGD, deterministic ITM negatives, shards in file order).
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.runtime.cluster import init_ray
    from pipelines.training.ray_worker import train_worker

    f = cfg.finetune
    check_distributed(f)
    init_ray(cfg)
    use_gpu = f.gpus_per_worker > 0
    resources = {"CPU": f.cpus_per_worker, **({"GPU": f.gpus_per_worker} if use_gpu else {})}
    storage_path, storage_fs, shown = storage(cfg)
    name = run_name(f)
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
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=CHECKPOINTS_KEPT,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
        ),  # fmt: skip
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary = read_result(result, Path(f.out_dir))
    summary.update(workers=f.workers, storage_path=shown, run_name=name)
    return summary


def read_result(result, out_dir: Path) -> dict:
    """Rank 0's summary (the metrics of the last checkpoint), with its latest checkpoint in
    ``out_dir/last`` and the best by val mean recall in ``out_dir/best``."""
    if result.checkpoint is None or not result.metrics:
        raise RuntimeError(f"Ray Train run at {result.path} reported no checkpoint")
    summary = dict(result.metrics)
    summary["checkpoint"] = result.checkpoint.path
    summary["last_dir"] = _download(result.checkpoint, out_dir / "last")
    scored = [(m[SCORE], c) for c, m in result.best_checkpoints or [] if m.get(SCORE, -1) >= 0]
    best = max(scored, key=lambda sc: sc[0])[1] if scored else None
    summary["best_dir"] = _download(best, out_dir / "best") if best is not None else None
    return summary


def _download(checkpoint, dest: Path) -> str:
    tmp = dest.with_name(dest.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.to_directory(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    logger.info("checkpoint %s -> %s", checkpoint.path, dest)
    return str(dest)
