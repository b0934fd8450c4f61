"""Fuzzing the safe image decoder (``blip_ops.decode``) with Hypothesis.

Two properties, on inputs generated here (none committed):

1. **Valid images decode.** Random sizes and modes, encoded as PNG, JPEG (baseline, progressive,
   CMYK, EXIF-rotated), WebP (lossy, lossless, alpha) and GIF (transparent, animated): each becomes
   a loaded RGB image of the expected size, also through the JPEG draft path.
2. **Hostile bytes fail cleanly.** Those encodings mutated (bit flips, overwritten and inserted
   bytes, cut ranges, truncations, another format's header spliced on, huge or zero declared
   dimensions in the PNG/GIF/JPEG/WebP headers, repeated slices): the decoder returns an RGB image
   within the pixel limit or raises one of its typed errors (a documented ``reason``), never any
   other exception; so does the query path's ``decode_query_image`` (a ``BadRequest``) and
   ``decode_batch`` with a GPU decoder plugged in. Each example's time is bounded, and so is the
   process's peak memory over the run.

Deterministic (``derandomize``, no example database) and bounded: the example counts below are
the whole cost (about 10 s on 2 cores); each test prints what it ran.
"""

from __future__ import annotations

import base64
import io
import os
import resource
import struct
import sys
import time
import zlib
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blip_ops.decode import (
    DECODE_ERROR_REASONS,
    ImageDecodeError,
    decode_batch,
    decode_image,
)
from pipelines.search.request import BadRequest, Limits, decode_query_image

# BLIP_FUZZ_SCALE=20 runs twenty times as many (a longer local fuzz; CI runs the default).
SCALE = float(os.environ.get("BLIP_FUZZ_SCALE", "1"))
GENERATED_EXAMPLES = int(300 * SCALE)
MUTATED_EXAMPLES = int(1500 * SCALE)
# A lower limit than the default 40 MP keeps a header that declares "just under the limit" cheap
# to honour; the limit itself is what is under test, not its value.
FUZZ_MAX_PIXELS = 1_000_000
FUZZ_MAX_BYTES = 2_000_000
MAX_SECONDS_PER_EXAMPLE = 5.0  # ~10 ms is typical; generous for a loaded 2-core CI machine
MAX_RSS_GROWTH_MB = 300  # the whole run's peak RSS over the process's peak before it

# PIL warns (and carries on) about malformed EXIF; decode_image then ignores the orientation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Corrupt EXIF data:UserWarning", "ignore:Tag data larger than file:UserWarning"
)

FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,  # time is checked by the test itself, with a CI-sized bound
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Modes each format is saved from (PIL converts where the format needs it).
MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
    "GIF": ["L", "P", "RGB"],
}


def _pixels(mode: str, width: int, height: int, seed: int, smooth: bool) -> Image.Image:
    """An image of ``mode``: noise, or a smooth gradient (compresses well, as photos do)."""
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    if smooth:
        ramp = np.linspace(0, 255, width * height * bands) % 256
        base = ramp.reshape(height, width, bands).astype(np.uint8)  # (H, W, C)
    else:
        base = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)  # (H, W, C)
    if mode == "I;16":
        wide = (base[:, :, 0].astype(np.uint16) * 257).astype("<u2")  # (H, W) 16-bit range
        return Image.frombytes("I;16", (width, height), wide.tobytes())
    if mode == "1":
        return Image.fromarray(base[:, :, 0] > 127)
    if mode == "P":
        im = Image.fromarray(base[:, :, 0], "L").convert("P")
        im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return im
    if bands == 1:
        return Image.fromarray(base[:, :, 0], "L")
    return Image.frombytes(mode, (width, height), base.tobytes())


