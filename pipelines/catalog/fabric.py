"""The product body's "fabric": colour palettes, pattern and material textures, highlight maps.

A body is filled with a fabric *index*: an ``L`` image whose bytes pack the pattern level (2 bits)
and the material shade (6 bits), cut from a cached periodic tile per (pattern, material, period).
``highlight_map`` adds form shading and the material's highlights to the shade bits, and
``fabric_palette`` maps the 256 index values to RGB for one body colour. Tiles are built once per
(pattern, material, period) and cached; nothing here is random per spec.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "plaid", "floral")
MATERIALS: tuple[str, ...] = (
    "cotton", "linen", "leather", "velvet", "wool", "wood", "steel", "plastic", "ceramic",
)  # fmt: skip

# Fabric index bytes: bits 7-6 = pattern level (0 = body colour .. 3 = pattern colour),
# bits 5-0 = shade (0..63). NEUTRAL is the shade that shows the body colour unchanged.
SHADE_LEVELS = 64
NEUTRAL = 24
TEXTURE_BASE = 18  # material textures centre here; the form shading adds ~6 on average
FORM_MAX = 12  # top-left lit, bottom-right in shade
GLOSS_MAX = 24  # material highlights (sheen, gloss, glaze)
TEXTURE_MAX = SHADE_LEVELS - 1 - FORM_MAX - GLOSS_MAX  # so the add never carries into bits 7-6
DARKEN = 0.6  # shade 0 multiplies the colour by 1 - DARKEN
LIGHTEN = 0.85  # shade 63 moves the colour this far towards white
HIGHLIGHT_PX = 128  # highlight maps are drawn in this unit square and scaled to the body


# ---------------------------------------------------------------------------------------- colour


def to_rgb(values: Sequence[float]) -> RGB:
    r, g, b = (int(min(255.0, max(0.0, v))) for v in values)
    return (r, g, b)


def _luma(c: Sequence[int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def fabric_pattern_color(c: RGB) -> RGB:
    """A tone of `c` that stands out on it: darker on light colours, near-white on dark ones."""
    if _luma(c) >= 150:
        return to_rgb([v * 0.42 for v in c])
    return to_rgb([v + (255 - v) * 0.72 for v in c])


def seam_color(c: RGB) -> RGB:
    """Seams and stitching: a darker tone of the body (lighter on near-black bodies)."""
    if _luma(c) >= 60:
        return to_rgb([v * 0.58 for v in c])
    return to_rgb([v + (255 - v) * 0.3 for v in c])


@functools.lru_cache(maxsize=1024)
def fabric_palette(color: RGB, pattern_color: RGB) -> bytes:
    """256 RGB entries for the fabric index: 4 pattern levels x 64 shades."""
    t = np.arange(4, dtype=np.float32)[:, None] / 3.0
    base = (1 - t) * np.float32(color) + t * np.float32(pattern_color)  # (4, 3)
    s = np.arange(SHADE_LEVELS, dtype=np.float32)
    dark = np.clip((s - NEUTRAL) / NEUTRAL, -1, 0)[None, :, None]  # (1, 64, 1)
    light = np.clip((s - NEUTRAL) / (SHADE_LEVELS - 1 - NEUTRAL), 0, 1)[None, :, None]
    out = base[:, None, :] * (1 + DARKEN * dark)  # (4, 64, 3)
    out = out + (255 - out) * LIGHTEN * light
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).tobytes()


# ------------------------------------------------------------------------------ pattern textures


def _pattern_period(width: int, height: int) -> int:
    # ~4.5 % of the short side (32 px at 700), so stripes and dots survive BLIP's 384 px resize;
    # even only, so the catalog's ~150 image sizes share 14 sets of cached tiles.
    return max(8, 2 * round(0.0225 * min(width, height)))


def _coverage(hi: np.ndarray, ss: int) -> np.ndarray:
    """Mean of ss x ss blocks of a boolean supersampled array, as levels 0..3."""
    h, w = hi.shape
    cov = hi.reshape(h // ss, ss, w // ss, ss).mean(axis=(1, 3))
    return np.rint(cov * 3).astype(np.uint8)


@functools.lru_cache(maxsize=128)  # 5 patterns x the 14 even periods of 400..1000 px images
def _pattern_tile(pattern: str, p: int) -> np.ndarray:
    """A periodic tile of pattern levels 0..3 (uint8) for period `p` pixels."""
    ss = 4
    if pattern == "solid":
        return np.zeros((1, 1), np.uint8)
    if pattern == "striped":  # vertical stripes, across the horizontal material grains
        x = (np.arange(p * ss) + 0.5) / ss
        return _coverage(np.broadcast_to(x < 0.42 * p, (ss, p * ss)), ss)
    if pattern == "plaid":
        n = 2 * p
        c = (np.arange(n * ss) + 0.5) / ss
        band = (c < 0.62 * p).astype(np.uint8)  # wide bands: level 1 alone, 2 where they cross
        thin = np.abs(c - 1.32 * p) < 0.07 * p  # thin over-check lines: full pattern colour
        level = band[:, None] + band[None, :]
        level = np.where(thin[:, None] | thin[None, :], 3, level)
        cov = level.reshape(n, ss, n, ss).mean(axis=(1, 3))
        return np.rint(cov).astype(np.uint8)
    n = p if pattern == "dotted" else 2 * p
    im = Image.new("L", (n * ss, n * ss), 0)
    d = ImageDraw.Draw(im)
    centres = [(0.25 * n, 0.25 * n), (0.75 * n, 0.75 * n)]
    for cx, cy in centres:
        for ox in (-n, 0, n):  # wrapped copies keep the tile seamless
            for oy in (-n, 0, n):
                x, y = (cx + ox) * ss, (cy + oy) * ss
                if pattern == "dotted":
                    r = 0.19 * p * ss
                    d.ellipse((x - r, y - r, x + r, y + r), fill=255)
                elif pattern == "floral":
                    pr, dist = 0.2 * p * ss, 0.28 * p * ss
                    for k in range(5):
                        a = 2 * math.pi * k / 5 - math.pi / 2
                        px, py = x + dist * math.cos(a), y + dist * math.sin(a)
                        d.ellipse((px - pr, py - pr, px + pr, py + pr), fill=255)
                    r = 0.14 * p * ss
                    d.ellipse((x - r, y - r, x + r, y + r), fill=85)  # centre: a paler tone
                else:
                    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    arr = np.asarray(im.reduce(ss), dtype=np.float32)
    return np.rint(arr * 3 / 255).astype(np.uint8)


# ----------------------------------------------------------------------------- material textures


def _periodic_smooth(values: np.ndarray, k: int) -> np.ndarray:
    """Circular moving average of width k (keeps row tables seamless)."""
    return sum(np.roll(values, i) for i in range(-(k // 2), k // 2 + 1)) / (2 * (k // 2) + 1)


def _cycles(size: int, period: float) -> int:
    return max(1, round(size / period))


@functools.lru_cache(maxsize=256)  # 9 materials x 14 periods; leather takes ~40 ms to build
def _material_tile(material: str, p: int) -> np.ndarray:
    """A periodic (8p, 8p) tile of shades around TEXTURE_BASE; smooth structure, no noise."""
    n = 8 * p
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n  # (n, n) each, in tile units 0..1
    rng = np.random.default_rng(1234)  # fixed: textures do not depend on any spec
    tau = 2 * math.pi
    if material == "cotton":  # fine plain weave
        k = _cycles(n, max(3.0, p / 5))
        v = 4.5 * np.tanh(2.5 * np.sin(tau * k * xx) * np.sin(tau * k * yy))
    elif material == "linen":  # coarse, irregular weave with slubs (thick, uneven threads)
        k = _cycles(n, p / 2.6)
        weave = np.sin(tau * k * xx) * np.sin(tau * k * yy)
        rows = _periodic_smooth(rng.normal(0, 1, n), 3)[:, None]
        cols = _periodic_smooth(rng.normal(0, 1, n), 3)[None, :]
        v = 5.5 * weave + 1.6 * rows + 1.6 * cols
        slub_h = max(2, p // 10)
        for _ in range(int(n / p * 2.5)):  # a thick thread: lit on top, its shadow below
            y0, x0 = rng.integers(0, n, 2)
            length = rng.integers(p, 4 * p)
            xs = (x0 + np.arange(length)) % n
            v[np.ix_((y0 + np.arange(slub_h)) % n, xs)] += 11
            v[np.ix_((y0 + slub_h + np.arange(slub_h)) % n, xs)] -= 9
    elif material == "leather":  # pebble grain: cells with dark creases, each cell slightly domed
        g = _cycles(n, max(4.0, p / 2.6))
        cell = n / g
        jit = rng.uniform(0.2, 0.8, (2, g, g))  # each cell's point, as a fraction of the cell
        py, px = yy * n, xx * n
        iy, ix = (py // cell).astype(int), (px // cell).astype(int)
        d1 = np.full((n, n), np.inf, np.float32)  # distance to the nearest cell point
        d2 = np.full((n, n), np.inf, np.float32)  # ... and to the second nearest
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                cy, cx = iy + dy, ix + dx  # neighbour cell, unwrapped; its point wraps the tile
                qy = (cy + jit[0, cy % g, cx % g]) * cell
                qx = (cx + jit[1, cy % g, cx % g]) * cell
                d = np.hypot(py - qy, px - qx)
                d2 = np.where(d < d1, d1, np.minimum(d2, d))
                d1 = np.minimum(d1, d)
        crease = np.clip(1 - (d2 - d1) / (0.22 * cell), 0, 1)
        v = 8.0 * np.clip(1 - (d1 / (0.75 * cell)) ** 2, 0, 1) - 2.0 - 11.0 * crease**2
    elif material == "velvet":  # smooth pile; its look is the sheen in the highlight map
        v = -7.0 + 0.8 * np.sin(tau * 2 * xx)
    elif material == "wool":  # stocking-stitch knit: columns of V-shaped loops
        kc = _cycles(n, p / 1.7)
        kr = _cycles(n, p / 2.8)
        xm = (xx * kc) % 1.0 - 0.5  # -0.5..0.5 across a column
        loops = np.cos(tau * (yy * kr + np.abs(xm) * 1.1))
        v = 8.5 * loops - 9.0 * np.clip((np.abs(xm) - 0.4) / 0.1, 0, 1)
    elif material == "wood":  # grain lines on broad light/dark bands
        kw = _cycles(n, p / 2.4)
        phase = kw * yy + 0.7 * np.sin(tau * (xx + 0.25 * np.sin(tau * 2 * yy)))
        phase = phase + 0.2 * np.sin(tau * 3 * xx)
        lines = (0.5 + 0.5 * np.cos(tau * phase)) ** 10
        bands = np.cos(tau * (max(1, kw // 5) * yy + 0.35 * np.sin(tau * xx)))
        sheen = (0.5 + 0.5 * np.cos(tau * (phase + 0.5))) ** 12  # lighter latewood between lines
        v = 6.0 * bands - 13.0 * lines + 9.0 * sheen
    elif material == "steel":  # brushed: long horizontal streaks, one random level per row
        level = _periodic_smooth(rng.normal(0, 1, n), 2)[:, None]
        amp = rng.uniform(0.5, 1.5, n)[:, None]
        freq = rng.integers(1, 4, n)[:, None]
        phi = rng.uniform(0, 1, n)[:, None]
        v = 3.5 * level + 2.5 * amp * np.sin(tau * (freq * xx + phi)) - 9.0  # -9: see highlight
    elif material == "plastic":  # flat; its look is the gloss map (whose baseline offsets the -8)
        v = np.full((1, 1), -8.0, np.float32)
    elif material == "ceramic":  # smooth glaze; its look is the glaze map (baseline offsets -6)
        v = np.full((1, 1), -6.0, np.float32)
    else:
        raise ValueError(f"material must be one of {MATERIALS}, got {material!r}")
    return np.clip(np.rint(TEXTURE_BASE + v), 0, TEXTURE_MAX).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def highlight_map(material: str) -> Image.Image:
    """Form shading plus the material's highlights, in the unit square of the body's bounding box.

    Values only add to the shade, so a material "darkens" a region by withholding a baseline it
    adds elsewhere: that keeps smooth materials apart on white bodies, where highlights vanish.
    """
    n = HIGHLIGHT_PX
    v, u = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n  # (n, n): v down, u across
    form = FORM_MAX * np.clip(1.15 - 0.75 * u - 0.75 * v, 0, 1)
    gloss = np.zeros_like(u)
    if material == "leather":  # soft, wide sheen
        gloss = 11 * np.exp(-((u - 0.35) ** 2 / 0.05 + (v - 0.3) ** 2 / 0.03))
    elif material == "velvet":  # a broad diagonal band of sheen fading into deep pile
        form = form * 0.5
        gloss = 24 * np.exp(-(((((u + v) / 2) - 0.36) / 0.12) ** 2))
    elif material == "steel":  # chrome: a bright reflection stripe beside a dark one
        form = form * 0.5
        dark = np.exp(-(((u - 0.56) / 0.06) ** 2))
        gloss = 9 * (1 - dark) + 15 * np.exp(-(((u - 0.3) / 0.04) ** 2))
        gloss = gloss + 8 * np.exp(-(((u - 0.8) / 0.018) ** 2))
    elif material == "plastic":  # crisp gloss: an oval spot and a strip; a darker reflection band
        spot = np.clip((1 - np.hypot((u - 0.3) / 0.15, (v - 0.2) / 0.075)) / 0.12, 0, 1)
        strip = np.clip((0.035 - np.abs(u - 0.12)) / 0.008, 0, 1) * np.clip(
            (0.25 - np.abs(v - 0.52)) / 0.02, 0, 1
        )
        band = ((np.abs(v - 0.84) < 0.05) | (u > 0.87)).astype(np.float32)
        gloss = 8 * (1 - band) + 16 * np.maximum(spot, strip)
    elif material == "ceramic":  # a curved glaze streak, a pin-point reflection, glaze pooled low
        dist = np.hypot(u - 0.8, v - 0.78)
        arc = np.clip(1 - np.abs(dist - 0.62) / 0.045, 0, 1) * (u < 0.6) * (v < 0.75)
        dot = np.clip((0.05 - np.hypot(u - 0.72, v - 0.2)) / 0.012, 0, 1)
        pool = np.clip((v - 0.72) / 0.2, 0, 1)
        glow = np.exp(-(np.hypot(u - 0.3, v - 0.35) ** 2) / 0.03)
        gloss = 7 * (1 - pool) + 16 * arc + 17 * dot + 8 * glow
        form = form * (1 - pool)
    elif material not in MATERIALS:
        raise ValueError(f"material must be one of {MATERIALS}, got {material!r}")
    total = np.clip(form, 0, FORM_MAX) + np.clip(gloss, 0, GLOSS_MAX)
    return Image.fromarray(np.rint(total).astype(np.uint8))


def _tile_to(tile: np.ndarray, height: int, width: int, y0: int = 0, x0: int = 0) -> np.ndarray:
    """Rows y0..y0+height, columns x0..x0+width of the plane tiled with `tile`."""
    th, tw = tile.shape
    y0, x0 = y0 % th, x0 % tw
    big = np.tile(tile, (-(-(y0 + height) // th), -(-(x0 + width) // tw)))
    return big[y0 : y0 + height, x0 : x0 + width]


@functools.lru_cache(maxsize=1024)  # all 630 combinations: ~40 MB at the catalog's sizes
def _fabric_tile(pattern: str, material: str, p: int) -> np.ndarray:
    """One (8p, 8p) period of pattern level << 6 | shade (every tile's period divides 8p)."""
    n = 8 * p
    shade = _tile_to(_material_tile(material, p), n, n)  # flat materials are a (1, 1) tile
    level = _tile_to(_pattern_tile(pattern, p), n, n)
    return (level << 6) | shade


def fabric_index(pattern: str, material: str, width: int, height: int,
                  bbox: tuple[int, int, int, int]) -> Image.Image:  # fmt: skip
    """The fabric index (L) over `bbox`, anchored to the image so neighbouring parts line up."""
    x0, y0, x1, y1 = bbox
    tile = _fabric_tile(pattern, material, _pattern_period(width, height))
    return Image.fromarray(np.ascontiguousarray(_tile_to(tile, y1 - y0, x1 - x0, y0, x0)))
