"""The decoded-image cache of a fine-tuning run: each train image decoded (and, for a frozen
image backbone, run through it) once, in memory and optionally on disk."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

CHUNK = 64  # images preprocessed per model call


def decode_cache(model, rows: Sequence[dict], cache_dir: str | Path | None = None) -> dict:
    """product id → what the train step takes for each row's image, computed once: the
    preprocessed pixels, or for a model with a frozen image backbone (the compact family) its
    feature maps (``model.vision_inputs``), so no step runs the frozen part again. The demo
    catalog fits in memory (compact: 250 KB per product).

    ``cache_dir``: keep them on disk too, keyed by the model and the exact image bytes, so runs
    that fine-tune the same base model on the same catalog (a settings comparison) decode and
    run the frozen CNN once between them.
    """
    import torch

    file = feature_cache_file(model, rows, cache_dir) if cache_dir is not None else None
    if file is not None and file.is_file():
        logger.info("image features from %s", file)
        return torch.load(file, weights_only=True)
    out = compute_vision_inputs(model, rows)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.rename(file)  # atomic: a concurrent run never loads a half-written cache
    return out


def feature_cache_file(model, rows: Sequence[dict], cache_dir: str | Path) -> Path:
    """The cache file of ``model`` on exactly these products and image bytes."""
    import hashlib

    digest = hashlib.blake2b(digest_size=12)
    for r in rows:
        digest.update(str(r["product_id"]).encode() + b"\0")
        digest.update(hashlib.blake2b(bytes(r["image"]), digest_size=16).digest())
    return Path(cache_dir) / f"{model.model_id}-{digest.hexdigest()}.pt"


def compute_vision_inputs(model, rows: Sequence[dict]) -> dict:
    from blip_ops.decode import decode_image

    size = model.image_settings.size
    out = {}
    for start in range(0, len(rows), CHUNK):
        part = rows[start : start + CHUNK]
        pix = model.preprocess([decode_image(bytes(r["image"]), target_size=size) for r in part])
        pix = model.vision_inputs(pix)
        out.update({str(r["product_id"]): p for r, p in zip(part, pix, strict=True)})
    return out
