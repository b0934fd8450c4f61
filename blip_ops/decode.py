"""Safe decoding of untrusted image bytes into RGB images.

Catalog images come from merchants and crawlers, so every byte string is treated as hostile:
formats are allow-listed by magic bytes, the pixel count is checked from the header before any
pixel is decoded (decompression bombs), truncated files are errors rather than grey-filled
images, and every failure is a typed `ImageDecodeError` whose `reason` the index job stores in
its rejects table.

Only stdlib, numpy and PIL are imported at module load: CPU workers never need torch or
torchvision. The optional GPU JPEG path (`gpu_jpeg_decoder_for`) imports them lazily.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
"""Refuse images whose header declares more than this many pixels (w*h): a 40 MP RGB image is
already 120 MB decoded, and larger ones are almost always decompression bombs, not products."""

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")

_PREVIEW_BYTES = 16  # how many leading bytes an error message shows
_JPEG_EOI = b"\xff\xd9"
_EXIF_ORIENTATION_TAG = 0x0112
_WHITE = (255, 255, 255)
# Modes PIL produces for 16-bit grayscale PNGs; "I" is what older Pillow used for them.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(ValueError):
    """Base class of decode failures.

    `reason` is a short, stable snake_case key stored in the rejects table; `str(err)` is a human
    message saying what was received.
    """

    reason: str = "decode_error"


class EmptyImageError(ImageDecodeError):
    reason = "empty_image"


class UnsupportedFormatError(ImageDecodeError):
    reason = "unsupported_format"


class TooManyPixelsError(ImageDecodeError):
    reason = "too_many_pixels"


class TruncatedImageError(ImageDecodeError):
    reason = "truncated_image"


class CorruptImageError(ImageDecodeError):
    reason = "corrupt_image"


class ImageTooLargeError(ImageDecodeError):
    reason = "image_too_large"


DECODE_ERROR_REASONS: tuple[str, ...] = tuple(
    cls.reason
    for cls in (
        EmptyImageError,
        UnsupportedFormatError,
        TooManyPixelsError,
        TruncatedImageError,
        CorruptImageError,
        ImageTooLargeError,
    )
)
"""Every `reason` decode_image / decode_batch can report."""

# Failures PIL's plugins and decoders raise on malformed input (fuzzing has found all of these).
# MemoryError is left out on purpose: under the pixel limit it is a resource problem, not a bad
# image. Only the parse/decode steps are wrapped with this list, so bugs in our own conversion
# code are not filed as corrupt images.
_PIL_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    TypeError,
    KeyError,
)


def _preview(data: bytes | bytearray | memoryview) -> str:
    head = bytes(data[:_PREVIEW_BYTES])
    return repr(head) + ("..." if len(data) > _PREVIEW_BYTES else "")


def sniff_format(data: bytes) -> str | None:
    """Return "JPEG", "PNG", "WEBP" or "GIF" from the magic bytes, or None for anything else."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    return None


