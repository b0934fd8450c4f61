"""Derivatives stored per product: the model-resolution JPEG and the display thumbnail."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.indexing.derivatives import (
    derivatives,
    model_resolution_jpeg,
    thumbnail_jpeg,
    thumbnail_size,
)
from tests.conftest import draw_product


def open_jpeg(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG"
    im.load()
    return im


def as_float(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float64)  # (H, W, 3)


# ---------------------------------------------------------------- model-resolution image
@pytest.mark.parametrize("source_size", [(120, 90), (640, 480), (30, 200), (384, 384)])
def test_model_resolution_jpeg_is_square_rgb_at_the_model_size(source_size):
    data = model_resolution_jpeg(draw_product(3, source_size), 384)
    im = open_jpeg(data)
    assert im.size == (384, 384)
    assert im.mode == "RGB"


@pytest.mark.parametrize("seed", range(4))
def test_model_resolution_jpeg_is_close_to_the_direct_resize(seed):
    """What the re-ranker preprocesses from the JPEG is what indexing preprocessed, up to JPEG loss."""
    size = 384
    original = draw_product(seed, (640, 480))
    direct = original.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    # The re-ranker decodes and preprocesses again: a bicubic resize to the same size.
    again = open_jpeg(model_resolution_jpeg(original, size)).convert("RGB")
    again = again.resize((size, size), Image.Resampling.BICUBIC)
    assert np.abs(as_float(again) - as_float(direct)).mean() < 3.0


def test_model_resolution_jpeg_converts_other_modes():
    for mode in ("L", "RGBA", "P", "CMYK"):
        im = draw_product(1).convert(mode)
        assert open_jpeg(model_resolution_jpeg(im, 32)).mode == "RGB"


def test_model_resolution_jpeg_quality_changes_the_bytes():
    im = draw_product(2, (300, 200))
    low, high = model_resolution_jpeg(im, 64, quality=30), model_resolution_jpeg(im, 64, 95)
    assert len(low) < len(high)


# ---------------------------------------------------------------- thumbnail
@pytest.mark.parametrize(
    ("source_size", "expected"),
    [
        ((1024, 768), (256, 192)),
        ((768, 1024), (192, 256)),
        ((2000, 10), (256, 1)),  # extreme aspect keeps a 1 px side, not 0
        ((256, 256), (256, 256)),
        ((100, 60), (100, 60)),  # smaller than max_side: never upscaled
    ],
)
def test_thumbnail_keeps_aspect_and_never_upscales(source_size, expected):
    thumb = open_jpeg(thumbnail_jpeg(draw_product(5, source_size)))
    assert thumb.size == expected
    assert thumb.mode == "RGB"
    assert thumbnail_size(*source_size, 256) == expected


@pytest.mark.parametrize("source_size", [(999, 333), (333, 999), (517, 389), (50, 40)])
def test_thumbnail_aspect_within_rounding(source_size):
    w, h = source_size
    tw, th = open_jpeg(thumbnail_jpeg(draw_product(0, source_size), max_side=128)).size
    assert max(tw, th) == min(128, max(w, h))
    # Rounding each side moves the ratio by at most half a pixel on the shorter side.
    assert abs(tw / th - w / h) <= (w / h) * (0.5 / min(tw, th)) + 1e-9


def test_thumbnail_looks_like_the_image():
    original = draw_product(6, (800, 600))
    thumb = open_jpeg(thumbnail_jpeg(original))
    reference = original.resize(thumb.size, Image.Resampling.BOX)
    assert np.abs(as_float(thumb) - as_float(reference)).mean() < 6.0


# ---------------------------------------------------------------- batch, determinism, errors
def test_derivatives_for_a_batch(product_images):
    model_images, thumbnails = derivatives(product_images, 48)
    assert len(model_images) == len(thumbnails) == len(product_images)
    for data, thumb, im in zip(model_images, thumbnails, product_images, strict=True):
        assert open_jpeg(data).size == (48, 48)
        assert open_jpeg(thumb).size == im.size  # 120x90 sources are under 256: kept as they are
        assert data == model_resolution_jpeg(im, 48)
        assert thumb == thumbnail_jpeg(im)
    assert derivatives([], 48) == ([], [])


def test_same_input_gives_the_same_bytes():
    im = draw_product(7, (500, 350))
    twin = draw_product(7, (500, 350))
    assert model_resolution_jpeg(im, 384) == model_resolution_jpeg(twin, 384)
    assert thumbnail_jpeg(im) == thumbnail_jpeg(twin)
    # Metadata on the source does not leak into the output.
    im.info["exif"] = b"Exif\x00\x00junk"
    im.info["icc_profile"] = b"not a profile"
    assert model_resolution_jpeg(im, 384) == model_resolution_jpeg(twin, 384)
    assert thumbnail_jpeg(im) == thumbnail_jpeg(twin)


def test_inputs_are_not_modified():
    im = draw_product(4, (600, 400))
    before = im.tobytes()
    thumbnail_jpeg(im)
    model_resolution_jpeg(im, 64)
    assert im.size == (600, 400) and im.tobytes() == before


def test_bad_arguments_say_what_was_received():
    im = draw_product(0)
    with pytest.raises(ValueError, match="size must be a positive int.*got 0"):
        model_resolution_jpeg(im, 0)
    with pytest.raises(ValueError, match="quality.*got 0"):
        model_resolution_jpeg(im, 32, quality=0)
    with pytest.raises(ValueError, match="max_side.*got -1"):
        thumbnail_jpeg(im, max_side=-1)
    with pytest.raises(TypeError, match="expected a PIL image, got bytes"):
        thumbnail_jpeg(b"\xff\xd8")  # type: ignore[arg-type]
