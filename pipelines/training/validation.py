"""The evaluation that picks the best checkpoint: ``finetune.eval_split`` (val), never test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.training.splits import TrainSplitError

if TYPE_CHECKING:
    from pipelines.config import AppConfig


def make_eval_fn(cfg: AppConfig, catalog: str | Path, k_test: int) -> Callable[..., dict]:
    """eval_fn for ``fit``: the ``finetune.eval_split`` (val) products → metrics with ``mean``.

    It picks the best checkpoint, so it never reads the test split (the config allows only val).
    The re-rank uses the service's rule and ``serve.itm_weight``.
    """
    from blip_ops.evaluate import evaluate_model
    from pipelines.evaluation.catalog import load_catalog

    f = cfg.finetune
    if f.eval_split == "test":  # the config refuses it; a guard for callers building configs
        raise TrainSplitError("fitting may not evaluate the test split")
    data = None

    def eval_fn(model) -> dict:
        nonlocal data
        if data is None:  # read once, on the first evaluation: the images are decoded lazily
            data = load_catalog(
                str(catalog), f.eval_split, cfg, target_size=model.image_settings.size,
                texts=f.eval_texts,
            )  # fmt: skip
        k = min(k_test, len(data.product_ids), len(data.texts))
        metrics = evaluate_model(
            model, data.images, data.texts, data.text_product, languages=data.languages,
            k_test=(k,), batch_size=cfg.encode.batch_size, itm_weight=cfg.serve.itm_weight,
        )  # fmt: skip
        itm = metrics["itm"][str(k)]
        return {
            "mean": itm["mean"], "itc_mean": metrics["itc"]["mean"], "k_test": k,
            "split": f.eval_split,
        }  # fmt: skip

    return eval_fn