def _check_bytes(data: Any, max_bytes: int | None) -> tuple[bytes | bytearray | memoryview, str]:
    """Cheap checks that need no parsing; returns the data and its sniffed format."""
    if data is None or (isinstance(data, (bytes, bytearray, memoryview)) and len(data) == 0):
        raise EmptyImageError(f"expected image bytes, got {data!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        # A caller bug (a path or a str), not a bad image: don't bury it in the rejects table.
        raise TypeError(f"expected image bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(f"image is {len(data)} bytes, limit is max_bytes={max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError(
            f"expected one of {'/'.join(ALLOWED_FORMATS)} image bytes, got {len(data)} bytes "
            f"starting with {_preview(data)}"
        )
    if fmt == "WEBP":
        # RIFF declares the payload size; libwebp refuses a short file with an opaque
        # "could not create decoder object", so name the real problem here.
        declared = int.from_bytes(bytes(data[4:8]), "little") + 8
        if len(data) < declared:
            raise TruncatedImageError(
                f"WEBP header declares {declared} bytes, got only {len(data)}"
            )
    return data, fmt


def _open_header(data: bytes | bytearray | memoryview, fmt: str, max_pixels: int) -> Image.Image:
    """Open (header only, no pixel decoding) and enforce the pixel limit."""
    try:
        # PIL warns between MAX_IMAGE_PIXELS and twice that, and only raises above; turn the
        # warning into an error locally rather than changing PIL's process-wide limit.
        # (catch_warnings is process-global state; the window is only the header parse.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooManyPixelsError(f"{fmt} image refused by PIL's bomb check: {e}") from e
    except _PIL_DECODE_ERRORS as e:
        raise CorruptImageError(
            f"{fmt} header could not be parsed ({type(e).__name__}: {e}); "
            f"got {len(data)} bytes starting with {_preview(data)}"
        ) from e
    if im.format != fmt and not (fmt == "JPEG" and im.format == "MPO"):
        # MPO (multi-picture JPEG from phones and 3D cameras) starts with an ordinary JPEG
        # frame, and PIL's JPEG plugin hands those back as format "MPO".
        raise CorruptImageError(f"magic bytes say {fmt} but PIL parsed {im.format}")
    width, height = im.size
    if width * height > max_pixels:
        raise TooManyPixelsError(
            f"{fmt} header declares {width}x{height} = {width * height} pixels, "
            f"limit is max_pixels={max_pixels}"
        )
    return im


def _exif_orientation(im: Image.Image) -> int:
    """EXIF orientation (1..8), 1 when absent or unreadable.

    Malformed EXIF is common in the wild and says nothing about the pixels, so it is not a
    reason to reject the image.
    """
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except _PIL_DECODE_ERRORS as e:
        logger.debug("ignoring unreadable EXIF (%s: %s)", type(e).__name__, e)
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _over_white(rgba: Image.Image) -> Image.Image:
    # Product shots with transparent backgrounds are shown on white, and BLIP never saw alpha.
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def _sixteen_bit_to_rgb(im: Image.Image) -> Image.Image:
    values = np.asarray(im)  # (H, W) uint16 (any byte order) or int32 for mode "I"
    # Keep the high byte: PIL's own I;16 -> L conversion clips at 255, which turns most of a
    # 16-bit image white.
    gray = (np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)  # (H, W)
    rgb = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))  # (H, W, 3)
    transparency = im.info.get("transparency")
    if isinstance(transparency, int):
        alpha = Image.fromarray(np.where(values == transparency, 0, 255).astype(np.uint8))
        rgb.putalpha(alpha)
        return _over_white(rgb)
    return rgb


def _has_transparency(im: Image.Image) -> bool:
    # tRNS chunks and GIF transparent indices live in info; PNG palettes may carry alpha.
    if "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode.endswith("A")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(im)
    if mode == "F":
        values = np.asarray(im)  # (H, W) float32, PIL's convention is 0..255
        gray = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in _ALPHA_MODES or _has_transparency(im):
        if mode == "La":  # premultiplied; PIL has no direct La -> RGBA
            im = im.convert("LA")
        return _over_white(im.convert("RGBA"))
    # CMYK (Adobe-inverted JPEGs are already un-inverted by PIL's decoder), P, L, 1, YCbCr, LAB...
    return im.convert("RGB")


def decode_image(
    data: bytes,
    *,
    target_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
) -> Image.Image:
    """Decode untrusted bytes into a fully loaded RGB image.

    target_size: when given, JPEGs are decoded at a reduced scale (libjpeg DCT scaling, 1/2, 1/4
        or 1/8) that keeps both sides >= target_size; other formats decode at full size. The
        caller still resizes.
    max_pixels: refuse images whose header declares more than this many pixels (w*h).
    max_bytes: refuse inputs longer than this many bytes.

    Animated GIF/WebP give their first frame; EXIF orientation is applied; alpha is composited
    over white. Raises an `ImageDecodeError` subclass (see `DECODE_ERROR_REASONS`).
    """
    if target_size is not None and target_size <= 0:
        raise ValueError(f"target_size must be a positive int or None, got {target_size!r}")
    data, fmt = _check_bytes(data, max_bytes)
    im = _open_header(data, fmt, max_pixels)
    try:
        if fmt == "JPEG" and target_size is not None:
            # Must precede load(): draft picks the DCT scale the decoder runs at.
            im.draft("RGB", (target_size, target_size))
        im.load()  # first frame only for GIF/WebP: nothing seeks further
        orientation = _exif_orientation(im)
        if orientation != 1:
            # After load: transposing needs pixels, and draft has already shrunk them.
            im = ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooManyPixelsError(f"{fmt} image refused by PIL's bomb check: {e}") from e
    except _PIL_DECODE_ERRORS as e:
        message = f"{fmt} {im.size[0]}x{im.size[1]} {im.mode} ({len(data)} bytes): {e}"
        if isinstance(e, OSError) and "truncated" in str(e):
            raise TruncatedImageError(message) from e
        raise CorruptImageError(f"{message} ({type(e).__name__})") from e
    try:
        return _to_rgb(im)
    except (ValueError, OSError) as e:  # a mode PIL cannot convert ("conversion ... not supported")
        raise CorruptImageError(
            f"{fmt} {im.size[0]}x{im.size[1]} image in mode {im.mode} cannot become RGB: {e}"
        ) from e


@dataclass
class BatchDecodeResult:
    """Per-input results of `decode_batch`, in input order."""

    images: list[Image.Image | torch.Tensor | None]  # RGB PIL image, or (3, H, W) uint8 tensor
    # on the GPU for JPEGs the GPU decoder handled; None where decoding failed
    errors: list[ImageDecodeError | None]  # the failure for each input, None where it worked
    gpu_decoded: int  # how many inputs went through the GPU decoder


GpuJpegDecoder = Callable[[list[bytes]], "list[torch.Tensor]"]


def gpu_jpeg_decoder_for(device: str) -> GpuJpegDecoder | None:
    """A batched nvJPEG decoder for `device`, or None when the GPU path is unavailable.

    The returned function maps a list of JPEG byte strings to (3, H, W) uint8 RGB tensors on
    `device`. None unless `device` is CUDA, torch sees a GPU and torchvision imports.
    """
    if not device.startswith("cuda"):
        return None
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError) as e:
        # RuntimeError: a torchvision built for another torch fails while registering its ops.
        logger.debug("GPU JPEG decoding unavailable, torchvision did not import: %s", e)
        return None
    if not torch.cuda.is_available():
        logger.debug("GPU JPEG decoding unavailable: torch.cuda.is_available() is False")
        return None

    def decode(datas: list[bytes]) -> list[torch.Tensor]:
        # bytearray: torch.frombuffer warns on read-only buffers such as bytes.
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        return decode_jpeg(encoded, device=device, mode=ImageReadMode.RGB)  # [(3, H, W)]

    return decode


