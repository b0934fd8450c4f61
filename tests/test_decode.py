"""Hazards of decoding untrusted image bytes; every fixture is generated here, none committed."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from blip_ops.decode import (
    ALLOWED_FORMATS,
    DECODE_ERROR_REASONS,
    DEFAULT_MAX_PIXELS,
    BatchDecodeResult,
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    TooManyPixelsError,
    TruncatedImageError,
    UnsupportedFormatError,
    decode_batch,
    decode_image,
    gpu_jpeg_decoder_for,
    sniff_format,
)

HTML = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body></body></html>"


# ---------------------------------------------------------------- fixture builders


def _encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _jpeg(width: int = 64, height: int = 48, seed: int = 0, **kwargs: object) -> bytes:
    return _encode(_noise_rgb(width, height, seed), "JPEG", quality=90, **kwargs)


def _truncated_jpeg() -> bytes:
    data = _jpeg(256, 256)
    return data[: len(data) // 2]


def _cmyk_red_jpeg() -> bytes:
    # PIL writes CMYK JPEGs with an Adobe marker (inverted CMYK), the Photoshop convention.
    return _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)


def _exif_rotated_jpeg(orientation: int = 6) -> bytes:
    # Left half red, right half blue, so a wrong rotation changes pixels, not just the size.
    arr = np.zeros((40, 80, 3), dtype=np.uint8)  # (H, W, 3)
    arr[:, :40] = (255, 0, 0)
    arr[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def _handcrafted_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a tiny IDAT: no pixels are allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _png() -> bytes:
    return _encode(Image.new("RGB", (20, 10), (0, 128, 0)), "PNG")


def _decode_error(data: bytes, **kwargs: object) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    return info.value


# ---------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xd8\xff\xe0rest", "JPEG"),
        (b"\x89PNG\r\n\x1a\nrest", "PNG"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"GIF89a....", "GIF"),
        (b"GIF87a....", "GIF"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
        (HTML, None),
        (b"", None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


# ---------------------------------------------------------------- one test per hazard


def test_truncated_jpeg_is_an_error_not_a_grey_image() -> None:
    err = _decode_error(_truncated_jpeg())
    assert isinstance(err, TruncatedImageError)
    assert err.reason == "truncated_image"
    assert "truncated" in str(err)


def test_truncated_png_is_an_error() -> None:
    data = _encode(_noise_rgb(128, 128), "PNG")
    assert isinstance(_decode_error(data[: len(data) // 2]), TruncatedImageError)


@pytest.mark.skipif(not features.check("webp"), reason="PIL built without WebP")
def test_truncated_webp_is_an_error() -> None:
    data = _encode(_noise_rgb(64, 64), "WEBP", quality=80)
    assert isinstance(_decode_error(data[: len(data) // 2]), TruncatedImageError)


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (20_000, 20_000),  # 400 MP: above twice PIL's own limit, PIL raises
        (8_000, 6_000),  # 48 MP: under PIL's limit, only our max_pixels catches it
    ],
)
def test_decompression_bomb_png_fails_fast(width: int, height: int) -> None:
    data = _handcrafted_png(width, height)
    assert len(data) < 200
    start = time.perf_counter()
    err = _decode_error(data)
    elapsed = time.perf_counter() - start
    assert isinstance(err, TooManyPixelsError)
    assert err.reason == "too_many_pixels"
    assert elapsed < 1.0, f"took {elapsed:.2f} s: pixels were decoded before the limit check"


def test_pil_bomb_warning_becomes_an_error_without_touching_global_state() -> None:
    # 100 MP: over PIL's warning threshold (~89 MP) but under its error threshold, and under a
    # generous max_pixels, so only the warning-to-error conversion can reject it.
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    err = _decode_error(_handcrafted_png(10_000, 10_000), max_pixels=10**9)
    assert isinstance(err, TooManyPixelsError)
    assert "bomb" in str(err)
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert warnings.filters == filters_before


def test_max_pixels_is_configurable() -> None:
    data = _jpeg(64, 48)
    assert decode_image(data, max_pixels=64 * 48).size == (64, 48)
    assert isinstance(_decode_error(data, max_pixels=64 * 48 - 1), TooManyPixelsError)


def test_cmyk_jpeg_becomes_rgb_with_right_colours() -> None:
    data = _cmyk_red_jpeg()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    im = decode_image(data)
    assert im.mode == "RGB"
    r, g, b = np.asarray(im).reshape(-1, 3).mean(axis=0)
    assert r > 235 and g < 20 and b < 20, (r, g, b)


def test_16_bit_grayscale_png_keeps_the_high_byte() -> None:
    values = np.array([[0, 256, 1000, 32768, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B", "I;16L", "I")
    im = decode_image(data)
    assert im.mode == "RGB"
    got = np.asarray(im)[0, :, 0].tolist()
    # value >> 8; clipping to 255 would give [0, 255, 255, 255, 255]
    assert got == [0, 1, 3, 128, 255]
    assert (np.asarray(im)[..., 0] == np.asarray(im)[..., 2]).all()


def test_palette_png_transparency_becomes_white() -> None:
    im = Image.new("P", (4, 2), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # 0 black, 1 red
    im.paste(1, (2, 0, 4, 2))  # right half red
    data = _encode(im, "PNG", transparency=0)  # black is the transparent index
    out = np.asarray(decode_image(data))
    assert (out[:, :2] == (255, 255, 255)).all()  # transparent -> white, not black
    assert (out[:, 2:] == (255, 0, 0)).all()


def test_rgba_png_alpha_is_composited_over_white() -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)  # (H, W, RGBA)
    arr[:, 0] = (0, 0, 0, 0)  # fully transparent black
    arr[:, 1] = (0, 0, 0, 255)  # opaque black
    arr[:, 2] = (0, 0, 0, 128)  # half-transparent black
    out = np.asarray(decode_image(_encode(Image.fromarray(arr), "PNG")))
    assert (out[:, 0] == 255).all()
    assert (out[:, 1] == 0).all()
    assert (np.abs(out[:, 2].astype(int) - 127) <= 1).all()


def test_la_png_alpha_is_composited_over_white() -> None:
    im = Image.new("LA", (2, 2), (0, 0))
    out = np.asarray(decode_image(_encode(im, "PNG")))
    assert (out == 255).all()


def test_mpo_gives_its_first_frame() -> None:
    # Phones write multi-picture JPEGs; PIL reports them as format "MPO", not "JPEG".
    frames = [Image.new("RGB", (16, 8), (255, 0, 0)), Image.new("RGB", (16, 8), (0, 0, 255))]
    data = _encode(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
    assert sniff_format(data) == "JPEG"
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = np.asarray(decode_image(data))
    assert out.shape == (8, 16, 3)
    assert (np.abs(out.astype(int) - (255, 0, 0)) <= 3).all()


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = np.asarray(decode_image(data))
    assert (out == (255, 0, 0)).all()


def test_one_bit_png_becomes_rgb() -> None:
    im = Image.new("1", (4, 1), 0)
    im.putpixel((3, 0), 1)
    out = np.asarray(decode_image(_encode(im, "PNG")))
    assert out[0, :, 0].tolist() == [0, 0, 0, 255]


def test_empty_bytes() -> None:
    for data in (b"", bytearray(), None):
        err = _decode_error(data)  # type: ignore[arg-type]
        assert isinstance(err, EmptyImageError)
        assert err.reason == "empty_image"


def test_non_bytes_input_is_a_caller_bug() -> None:
    with pytest.raises(TypeError, match="got str"):
        decode_image("photo.jpg")  # type: ignore[arg-type]


def test_html_is_unsupported_and_the_message_shows_what_was_received() -> None:
    err = _decode_error(HTML)
    assert isinstance(err, UnsupportedFormatError)
    assert err.reason == "unsupported_format"
    assert "<!DOCTYPE html>" in str(err)
    assert "404 Not Found" not in str(err)  # only the first bytes, not the whole page


@pytest.mark.skipif(not features.check("libtiff"), reason="PIL built without TIFF")
def test_formats_outside_the_allowlist_are_refused() -> None:
    err = _decode_error(_encode(Image.new("RGB", (4, 4)), "TIFF"))
    assert isinstance(err, UnsupportedFormatError)


def test_garbage_behind_a_jpeg_magic_is_a_decode_error() -> None:
    rng = np.random.default_rng(1234)
    data = b"\xff\xd8\xff" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    err = _decode_error(data)
    assert isinstance(err, (TruncatedImageError, CorruptImageError))
    assert str(err)


def test_garbage_behind_a_png_magic_is_corrupt() -> None:
    err = _decode_error(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    assert isinstance(err, CorruptImageError)
    assert err.reason == "corrupt_image"


@pytest.mark.skipif(not features.check("webp"), reason="PIL built without WebP")
def test_webp_decodes() -> None:
    data = _encode(Image.new("RGB", (30, 20), (10, 200, 30)), "WEBP", lossless=True)
    im = decode_image(data)
    assert im.mode == "RGB"
    assert im.size == (30, 20)
    assert (np.asarray(im) == (10, 200, 30)).all()


@pytest.mark.skipif(not features.check("webp"), reason="PIL built without WebP")
def test_webp_with_alpha_goes_over_white() -> None:
    data = _encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "WEBP", lossless=True)
    assert (np.asarray(decode_image(data)) == 255).all()


def test_jpeg_draft_decodes_at_reduced_size_but_not_below_target() -> None:
    data = _jpeg(2000, 1500)
    small = decode_image(data, target_size=384)
    assert small.mode == "RGB"
    assert small.size[0] < 2000 and small.size[1] < 1500
    assert min(small.size) >= 384
    assert decode_image(data).size == (2000, 1500)


def test_draft_is_ignored_for_png() -> None:
    data = _encode(Image.new("RGB", (800, 600)), "PNG")
    assert decode_image(data, target_size=100).size == (800, 600)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    data = _exif_rotated_jpeg(orientation)
    im = decode_image(data)
    assert im.size == (40, 80)  # stored 80x40, rotated a quarter turn
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(im), np.asarray(expected))


def test_exif_orientation_after_draft() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_noise_rgb(1600, 800), "JPEG", exif=exif.tobytes())
    im = decode_image(data, target_size=200)
    # draft scales the stored 1600x800 by 1/4, then the rotation swaps the sides
    assert im.size == (200, 400)


def test_max_bytes() -> None:
    data = _jpeg()
    assert decode_image(data, max_bytes=len(data)).size == (64, 48)
    err = _decode_error(data, max_bytes=len(data) - 1)
    assert isinstance(err, ImageTooLargeError)
    assert err.reason == "image_too_large"
    assert str(len(data)) in str(err)


def test_decoded_image_is_plain_rgb_and_loaded() -> None:
    im = decode_image(_jpeg())
    assert im.mode == "RGB"
    assert im.format in (None, "JPEG")
    np.asarray(im)  # fully loaded: reading pixels needs no file
    assert getattr(im, "fp", None) is None


# ---------------------------------------------------------------- error contract


_ERROR_CASES: dict[str, tuple[Callable[[], bytes], dict[str, object], type[ImageDecodeError]]] = {
    "empty": (lambda: b"", {}, EmptyImageError),
    "html": (lambda: HTML, {}, UnsupportedFormatError),
    "bomb": (lambda: _handcrafted_png(20_000, 20_000), {}, TooManyPixelsError),
    "truncated": (_truncated_jpeg, {}, TruncatedImageError),
    "corrupt": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, {}, CorruptImageError),
    "too_large": (_jpeg, {"max_bytes": 10}, ImageTooLargeError),
}


@pytest.mark.parametrize("case", sorted(_ERROR_CASES))
def test_every_error_has_a_documented_reason(case: str) -> None:
    build, kwargs, expected = _ERROR_CASES[case]
    err = _decode_error(build(), **kwargs)
    assert type(err) is expected
    assert isinstance(err, ImageDecodeError) and isinstance(err, ValueError)
    assert err.reason and err.reason in DECODE_ERROR_REASONS
    assert err.reason == expected.reason
    assert str(err)


def test_documented_reasons() -> None:
    assert set(DECODE_ERROR_REASONS) == {
        "empty_image",
        "unsupported_format",
        "too_many_pixels",
        "truncated_image",
        "corrupt_image",
        "image_too_large",
    }
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF")
    assert DEFAULT_MAX_PIXELS == 40_000_000


# ---------------------------------------------------------------- batch and GPU routing


def _error_types(result: BatchDecodeResult) -> list[type | None]:
    return [type(e) if e is not None else None for e in result.errors]


def test_decode_batch_cpu_keeps_positions() -> None:
    datas = [_jpeg(), _png(), _truncated_jpeg(), HTML]
    result = decode_batch(datas)
    assert result.gpu_decoded == 0
    assert len(result.images) == len(result.errors) == 4
    assert isinstance(result.images[0], Image.Image) and result.images[0].size == (64, 48)
    assert isinstance(result.images[1], Image.Image) and result.images[1].size == (20, 10)
    assert result.images[2] is None and result.images[3] is None
    assert _error_types(result) == [None, None, TruncatedImageError, UnsupportedFormatError]


def test_decode_batch_applies_target_size() -> None:
    result = decode_batch([_jpeg(2000, 1500)], target_size=384)
    assert result.images[0] is not None and min(result.images[0].size) >= 384
    assert result.images[0].size[0] < 2000


class _FakeGpuDecoder:
    """Decodes with PIL into (3, H, W) uint8 tensors and records what it was asked to decode."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[bytes]] = []
        self.fail = fail

    def __call__(self, datas: list[bytes]) -> list:
        import torch

        self.calls.append(list(datas))
        if self.fail:
            raise RuntimeError("nvjpeg: simulated failure")
        out = []
        for d in datas:
            arr = np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))  # (H, W, 3)
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())  # (3, H, W)
        return out