@st.composite
def encoded_images(draw, max_side: int = 96):
    """``(bytes, format, (width, height) expected after decoding, frames)``."""
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    width = draw(st.integers(1, max_side))
    height = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**16))
    im = _pixels(mode, width, height, seed, smooth=draw(st.booleans()))
    kwargs: dict = {}
    size = (width, height)
    frames = 1
    if fmt == "PNG":
        kwargs["compress_level"] = draw(st.integers(0, 9))
        if mode in ("L", "P") and draw(st.booleans()):
            kwargs["transparency"] = draw(st.integers(0, 255))
        if mode == "RGB" and draw(st.booleans()):
            kwargs["transparency"] = (0, 0, 0)
    elif fmt == "JPEG":
        kwargs["quality"] = draw(st.integers(5, 95))
        kwargs["progressive"] = draw(st.booleans())
        if mode == "RGB":
            kwargs["subsampling"] = draw(st.sampled_from([0, 1, 2]))
        orientation = draw(st.integers(1, 8))
        if orientation != 1:
            exif = Image.Exif()
            exif[0x0112] = orientation
            kwargs["exif"] = exif.tobytes()
            if orientation >= 5:  # transposed
                size = (height, width)
    elif fmt == "WEBP":
        kwargs["lossless"] = draw(st.booleans())
        kwargs["quality"] = draw(st.integers(5, 95))
    elif fmt == "GIF":
        if mode == "P" and draw(st.booleans()):
            kwargs["transparency"] = draw(st.integers(0, 255))
        frames = draw(st.integers(1, 3))
        if frames > 1:
            more = [_pixels(mode, width, height, seed + i, smooth=False) for i in range(1, frames)]
            kwargs.update(save_all=True, append_images=more, duration=50, loop=0)
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue(), fmt, size, frames


# ---------------------------------------------------------------- mutations
def _find(data: bytes, marker: bytes, start: int = 0) -> int:
    i = data.find(marker, start)
    return i if i >= 0 else len(data)


def _put(data: bytearray, at: int, value: bytes) -> bytearray:
    if at + len(value) <= len(data):
        data[at : at + len(value)] = value
    return data


def _declare_size(data: bytearray, fmt: str, width: int, height: int) -> bytearray:
    """Overwrite the dimensions the header declares (what a decompression bomb lies about)."""
    if fmt == "PNG":  # IHDR: 8-byte signature, length, "IHDR", width, height (big-endian), ..., CRC
        _put(data, 16, struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF))
        return _put(data, 29, struct.pack(">I", zlib.crc32(bytes(data[12:29]))))  # as a bomb would
    if fmt == "GIF":  # logical screen (6..10), then the first image descriptor's size
        _put(data, 6, struct.pack("<HH", width & 0xFFFF, height & 0xFFFF))
        at = _find(bytes(data), b"\x2c", 13)
        return _put(data, at + 5, struct.pack("<HH", width & 0xFFFF, height & 0xFFFF))
    if fmt == "JPEG":  # SOF0/SOF2: FF C0|C2, length(2), precision(1), height(2), width(2)
        raw = bytes(data)
        at = min(_find(raw, b"\xff\xc0"), _find(raw, b"\xff\xc2"))
        return _put(data, at + 5, struct.pack(">HH", height & 0xFFFF, width & 0xFFFF))
    if fmt == "WEBP":
        raw = bytes(data)
        if raw[12:16] == b"VP8X":  # canvas size, 24-bit minus one
            w, h = (max(width, 1) - 1) & 0xFFFFFF, (max(height, 1) - 1) & 0xFFFFFF
            return _put(data, 24, w.to_bytes(3, "little") + h.to_bytes(3, "little"))
        if raw[12:16] == b"VP8L":  # 14-bit width-1, 14-bit height-1 after the 0x2f signature
            bits = ((max(width, 1) - 1) & 0x3FFF) | (((max(height, 1) - 1) & 0x3FFF) << 14)
            return _put(data, 21, bits.to_bytes(4, "little"))
        if raw[12:16] == b"VP8 ":  # 14-bit sizes after the 3-byte start code
            return _put(data, 26, struct.pack("<HH", width & 0x3FFF, height & 0x3FFF))
    return data


MAGICS = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP", b"GIF89a"]
DIMENSIONS = [0, 1, 999, 1001, 4096, 65535, 2**24 - 1, 2**31 - 1, 2**32 - 1]


