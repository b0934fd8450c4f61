"""Image derivatives stored in the LanceDB `products` table.

- The *model-resolution image*: the image resized to the model's square input exactly as
  `blip_ops` preprocessing resizes it (PIL bicubic to (size, size)), stored as JPEG. The ITM
  re-ranker recomputes image tokens from it at query time, so no query reads the original image.
  Decoding it and preprocessing again gives a resize to the same size, which PIL makes a copy.
  The pixels therefore differ from the indexed ones only by JPEG loss.
- A small display *thumbnail*, aspect preserved, never upscaled.

Pure PIL (no Ray, no torch). The encoder options are pinned, so the same image always gives the
same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

MODEL_RESAMPLE = Image.Resampling.BICUBIC  # what blip_ops.family.ImageSettings uses for BLIP
# What PIL's own Image.thumbnail uses. Lanczos was 1.4x slower (2.9 vs 2.1 ms from 370 px, the
# demo catalog's images draft-decoded) for a mean difference of 0.5 grey levels at 256 px, and the
# thumbnail is made for every indexed image.
THUMBNAIL_RESAMPLE = Image.Resampling.BICUBIC
# reduce() by an integer factor first when the image is over 2x the target (Image.thumbnail's
# default). This is much faster on large photos and looks the same at thumbnail size.
THUMBNAIL_REDUCING_GAP = 2.0


def _check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an int in 1..100, got {quality!r}")


def _check_image(image: Image.Image) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"expected a non-empty image, got size {image.size}")


def _jpeg(image: Image.Image, quality: int, subsampling: str) -> bytes:
    buf = io.BytesIO()
    # No exif/icc arguments: PIL then writes none, so the bytes depend only on the pixels.
    image.save(
        buf, "JPEG", quality=quality, subsampling=subsampling, optimize=False, progressive=False
    )
    return buf.getvalue()


def model_resolution_jpeg(
    image: Image.Image,
    size: int,
    quality: int = 90,
    *,
    subsampling: str = "4:2:0",
) -> bytes:
    """JPEG of `image` in RGB, resized to (size, size) with bicubic as blip_ops preprocessing does.

    An RGB image already at (size, size) (``RetrievalModel.resize``'s output, which the index job
    passes so the image is resized once for the model and the JPEG, with the checkpoint's own
    filter) is encoded as it is.

    At quality 90 the decoded JPEG is within about 1-2 grey levels (mean absolute error) of the
    direct resize. 4:2:0 chroma keeps colour at half the model resolution, which is still finer
    than the vision tower's 16 px patches, and makes the file about a third smaller than 4:4:4.
    """
    _check_image(image)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int (the model's input side), got {size!r}")
    _check_quality(quality)
    if image.size != (size, size) or image.mode != "RGB":
        image = image.convert("RGB").resize((size, size), MODEL_RESAMPLE)
    return _jpeg(image, quality, subsampling)


def thumbnail_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) with the longest side min(its own, max_side), aspect preserved, sides >= 1."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def thumbnail_jpeg(image: Image.Image, max_side: int = 256, quality: int = 85) -> bytes:
    """JPEG display thumbnail in RGB: aspect kept, longest side <= max_side, never upscaled."""
    _check_image(image)
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side <= 0:
        raise ValueError(f"max_side must be a positive int, got {max_side!r}")
    _check_quality(quality)
    rgb = image.convert("RGB")
    target = thumbnail_size(rgb.width, rgb.height, max_side)
    if target != rgb.size:
        rgb = rgb.resize(target, THUMBNAIL_RESAMPLE, reducing_gap=THUMBNAIL_REDUCING_GAP)
    return _jpeg(rgb, quality, "4:2:0")


def derivatives(images: Sequence[Image.Image], size: int) -> tuple[list[bytes], list[bytes]]:
    """Model-resolution JPEGs and thumbnails for a batch, in input order, with the defaults."""
    model_images = [model_resolution_jpeg(im, size) for im in images]
    thumbnails = [thumbnail_jpeg(im) for im in images]
    return model_images, thumbnails