def _routing_inputs() -> tuple[list[bytes], list[int]]:
    gray_jpeg = _encode(Image.new("L", (32, 16), 77), "JPEG")
    mpo = _encode(
        Image.new("RGB", (16, 8), (255, 0, 0)),
        "MPO",
        save_all=True,
        append_images=[Image.new("RGB", (16, 8), (0, 0, 255))],
    )
    datas = [
        _jpeg(64, 48, seed=1),  # 0 plain RGB
        _cmyk_red_jpeg(),  # 1 CMYK
        _exif_rotated_jpeg(6),  # 2 rotated
        _truncated_jpeg(),  # 3 truncated
        _png(),  # 4 PNG
        gray_jpeg,  # 5 plain grayscale
        _jpeg(64, 48, seed=2, progressive=True),  # 6 progressive
        HTML,  # 7
        _handcrafted_png(20_000, 20_000),  # 8 bomb
        mpo,  # 9 multi-picture JPEG
    ]
    return datas, [0, 5]


def test_decode_batch_routes_only_plain_jpegs_to_the_gpu() -> None:
    torch = pytest.importorskip("torch")
    datas, plain = _routing_inputs()
    fake = _FakeGpuDecoder()
    result = decode_batch(datas, gpu_jpeg_decoder=fake)

    assert len(fake.calls) == 1
    assert fake.calls[0] == [datas[i] for i in plain]
    assert result.gpu_decoded == len(plain)
    for i, image in enumerate(result.images):
        if i in plain:
            assert isinstance(image, torch.Tensor)
            assert image.dtype == torch.uint8 and image.shape[0] == 3
        else:
            assert image is None or isinstance(image, Image.Image)
    assert tuple(result.images[5].shape) == (3, 16, 32)
    assert result.images[2].size == (40, 80)  # rotated on the CPU path
    cpu = decode_batch(datas)
    assert _error_types(result) == _error_types(cpu)
    assert _error_types(cpu)[3] is TruncatedImageError
    assert _error_types(cpu)[8] is TooManyPixelsError
    assert isinstance(result.images[9], Image.Image)