def _is_plain_jpeg(data: Any, max_pixels: int, max_bytes: int | None) -> bool:
    """Whether nvJPEG can decode `data` to the same result decode_image would give.

    Anything doubtful returns False and takes the CPU path, which produces the typed error.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        return False
    if max_bytes is not None and len(data) > max_bytes:
        return False
    # The EOI test is the cheap truncation check: nvJPEG may return a partly grey image
    # where PIL raises.
    if sniff_format(data) != "JPEG" or bytes(data[-2:]) != _JPEG_EOI:
        return False
    try:
        im = _open_header(data, "JPEG", max_pixels)
    except ImageDecodeError:
        return False
    # CMYK needs PIL's Adobe handling, rotated images need exif_transpose, progressive scans
    # are not reliably supported by nvJPEG's batched decoder, and MPO holds several JPEGs.
    return (
        im.format == "JPEG"
        and im.mode in ("RGB", "L")
        and not im.info.get("progressive")
        and _exif_orientation(im) == 1
    )


def decode_batch(
    datas: Sequence[bytes],
    *,
    target_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    device: str = "cpu",
    gpu_jpeg_decoder: GpuJpegDecoder | None = None,
) -> BatchDecodeResult:
    """Decode many inputs, never raising for a bad image: failures land in `errors`.

    Plain JPEGs (baseline RGB/L, no EXIF rotation, complete, within the limits) go to the GPU
    decoder in one call, full size and not drafted; everything else goes through `decode_image`.
    `gpu_jpeg_decoder` defaults to `gpu_jpeg_decoder_for(device)`, which is None on CPU, so the
    CPU path imports no torch. If the GPU decoder fails for the batch, its items are decoded by
    `decode_image` instead, so error typing is the same either way.
    """
    decoder = gpu_jpeg_decoder if gpu_jpeg_decoder is not None else gpu_jpeg_decoder_for(device)
    n = len(datas)
    images: list[Image.Image | torch.Tensor | None] = [None] * n
    errors: list[ImageDecodeError | None] = [None] * n
    gpu_decoded = 0

    gpu_indices: list[int] = []
    if decoder is not None:
        gpu_indices = [i for i, d in enumerate(datas) if _is_plain_jpeg(d, max_pixels, max_bytes)]
    if decoder is not None and gpu_indices:
        try:
            decoded = list(decoder([bytes(datas[i]) for i in gpu_indices]))
            if len(decoded) != len(gpu_indices):
                raise RuntimeError(
                    f"GPU decoder returned {len(decoded)} images for {len(gpu_indices)} inputs"
                )
        except Exception as e:  # any GPU failure (nvJPEG, OOM, driver) takes the safe path
            logger.warning(
                "GPU JPEG decode failed for a batch of %d, decoding on CPU instead: %s: %s",
                len(gpu_indices),
                type(e).__name__,
                e,
            )
            gpu_indices = []
        else:
            for i, tensor in zip(gpu_indices, decoded, strict=True):
                images[i] = tensor
            gpu_decoded = len(gpu_indices)

    on_gpu = set(gpu_indices)
    for i, data in enumerate(datas):
        if i in on_gpu:
            continue
        try:
            images[i] = decode_image(
                data, target_size=target_size, max_pixels=max_pixels, max_bytes=max_bytes
            )
        except ImageDecodeError as e:
            errors[i] = e
    return BatchDecodeResult(images=images, errors=errors, gpu_decoded=gpu_decoded)