@st.composite
def mutations(draw):
    """One mutation: ``(name, function of (bytearray, format) -> bytearray)``."""
    kind = draw(
        st.sampled_from(
            ["flip", "overwrite", "insert", "delete", "truncate", "splice", "dims", "repeat"]
        )
    )
    pos = draw(st.integers(0, 2**20))
    if kind == "flip":
        bit = draw(st.integers(0, 7))

        def flip(b, _fmt):
            if b:
                b[pos % len(b)] ^= 1 << bit
            return b

        return kind, flip
    if kind == "overwrite":
        junk = draw(st.binary(min_size=1, max_size=16))
        return kind, lambda b, _fmt: _put(b, pos % max(len(b), 1), junk)
    if kind == "insert":
        junk = draw(st.binary(min_size=1, max_size=64))
        return kind, lambda b, _fmt: b[: pos % (len(b) + 1)] + junk + b[pos % (len(b) + 1) :]
    if kind == "delete":
        n = draw(st.integers(1, 256))
        return kind, lambda b, _fmt: b[: pos % (len(b) + 1)] + b[pos % (len(b) + 1) + n :]
    if kind == "truncate":
        return kind, lambda b, _fmt: b[: pos % (len(b) + 1)]
    if kind == "splice":  # another format's header on this body
        magic = draw(st.sampled_from(MAGICS))
        return kind, lambda b, _fmt: bytearray(magic) + b[len(magic) :]
    if kind == "dims":
        width = draw(st.sampled_from(DIMENSIONS))
        height = draw(st.sampled_from(DIMENSIONS))
        return kind, lambda b, fmt: _declare_size(b, fmt, width, height)
    n = draw(st.integers(1, 512))  # repeat: a slice doubled (duplicate chunks and markers)
    return kind, lambda b, _fmt: b[: pos % (len(b) + 1) + n] + b[pos % (len(b) + 1) :]


@st.composite
def mutated_images(draw):
    data, fmt, _size, _frames = draw(encoded_images(max_side=48))
    applied = draw(st.lists(mutations(), min_size=1, max_size=4))
    out = bytearray(data)
    for _name, mutate in applied:
        out = mutate(out, fmt)
    return bytes(out), fmt, [name for name, _ in applied]


# ---------------------------------------------------------------- checks
def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _check_decoded(im: Image.Image) -> None:
    assert isinstance(im, Image.Image) and im.mode == "RGB"
    assert im.size[0] * im.size[1] <= FUZZ_MAX_PIXELS
    im.load()
    assert len(im.tobytes()) == im.size[0] * im.size[1] * 3


def _outcome(data: bytes, **kwargs) -> str:
    """``"ok"`` or the typed error's reason; any other exception propagates (and fails)."""
    try:
        im = decode_image(data, max_pixels=FUZZ_MAX_PIXELS, max_bytes=FUZZ_MAX_BYTES, **kwargs)
    except ImageDecodeError as err:
        assert err.reason in DECODE_ERROR_REASONS, err
        assert str(err), "an error says what was received"
        return err.reason
    _check_decoded(im)
    return "ok"


class _Report:
    def __init__(self) -> None:
        self.examples = 0
        self.outcomes: Counter = Counter()
        self.mutations: Counter = Counter()
        self.slowest = 0.0
        self.rss_before = _peak_rss_mb()

    def timed(self, started: float) -> None:
        seconds = time.perf_counter() - started
        self.slowest = max(self.slowest, seconds)
        assert seconds < MAX_SECONDS_PER_EXAMPLE, f"one example took {seconds:.1f} s"

    def finish(self, capsys, name: str, want: int) -> None:
        growth = _peak_rss_mb() - self.rss_before
        with capsys.disabled():
            print(
                f"\n{name}: {self.examples} examples, outcomes {dict(self.outcomes)}, "
                + (f"mutations {dict(self.mutations)}, " if self.mutations else "")
                + f"slowest {self.slowest * 1000:.0f} ms, peak RSS growth {growth:.0f} MB"
            )
        assert self.examples >= want  # Hypothesis ran the examples asked for
        assert growth < MAX_RSS_GROWTH_MB, f"peak RSS grew by {growth:.0f} MB"