def test_decode_batch_falls_back_when_the_gpu_decoder_fails() -> None:
    pytest.importorskip("torch")
    datas, plain = _routing_inputs()
    fake = _FakeGpuDecoder(fail=True)
    result = decode_batch(datas, gpu_jpeg_decoder=fake)
    assert len(fake.calls) == 1 and len(fake.calls[0]) == len(plain)
    assert result.gpu_decoded == 0
    assert all(im is None or isinstance(im, Image.Image) for im in result.images)
    assert all(result.images[i] is not None for i in plain)
    cpu = decode_batch(datas)
    assert _error_types(result) == _error_types(cpu)
    for got, want in zip(result.images, cpu.images, strict=True):
        if want is not None:
            assert np.array_equal(np.asarray(got), np.asarray(want))


def test_decode_batch_falls_back_when_the_gpu_decoder_returns_too_few() -> None:
    datas, plain = _routing_inputs()
    result = decode_batch(datas, gpu_jpeg_decoder=lambda batch: [])
    assert result.gpu_decoded == 0
    assert all(result.images[i] is not None for i in plain)


def test_decode_batch_respects_limits_before_the_gpu() -> None:
    pytest.importorskip("torch")
    data = _jpeg(64, 48)
    fake = _FakeGpuDecoder()
    result = decode_batch([data, data], gpu_jpeg_decoder=fake, max_bytes=len(data) - 1)
    assert fake.calls == []
    assert _error_types(result) == [ImageTooLargeError, ImageTooLargeError]
    result = decode_batch([data], gpu_jpeg_decoder=fake, max_pixels=100)
    assert fake.calls == []
    assert _error_types(result) == [TooManyPixelsError]


def test_no_gpu_decoder_on_cpu() -> None:
    assert gpu_jpeg_decoder_for("cpu") is None
    assert gpu_jpeg_decoder_for("mps") is None


def test_decode_module_does_not_import_torch() -> None:
    # Load decode.py on its own so the check is about this module, whatever the package's
    # __init__ imports.
    path = Path(__file__).resolve().parents[1] / "blip_ops" / "decode.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('blip_decode_isolated', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.decode_batch([b'\\xff\\xd8\\xff'])\n"
        "module.gpu_jpeg_decoder_for('cpu')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
