"""Karpathy-split annotations: the test/val files BLIP and ALBEF publish for COCO and Flickr30K.

A JSON list of ``{"image": "relative/path.jpg", "caption": [...]}``, images under a folder.
Captions get BLIP's ``pre_caption`` (lowercase, its punctuation stripped, 30 words) and images are
decoded at full size, as BLIP's evaluation does, so real checkpoints reproduce the paper's tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from pipelines.evaluation.data import EvalData, EvalInputError, LazyImages

KARPATHY_MAX_WORDS = 30  # BLIP's retrieval datasets truncate captions to 30 words
_BLIP_PUNCT_RE = re.compile(r"([.!\"()*#:;~])")
_SPACES_RE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = KARPATHY_MAX_WORDS) -> str:
    """BLIP's caption cleaning for its retrieval datasets (``data/utils.py``)."""
    caption = _BLIP_PUNCT_RE.sub(" ", caption.lower())
    caption = _SPACES_RE.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def _read_file(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def load_karpathy(
    annotation: str | Path, images_dir: str | Path, *, clean: bool = True
) -> EvalData:
    """A Karpathy-split annotation (``[{"image": path, "caption": [..] | str}, ...]``).

    Entries naming the same image are merged (BLIP's train files have one caption per entry).
    """
    annotation, images_dir = Path(annotation), Path(images_dir)
    if not annotation.is_file():
        raise EvalInputError(f"Karpathy annotation file {annotation} does not exist")
    if not images_dir.is_dir():
        raise EvalInputError(f"image folder {images_dir} does not exist (--images)")
    captions = read_captions(annotation)
    ids = list(captions)
    paths = [images_dir / PurePosixPath(i) for i in ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EvalInputError(
            f"{len(missing)} of {len(paths)} images of {annotation.name} are missing under "
            f"{images_dir}, e.g. {missing[:3]}"
        )
    texts, text_product = [], []
    for i, image_id in enumerate(ids):
        for c in captions[image_id]:
            texts.append(pre_caption(c) if clean else c)
            text_product.append(i)
    return EvalData(
        product_ids=ids,
        # Full-size decoding (no JPEG draft), as BLIP's evaluation transform sees the images.
        images=LazyImages(ids, [_read_file(p) for p in paths], target_size=None),
        texts=texts,
        text_product=np.asarray(text_product, dtype=np.int64),
        languages=None,
        inputs={
            "kind": "karpathy",
            "annotation": str(annotation.resolve()),
            "images": str(images_dir.resolve()),
            "pre_caption": clean,
        },
    )


def read_captions(annotation: Path) -> dict[str, list[str]]:
    """{image path: its captions} of an annotation file, in file order."""
    try:
        entries = json.loads(annotation.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{annotation} is not a JSON file: {err}") from err
    if not isinstance(entries, list) or not entries:
        raise EvalInputError(
            f"{annotation}: expected a non-empty JSON list of {{'image', 'caption'}} entries, "
            f"got {type(entries).__name__}"
        )
    captions: dict[str, list[str]] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise EvalInputError(
                f"{annotation}: entry {n} needs 'image' and 'caption', got {str(entry)[:120]}"
            )
        caps = entry["caption"]
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise EvalInputError(
                f"{annotation}: entry {n} caption must be a string or a list of strings"
            )
        captions.setdefault(str(entry["image"]), []).extend(caps)
    return captions