# ---------------------------------------------------------------- tests
def test_generated_images_decode_to_rgb(capsys):
    report = _Report()

    @settings(FUZZ_SETTINGS, max_examples=GENERATED_EXAMPLES)
    @given(encoded_images(), st.sampled_from([None, 16, 64]))
    def check(image, target_size):
        data, fmt, size, _frames = image
        started = time.perf_counter()
        im = decode_image(data, max_pixels=FUZZ_MAX_PIXELS, target_size=target_size)
        report.timed(started)
        _check_decoded(im)
        if fmt == "JPEG" and target_size is not None:
            # draft: reduced by a power of two, never below the target (nor above full size)
            assert im.size[0] <= size[0] and im.size[1] <= size[1]
            assert min(im.size) >= min(target_size, *size) or min(size) < target_size
        else:
            assert im.size == size, (fmt, im.size, size)
        report.examples += 1
        report.outcomes[fmt] += 1

    check()
    report.finish(capsys, "decode fuzz, generated", GENERATED_EXAMPLES)


class _FakeGpu:
    """Stands in for nvJPEG in ``decode_batch``: one placeholder per input it is given."""

    def __call__(self, datas: list[bytes]) -> list:
        return [("gpu", len(d)) for d in datas]


def test_mutated_bytes_fail_only_with_typed_errors(capsys):
    report = _Report()
    limits = Limits(max_image_pixels=FUZZ_MAX_PIXELS, max_image_bytes=FUZZ_MAX_BYTES)

    @settings(FUZZ_SETTINGS, max_examples=MUTATED_EXAMPLES)
    @given(mutated_images())
    def check(mutated):
        data, _fmt, applied = mutated
        started = time.perf_counter()
        outcome = _outcome(data)
        if outcome == "ok" or outcome == "truncated_image":
            _outcome(data, target_size=32)  # the JPEG draft path on the same bytes
        report.timed(started)
        # the service's query path: base64 in, an image or a 400 out
        try:
            _check_decoded(decode_query_image(base64.b64encode(data).decode(), limits))
        except BadRequest as err:
            assert err.status == 400, err
            assert "could not be decoded" in str(err) or "is empty" in str(err), err
        # the index job's batch path, with a GPU decoder plugged in: never raises
        batch = decode_batch(
            [data],
            max_pixels=FUZZ_MAX_PIXELS,
            max_bytes=FUZZ_MAX_BYTES,
            gpu_jpeg_decoder=_FakeGpu(),
        )
        error = batch.errors[0]
        assert (batch.images[0] is None) == (error is not None)
        assert error is None or error.reason in DECODE_ERROR_REASONS
        report.examples += 1
        report.outcomes[outcome] += 1
        report.mutations.update(applied)

    check()
    report.finish(capsys, "decode fuzz, mutated", MUTATED_EXAMPLES)
    # the mutations reach both sides: some inputs still decode, most are refused, for reasons
    assert report.outcomes["ok"] > 0 and len(report.outcomes) >= 3, report.outcomes


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "JPEG", "WEBP"])
def test_huge_declared_dimensions_are_refused_before_decoding(fmt):
    """The 'dims' mutation on its own, every format: a header claiming more pixels than the limit
    is a ``too_many_pixels`` (or, where the format cannot even hold it, a corrupt) error, fast."""
    im = _pixels("RGB", 32, 32, 0, smooth=True)
    buf = io.BytesIO()
    im.save(buf, fmt)
    for width, height in [(65535, 65535), (2000, 1000), (1001, 1000)]:
        data = bytes(_declare_size(bytearray(buf.getvalue()), fmt, width, height))
        started = time.perf_counter()
        reason = _outcome(data)
        assert time.perf_counter() - started < 1.0
        assert reason in ("too_many_pixels", "corrupt_image", "truncated_image"), (fmt, reason)
        if fmt in ("PNG", "GIF"):  # these headers hold the size as written
            assert reason == "too_many_pixels", (fmt, width, height, reason)
