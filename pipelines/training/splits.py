"""The train-only rule: fine-tuning reads the ``train`` split; val picks checkpoints; test never."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.config import AppConfig

TRAIN_SPLIT = "train"


class TrainSplitError(ValueError):
    """A product outside the train split reached a training batch."""


def check_train_only(rows: Sequence[dict]) -> None:
    bad = [r["product_id"] for r in rows if r.get("split") != TRAIN_SPLIT]
    if bad:
        raise TrainSplitError(
            f"{len(bad)} products outside split {TRAIN_SPLIT!r} in a training batch, e.g. {bad[:5]}"
        )


def catalog_splits(catalog: str | Path, cfg: AppConfig) -> dict[str, str]:
    """{product_id: split} of every product of the catalog (no images read)."""
    from pipelines.catalog.reader import CatalogReader

    return CatalogReader(catalog, cfg).splits()


def require_split(cfg: AppConfig, split: str) -> None:
    """Fail before training when the catalog has no ``split`` products to evaluate."""
    splits = set(catalog_splits(cfg.finetune.catalog, cfg).values())
    if split not in splits:
        raise ValueError(
            f"catalog {cfg.finetune.catalog} has no {split!r} products (splits: "
            f"{sorted(splits)}): checkpoints are chosen on the {split} split, so "
            "generate a larger catalog or give it a split column with that value"
        )
