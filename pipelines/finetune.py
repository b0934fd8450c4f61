"""Fine-tune BLIP on the catalog's train split: ITC + ITM with hard negatives, then evaluate.

    python -m pipelines.finetune --config configs/finetune_demo.yaml [key=value ...] [--model PATH]

Reads ``finetune.catalog``: any catalog the index job reads (a folder or ``s3://`` prefix of
Parquet files: ``source.columns`` names the product id and the image, inline or by ``image_uri``),
or the folder ``pipelines.make_catalog`` writes. Only the products of split ``train`` are trained
on (any other product in a batch is an error): the ``source.split_column`` says each product's
split, or a hash of ``source.split_by`` (a family column keeps near-duplicates together) when the
files have no such column. Each product's titles are ``source.title_columns`` (the demo catalog:
English, 汉字, pinyin): positives of one image, de-duplicated after the model's own text
normalisation. Every ``finetune.eval_every`` steps the model is evaluated on the ``val`` split
(``blip_ops.evaluate``, ITC→ITM at ``finetune.eval_k_test``); the best mean recall is kept in
``out_dir/best``, the latest state in ``out_dir/last`` (a later run resumes from it). The
``test`` split is never opened here: only the final evaluation reads it.

Batches (``finetune.batching``): ``random`` train products, or ``family``: whole near-duplicate
families plus a ``random_share`` of single products, so in-batch hard negatives are
one-attribute twins. ``finetune.swap_negatives`` adds each product's own title with one attribute
word swapped as an extra ITM negative. Fresh parts and pretrained encoders may learn at their own
rates (``finetune.lr`` / ``lr_pretrained``; the temperature at ``lr_temp``).

``finetune.workers == 1``: this process. ``> 1``: Ray Train ``TorchTrainer`` (gloo on CPU, NCCL
with ``gpus_per_worker > 0``), the catalog read with Ray Data and split into one shard per worker;
``cpus_per_worker`` may be fractional (on 2 cores, 0.5 leaves Ray Data a CPU; a pool holding every CPU hangs).
Checkpoints go through ``ray.train.report`` to ``finetune.storage_path`` (a shared folder or
``s3://``; default ``out_dir/ray_train``), a run of the same ``finetune.run_name`` resumes from its
latest checkpoint, and the best and latest are copied into ``out_dir`` from the run's ``Result``.
The train step calls the model's submodules directly, so gradients are averaged by an explicit
all-reduce (``blip_ops.train_loop.sync_gradients``), not by a DDP wrapper.

``finetune.mined_negatives`` (the Parquet of ``pipelines.mine_negatives``, single process only):
each batch is ``batch_size - finetune.mined_per_batch`` anchors (every train product once per
epoch) plus, for each anchor in turn, one of its mined neighbours not already in the batch, then
random train products to fill; every mined pair inside the batch is upweighted in the ITM negative
sampling by ``finetune.mined_weight``. Mined ids that are not train products of the catalog are
refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipelines.config import AppConfig, add_config_arguments, cli_config
from pipelines.training.runners import run_finetune


def print_summary(summary: dict, cfg: AppConfig) -> None:
    f = cfg.finetune
    rate = summary.get("samples_per_s")
    best = summary.get("best_mean_recall")
    print("\nfine-tuning summary")
    print(f"  model        {cfg.model.name_or_path}")
    print(f"  catalog      {f.catalog} (train split only; checkpoints chosen on {f.eval_split} {f.eval_texts})")
    print(f"  batching     {f.batching}" + (f" ({f.random_share:.0%} random)" if f.batching == "family" else "")
          + (", attribute-swapped title negatives" if summary.get("swap_negatives") else ""))
    acc = summary.get("itm_accuracy_recent") or {}
    if acc.get("pos") is not None:
        swap = f", swapped titles {acc['swap']:.2f}" if acc.get("swap") is not None else ""
        print(f"  ITM accuracy positives {acc['pos']:.2f}, negatives {acc['neg']:.2f}{swap} "
              "(last 20 steps)")
    print(f"  workers      {summary.get('workers')} (negatives: {f.negatives})")
    mined = summary.get("mined")
    if mined:
        share = (summary.get("last") or {}).get("mined_share")
        print(
            f"  mined        {mined['path']} (model {mined['model_id']}, table version "
            f"{mined['table_version']}): {mined['anchors_with_neighbours']} anchors with "
            f"neighbours, {f.mined_slots} of {f.batch_size} slots, weight {f.mined_weight}"
            + (f", last step {share:.0%} of ITM negatives mined" if share is not None else "")
        )
    print(
        f"  steps        {summary['steps']} (this run from {summary.get('start_step', 0)}), "
        f"{summary.get('samples')} products, {summary.get('seconds')}s"
    )
    print(f"  samples/s    {rate:.1f}" if rate else "  samples/s    -")
    print(
        f"  best recall  {best:.4f} (mean R@1/5/10 both ways, ITC→ITM k_test={f.eval_k_test})"
        if best is not None
        else "  best recall  -"
    )
    for h in summary.get("history", []):
        print(f"    step {h['step']:>6}: mean recall {h['mean']}")
    print(f"  best         {summary.get('best_dir')}")
    print(f"  last         {summary.get('last_dir')} ({summary.get('model_id')})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.finetune", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("model",))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    try:
        summary = run_finetune(cfg)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.finetune.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print_summary(summary, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
