"""Synthetic e-commerce product photos for the demo catalog, drawn with Pillow in a few ms each.

The catalog tests BLIP retrieval with hard negatives: products of one *family* differ in exactly one
visible attribute (colour, pattern, material or brand text). So every attribute has a visible,
stable place in the picture, and everything else (position, scale, background tint, shadow, a
neutral prop) comes from ``layout_seed`` alone: changing one attribute of a spec changes only that
attribute's pixels.

How a picture is made (all in C inside Pillow, no per-pixel Python):

* background: a vertical studio gradient, one column resized to the full width;
* shadow: a blurred ellipse drawn at quarter resolution and scaled up;
* body: the kind's silhouette drawn into a 2x supersampled mask; its "fabric" is an ``L`` image
  whose bytes pack the pattern level (2 bits) and the material shade (6 bits), cut from a cached
  periodic tile per (pattern, material, period). Adding each body part's highlight map (form
  shading, gloss, sheen) to the shade bits and attaching a 256-entry palette computed from the
  colour turns it into RGB in a single ``convert``;
* secondary parts (legs, handles, wheels, soles) in neutral tones, seams in a darker body tone;
* brand text on a white tag, 6-10 % of the image height, in WenQuanYi Micro Hei.

``render_product`` is pure: the same spec gives the same pixels in any process.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

KINDS: tuple[str, ...] = (
    "sofa", "armchair", "dining_chair", "coffee_table", "table_lamp", "floor_lamp", "pillow",
    "rug", "vase", "wall_clock", "handbag", "backpack", "suitcase", "wallet", "sneaker", "boot",
    "tshirt", "dress", "hoodie", "cap", "mug", "kettle", "teapot", "water_bottle", "bowl", "watch",
    "headphones", "phone_case", "kids_scooter", "toy_car", "teddy_bear", "umbrella",
)  # fmt: skip
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "plaid", "floral")
MATERIALS: tuple[str, ...] = (
    "cotton", "linen", "leather", "velvet", "wool", "wood", "steel", "plastic", "ceramic",
)  # fmt: skip
CJK_FONT_PATH: Path = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
FONT_PACKAGE = "fonts-wqy-microhei"  # the Debian package that ships CJK_FONT_PATH

RGB = tuple[int, int, int]
MIN_SIZE, MAX_SIZE = 64, 4096  # the catalog uses 400..1000; smaller sizes keep tests fast

# Neutral tones for secondary parts, so that they never read as the product's colour.
DARK: RGB = (52, 52, 56)
METAL: RGB = (150, 152, 158)
LIGHT: RGB = (238, 238, 234)
LABEL_FILL: RGB = (252, 252, 250)
LABEL_INK: RGB = (28, 28, 32)

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
SUPERSAMPLE = 2  # body masks are drawn at 2x and reduced: smooth edges for ~0.5 ms
_RIM_LUT = [255 if v >= 128 else 0 for v in range(256)]  # rim pixels: full or none


class FontMissingError(RuntimeError):
    """The brand text needs a CJK font and ``CJK_FONT_PATH`` is absent."""


@dataclass(frozen=True)
class RenderSpec:
    """One product photo. Attributes: color, pattern, material, brand_text; the rest is layout."""

    kind: str  # one of KINDS
    color: RGB  # main body colour
    pattern: str  # one of PATTERNS, drawn in a contrasting tone of `color`
    material: str  # one of MATERIALS: the body's texture and highlights
    brand_text: str  # printed on a white tag; may mix 汉字 and Latin; "" for no tag
    width: int  # pixels, 400..1000 in the catalog
    height: int  # pixels, 400..1000 in the catalog
    layout_seed: int  # position, scale, background tint, shadow, prop: nothing else
    background: RGB = (245, 245, 245)  # studio backdrop before the seed's tint and gradient

    def __post_init__(self) -> None:
        for name, allowed in (("kind", KINDS), ("pattern", PATTERNS), ("material", MATERIALS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("color", "background"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in value):
                raise ValueError(f"{name} must be three ints in 0..255, got {value!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not MIN_SIZE <= value <= MAX_SIZE:
                raise ValueError(f"{name} must be in {MIN_SIZE}..{MAX_SIZE}, got {value!r}")


# ----------------------------------------------------------------------------------------- fonts


def _needs_cjk(text: str) -> bool:
    # Beyond Latin Extended-B the fallback font has no glyphs.
    return any(ord(ch) > 0x24F for ch in text)


@functools.lru_cache(maxsize=64)
def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size)
    return ImageFont.truetype(path, size)


def _brand_font_path(text: str) -> str | None:
    """The CJK font's path, or None for Pillow's default font (Latin-only text)."""
    path = Path(CJK_FONT_PATH)  # read at call time so tests can point it elsewhere
    if path.is_file():
        return str(path)
    if _needs_cjk(text):
        raise FontMissingError(
            f"brand text {text!r} needs a CJK font, but {path} is missing: "
            f"install the Debian package {FONT_PACKAGE} (apt-get install {FONT_PACKAGE})"
        )
    return None


@functools.lru_cache(maxsize=512)
def _text_mask(text: str, size: int, font_path: str | None) -> Image.Image:
    """The text's ink (L, tight box), bold by a stroke: more ink, so a changed name shows more."""
    font = _font(font_path, size)
    stroke = max(1, size // 28)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font, stroke_width=stroke)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255,
                              stroke_width=stroke, stroke_fill=255)  # fmt: skip
    return mask


# ---------------------------------------------------------------------------------------- colour


def _rgb(values: Sequence[float]) -> RGB:
    r, g, b = (int(min(255.0, max(0.0, v))) for v in values)
    return (r, g, b)


def _luma(c: Sequence[int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _pattern_color(c: RGB) -> RGB:
    """A tone of `c` that stands out on it: darker on light colours, near-white on dark ones."""
    if _luma(c) >= 150:
        return _rgb([v * 0.42 for v in c])
    return _rgb([v + (255 - v) * 0.72 for v in c])


def _seam_color(c: RGB) -> RGB:
    """Seams and stitching: a darker tone of the body (lighter on near-black bodies)."""
    if _luma(c) >= 60:
        return _rgb([v * 0.58 for v in c])
    return _rgb([v + (255 - v) * 0.3 for v in c])


@functools.lru_cache(maxsize=1024)
def _palette(color: RGB, pattern_color: RGB) -> bytes:
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
def _highlight_map(material: str) -> Image.Image:
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


def _fabric_index(pattern: str, material: str, width: int, height: int,
                  bbox: tuple[int, int, int, int]) -> Image.Image:  # fmt: skip
    """The fabric index (L) over `bbox`, anchored to the image so neighbouring parts line up."""
    x0, y0, x1, y1 = bbox
    tile = _fabric_tile(pattern, material, _pattern_period(width, height))
    return Image.fromarray(np.ascontiguousarray(_tile_to(tile, y1 - y0, x1 - x0, y0, x0)))


# ------------------------------------------------------------------------------------- sketching

Geom = Sequence[float]


class _Sketch:
    """Collects a kind's shapes in unit coordinates of the object box, by layer.

    Layers are replayed in order: ``under`` parts, the ``body`` mask (``cut`` punches holes),
    ``seam`` lines in a darker body tone, ``over`` parts. Radii and line widths are fractions of
    the box's short side; points are (u, v) with u across and v down the box.
    """

    def __init__(self) -> None:
        self.ops: dict[str, list[tuple]] = {"under": [], "body": [], "seam": [], "over": []}

    def body(self, shape: str, geom: Geom, **kw) -> None:
        self.ops["body"].append((shape, geom, 255, kw))

    def cut(self, shape: str, geom: Geom, **kw) -> None:
        self.ops["body"].append((shape, geom, 0, kw))

    def seam(self, shape: str, geom: Geom, w: float = 0.012, **kw) -> None:
        self.ops["seam"].append((shape, geom, None, {"w": w, **kw}))

    def under(self, shape: str, geom: Geom, tone: RGB = DARK, **kw) -> None:
        self.ops["under"].append((shape, geom, tone, kw))

    def over(self, shape: str, geom: Geom, tone: RGB = DARK, **kw) -> None:
        self.ops["over"].append((shape, geom, tone, kw))


def _draw_op(draw: ImageDraw.ImageDraw, op: tuple, fill, box: tuple[float, ...], scale: float,
             origin: tuple[float, float] = (0.0, 0.0)) -> None:  # fmt: skip
    """Draw one unit-coordinate op into `draw`; box = (x0, y0, w, h) in image pixels."""
    shape, geom, _, kw = op
    x0, y0, bw, bh = box
    ox, oy = origin
    short = min(bw, bh) * scale

    def pt(u: float, v: float) -> tuple[float, float]:
        return ((x0 + u * bw - ox) * scale, (y0 + v * bh - oy) * scale)

    def rect(g: Geom) -> tuple[float, float, float, float]:
        (ax, ay), (bx, by) = pt(g[0], g[1]), pt(g[2], g[3])
        return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))

    width = max(1, round(kw.get("w", 0.0) * short))
    if shape == "poly":
        draw.polygon([pt(u, v) for u, v in geom], fill=fill)
    elif shape == "rect":
        draw.rounded_rectangle(rect(geom), radius=kw.get("r", 0.0) * short, fill=fill)
    elif shape == "rect_outline":
        draw.rounded_rectangle(
            rect(geom), radius=kw.get("r", 0.0) * short, outline=fill, width=width
        )
    elif shape == "ellipse":
        draw.ellipse(rect(geom), fill=fill)
    elif shape == "ellipse_outline":
        draw.ellipse(rect(geom), outline=fill, width=width)
    elif shape == "circle":  # (cu, cv, r): a true circle whatever the box's aspect
        cx, cy = pt(geom[0], geom[1])
        r = geom[2] * short
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "line":
        draw.line([pt(u, v) for u, v in geom], fill=fill, width=width, joint="curve")
    elif shape == "arc":  # (u0, v0, u1, v1, start_deg, end_deg)
        draw.arc(rect(geom[:4]), geom[4], geom[5], fill=fill, width=width)
    elif shape == "pieslice":
        draw.pieslice(rect(geom[:4]), geom[4], geom[5], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _op_bbox(op: tuple, box: tuple[float, ...]) -> tuple[int, int, int, int]:
    """The pixel bounding box of a body op (whole ellipse for slices and arcs)."""
    shape, geom, _, kw = op
    x0, y0, bw, bh = box
    half = 0.5 * kw.get("w", 0.0) * min(bw, bh)
    if shape in ("poly", "line"):
        us, vs = [g[0] for g in geom], [g[1] for g in geom]
        u0, v0, u1, v1 = min(us), min(vs), max(us), max(vs)
    elif shape == "circle":
        r = geom[2] * min(bw, bh)
        cx, cy = x0 + geom[0] * bw, y0 + geom[1] * bh
        return (int(cx - r), int(cy - r), int(cx + r) + 1, int(cy + r) + 1)
    else:
        u0, v0, u1, v1 = geom[:4]
        half = 0.0
    return (int(x0 + u0 * bw - half), int(y0 + v0 * bh - half),
            int(x0 + u1 * bw + half) + 1, int(y0 + v1 * bh + half) + 1)  # fmt: skip


def _gloss(sketch: _Sketch, material: str, box: tuple[float, ...],
           body_bbox: tuple[int, int, int, int]) -> Image.Image:  # fmt: skip
    """Shading and highlights, one copy of the material's map per body part (later parts on top).

    Per part, so that each cushion, handle or strap catches its own light, and so that a sparse
    body (a scooter, a lamp) still shows the gloss or sheen that tells its material apart.
    """
    hmap = _highlight_map(material)
    fx0, fy0, fx1, fy1 = body_bbox
    out = Image.new("L", (fx1 - fx0, fy1 - fy0), 0)
    for op in sketch.ops["body"]:
        if op[2] == 0:  # holes take no light
            continue
        px0, py0, px1, py1 = _op_bbox(op, box)
        if px1 - px0 < 2 or py1 - py0 < 2:
            continue
        out.paste(
            hmap.resize((px1 - px0, py1 - py0), Image.Resampling.BILINEAR), (px0 - fx0, py0 - fy0)
        )
    return out


def _catmull_rom(
    points: Sequence[tuple[float, float]], samples: int = 6
) -> list[tuple[float, float]]:
    """A smooth open curve through `points` (end points repeated)."""
    pts = np.asarray([points[0], *points, points[-1]], dtype=np.float64)  # (n + 2, 2)
    t = np.arange(samples)[:, None] / samples  # (samples, 1)
    out: list[tuple[float, float]] = []
    for i in range(1, len(pts) - 2):
        p0, p1, p2, p3 = pts[i - 1], pts[i], pts[i + 1], pts[i + 2]  # (2,) each
        seg = 0.5 * (
            2 * p1
            + (p2 - p0) * t
            + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
            + (3 * p1 - p0 - 3 * p2 + p3) * t**3
        )  # (samples, 2)
        out.extend((float(u), float(v)) for u, v in seg)
    out.append((float(points[-1][0]), float(points[-1][1])))
    return out


def _profile(
    half_widths: Sequence[tuple[float, float]], cu: float = 0.5
) -> list[tuple[float, float]]:
    """A symmetric lathe outline from (v, half_width) pairs, top to bottom."""
    right = _catmull_rom([(cu + w, v) for v, w in half_widths])
    left = [(2 * cu - u, v) for u, v in reversed(right)]
    return right + left


# ----------------------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class _Kind:
    aspect: float  # object box width / height
    label: tuple[float, float]  # tag centre in box units (may lie outside the box)
    draw: Callable[[_Sketch], None]
    tag_from: tuple[float, float] | None = None  # a hanging tag's string starts here


_KINDS: dict[str, _Kind] = {}


def _kind(name: str, aspect: float, label: tuple[float, float],
          tag_from: tuple[float, float] | None = None):  # fmt: skip
    def register(fn: Callable[[_Sketch], None]) -> Callable[[_Sketch], None]:
        _KINDS[name] = _Kind(aspect, label, fn, tag_from)
        return fn

    return register


@_kind("sofa", 1.75, (0.5, 0.3))
def _sofa(s: _Sketch) -> None:
    for u in (0.05, 0.91):
        s.under("rect", (u, 0.86, u + 0.04, 0.99), r=0.02)
    s.body("rect", (0.07, 0.05, 0.93, 0.62), r=0.14)
    s.body("rect", (0.1, 0.52, 0.9, 0.88), r=0.06)
    s.body("rect", (0.0, 0.3, 0.15, 0.88), r=0.09)
    s.body("rect", (0.85, 0.3, 1.0, 0.88), r=0.09)
    s.seam("line", ((0.15, 0.6), (0.85, 0.6)))
    s.seam("line", ((0.5, 0.61), (0.5, 0.87)))
    s.seam("line", ((0.15, 0.36), (0.15, 0.87)))
    s.seam("line", ((0.85, 0.36), (0.85, 0.87)))


@_kind("armchair", 1.05, (0.5, 0.3))
def _armchair(s: _Sketch) -> None:
    for u in (0.09, 0.86):
        s.under("rect", (u, 0.86, u + 0.05, 0.99), r=0.02)
    s.body("rect", (0.13, 0.02, 0.87, 0.64), r=0.16)
    s.body("rect", (0.16, 0.55, 0.84, 0.88), r=0.06)
    s.body("rect", (0.0, 0.36, 0.2, 0.88), r=0.09)
    s.body("rect", (0.8, 0.36, 1.0, 0.88), r=0.09)
    s.seam("line", ((0.2, 0.63), (0.8, 0.63)))
    s.seam("line", ((0.2, 0.42), (0.2, 0.87)))
    s.seam("line", ((0.8, 0.42), (0.8, 0.87)))


@_kind("dining_chair", 0.62, (0.5, 0.2))
def _dining_chair(s: _Sketch) -> None:
    s.under("line", ((0.22, 0.6), (0.24, 0.94)), w=0.05)
    s.under("line", ((0.78, 0.6), (0.76, 0.94)), w=0.05)
    s.under("line", ((0.18, 0.36), (0.18, 0.55)), w=0.06)
    s.under("line", ((0.82, 0.36), (0.82, 0.55)), w=0.06)
    s.body("rect", (0.1, 0.0, 0.9, 0.42), r=0.12)
    s.body("rect", (0.02, 0.5, 0.98, 0.65), r=0.05)
    s.seam("line", ((0.05, 0.6), (0.95, 0.6)))
    s.over("line", ((0.09, 0.63), (0.07, 1.0)), w=0.06)
    s.over("line", ((0.91, 0.63), (0.93, 1.0)), w=0.06)


@_kind("coffee_table", 1.8, (0.5, 0.17))
def _coffee_table(s: _Sketch) -> None:
    s.under("rect", (0.19, 0.38, 0.24, 0.84))
    s.under("rect", (0.76, 0.38, 0.81, 0.84))
    s.body("poly", ((0.09, 0.0), (0.91, 0.0), (1.0, 0.3), (0.0, 0.3)))
    s.body("rect", (0.0, 0.29, 1.0, 0.44), r=0.02)
    s.body("poly", ((0.12, 0.64), (0.88, 0.64), (0.94, 0.76), (0.06, 0.76)))
    s.seam("line", ((0.0, 0.3), (1.0, 0.3)))
    s.over("rect", (0.04, 0.43, 0.1, 1.0), r=0.01)
    s.over("rect", (0.9, 0.43, 0.96, 1.0), r=0.01)


@_kind("table_lamp", 0.72, (0.5, 0.24))
def _table_lamp(s: _Sketch) -> None:
    s.under("rect", (0.46, 0.4, 0.54, 0.62))
    s.under("ellipse", (0.24, 0.93, 0.76, 1.0))
    s.body("poly", ((0.22, 0.0), (0.78, 0.0), (0.97, 0.44), (0.03, 0.44)))
    s.body("poly", _profile(((0.57, 0.1), (0.64, 0.2), (0.78, 0.25), (0.9, 0.2), (0.95, 0.14))))
    s.seam("line", ((0.22, 0.015), (0.78, 0.015)))
    s.seam("line", ((0.04, 0.425), (0.96, 0.425)))


@_kind("floor_lamp", 0.5, (0.5, 0.62), tag_from=(0.3, 0.41))
def _floor_lamp(s: _Sketch) -> None:
    s.under("line", ((0.5, 0.38), (0.5, 0.95)), w=0.07)
    s.body("poly", ((0.15, 0.0), (0.85, 0.0), (1.0, 0.42), (0.0, 0.42)))
    s.body("ellipse", (0.1, 0.92, 0.9, 1.0))  # the weighted base, in the same finish
    s.seam("line", ((0.15, 0.01), (0.85, 0.01)))
    s.seam("line", ((0.01, 0.41), (0.99, 0.41)))


def _bowed_quad(corners: Sequence[tuple[float, float]], bow: float, samples: int = 8):
    """A quadrilateral whose edges curve inwards by `bow` (a stuffed cushion)."""
    pts = []
    cu = sum(c[0] for c in corners) / 4
    cv = sum(c[1] for c in corners) / 4
    for i in range(4):
        (au, av), (bu, bv) = corners[i], corners[(i + 1) % 4]
        mu, mv = (au + bu) / 2, (av + bv) / 2
        qu, qv = mu + (cu - mu) * bow, mv + (cv - mv) * bow
        for j in range(samples):
            t = j / samples
            pts.append(((1 - t) ** 2 * au + 2 * t * (1 - t) * qu + t * t * bu,
                        (1 - t) ** 2 * av + 2 * t * (1 - t) * qv + t * t * bv))  # fmt: skip
    return pts


@_kind("pillow", 1.15, (0.68, 0.76))
def _pillow(s: _Sketch) -> None:
    quad = ((0.01, 0.03), (0.99, 0.0), (0.98, 0.98), (0.0, 0.96))
    s.body("poly", _bowed_quad(quad, 0.16))
    inner = _bowed_quad(((0.04, 0.06), (0.96, 0.04), (0.95, 0.94), (0.03, 0.93)), 0.16)
    s.seam("line", (*inner, inner[0]), w=0.01)


@_kind("rug", 1.6, (0.76, 0.72))
def _rug(s: _Sketch) -> None:
    s.body("poly", ((0.1, 0.1), (0.9, 0.1), (1.0, 0.9), (0.0, 0.9)))
    s.seam("line", ((0.14, 0.16), (0.86, 0.16), (0.94, 0.84), (0.06, 0.84), (0.14, 0.16)), w=0.015)
    for i in range(17):
        t = (i + 0.5) / 17
        s.over("line", ((0.1 + 0.8 * t, 0.1), (0.1 + 0.8 * t, 0.03)), tone=LIGHT, w=0.012)
        s.over("line", ((t, 0.9), (t, 0.98)), tone=LIGHT, w=0.012)


@_kind("vase", 0.62, (0.5, 0.62))
def _vase(s: _Sketch) -> None:
    s.body("poly", _profile(((0.0, 0.3), (0.06, 0.23), (0.18, 0.19), (0.36, 0.36), (0.6, 0.5),
                             (0.82, 0.44), (0.96, 0.3), (1.0, 0.27))))  # fmt: skip
    s.over("ellipse", (0.23, -0.015, 0.77, 0.03))


@_kind("wall_clock", 1.0, (0.5, 0.7))
def _wall_clock(s: _Sketch) -> None:
    s.under("circle", (0.5, 0.5, 0.5))
    s.body("circle", (0.5, 0.5, 0.455))
    for k in range(12):
        a = 2 * math.pi * k / 12
        r0, r1 = (0.33, 0.42) if k % 3 == 0 else (0.37, 0.42)
        pts = tuple((0.5 + r * math.sin(a), 0.5 - r * math.cos(a)) for r in (r0, r1))
        s.over("line", pts, w=0.022)
    s.over("line", ((0.5, 0.5), (0.5, 0.2)), w=0.028)
    s.over("line", ((0.5, 0.5), (0.69, 0.58)), w=0.03)
    s.over("circle", (0.5, 0.5, 0.035))


@_kind("handbag", 1.15, (0.5, 0.8))
def _handbag(s: _Sketch) -> None:
    s.under("arc", (0.24, 0.0, 0.76, 0.7, 180, 360), w=0.06)
    s.body("poly", ((0.12, 0.33), (0.88, 0.33), (0.99, 0.97), (0.01, 0.97)))
    s.seam("line", ((0.12, 0.34), (0.15, 0.58), (0.5, 0.67), (0.85, 0.58), (0.88, 0.34)), w=0.014)
    s.over("rect", (0.45, 0.58, 0.55, 0.7), tone=METAL, r=0.02)
    s.over("rect", (0.21, 0.29, 0.28, 0.37), r=0.01)
    s.over("rect", (0.72, 0.29, 0.79, 0.37), r=0.01)


@_kind("backpack", 0.8, (0.5, 0.36))
def _backpack(s: _Sketch) -> None:
    s.under("arc", (0.38, 0.0, 0.62, 0.18, 180, 360), w=0.04)
    s.under("rect", (0.0, 0.22, 0.12, 0.9), r=0.05)
    s.under("rect", (0.88, 0.22, 1.0, 0.9), r=0.05)
    s.body("ellipse", (0.08, 0.07, 0.92, 0.55))
    s.body("rect", (0.08, 0.3, 0.92, 1.0), r=0.09)
    s.seam("rect_outline", (0.2, 0.58, 0.8, 0.93), r=0.06, w=0.014)
    s.seam("line", ((0.2, 0.66), (0.8, 0.66)), w=0.012)
    s.over("rect", (0.72, 0.63, 0.76, 0.72), tone=METAL, r=0.01)


@_kind("suitcase", 0.68, (0.5, 0.32))
def _suitcase(s: _Sketch) -> None:
    s.under("arc", (0.34, 0.0, 0.66, 0.18, 180, 360), w=0.05)
    s.under("circle", (0.16, 0.955, 0.07))
    s.under("circle", (0.84, 0.955, 0.07))
    s.body("rect", (0.03, 0.07, 0.97, 0.94), r=0.1)
    for u in (0.22, 0.78):
        s.seam("line", ((u, 0.12), (u, 0.89)), w=0.016)
    s.seam("line", ((0.5, 0.5), (0.5, 0.89)), w=0.016)


@_kind("wallet", 1.45, (0.44, 0.58))
def _wallet(s: _Sketch) -> None:
    s.body("rect", (0.0, 0.1, 1.0, 0.9), r=0.09)
    s.seam("rect_outline", (0.035, 0.15, 0.965, 0.85), r=0.07, w=0.01)
    s.seam("line", ((0.0, 0.34), (1.0, 0.34)), w=0.014)
    s.over("circle", (0.88, 0.34, 0.06), tone=METAL)


@_kind("sneaker", 1.9, (0.3, -0.16), tag_from=(0.47, 0.1))
def _sneaker(s: _Sketch) -> None:
    s.body("poly", _catmull_rom(((0.02, 0.76), (0.03, 0.4), (0.08, 0.16), (0.2, 0.1), (0.3, 0.16),
                                 (0.37, 0.12), (0.42, 0.0), (0.5, 0.0), (0.56, 0.12),
                                 (0.7, 0.3), (0.86, 0.4), (0.97, 0.5), (1.0, 0.62),
                                 (1.0, 0.78))))  # fmt: skip
    s.seam("line", ((0.1, 0.74), (0.3, 0.6), (0.6, 0.46), (0.82, 0.4)), w=0.025)
    s.seam("line", ((0.76, 0.75), (0.78, 0.5), (0.9, 0.46)), w=0.018)
    s.over("rect", (0.0, 0.74, 1.0, 0.95), r=0.06)
    s.over("rect", (0.02, 0.77, 0.98, 0.8), tone=LIGHT, r=0.02)
    s.over("ellipse", (0.1, 0.08, 0.33, 0.2))
    for k in range(4):
        u = 0.46 + 0.06 * k
        v = 0.12 + 0.075 * k
        s.over("line", ((u - 0.035, v), (u + 0.05, v + 0.035)), tone=LIGHT, w=0.035)


@_kind("boot", 0.85, (0.33, 0.36))
def _boot(s: _Sketch) -> None:
    s.body("poly", _catmull_rom(((0.1, 0.87), (0.11, 0.45), (0.12, 0.0), (0.58, 0.0),
                                 (0.58, 0.5), (0.66, 0.6), (0.88, 0.65), (0.99, 0.74),
                                 (1.0, 0.87))))  # fmt: skip
    s.seam("line", ((0.12, 0.06), (0.58, 0.06)), w=0.015)
    s.seam("line", ((0.58, 0.52), (0.68, 0.7), (0.99, 0.77)), w=0.012)
    s.over("rect", (0.07, 0.86, 1.0, 0.93), r=0.02)
    s.over("rect", (0.07, 0.9, 0.34, 1.0), r=0.01)
    s.over("rect", (0.3, 0.0, 0.4, 0.1), r=0.01)


@_kind("tshirt", 1.1, (0.5, 0.46))
def _tshirt(s: _Sketch) -> None:
    s.body("poly", ((0.36, 0.02), (0.64, 0.02), (0.82, 0.07), (1.0, 0.3), (0.86, 0.43),
                    (0.79, 0.35), (0.79, 0.99), (0.21, 0.99), (0.21, 0.35), (0.14, 0.43),
                    (0.0, 0.3), (0.18, 0.07)))  # fmt: skip
    s.cut("ellipse", (0.38, -0.08, 0.62, 0.12))
    s.seam("arc", (0.36, -0.1, 0.64, 0.15, 0, 180), w=0.02)
    s.seam("line", ((0.21, 0.35), (0.22, 0.1)), w=0.01)
    s.seam("line", ((0.79, 0.35), (0.78, 0.1)), w=0.01)
    s.seam("line", ((0.21, 0.95), (0.79, 0.95)), w=0.01)


@_kind("dress", 0.72, (0.5, 0.64))
def _dress(s: _Sketch) -> None:
    s.body("poly", ((0.34, 0.0), (0.41, 0.0), (0.44, 0.08), (0.56, 0.08), (0.59, 0.0), (0.66, 0.0),
                    (0.7, 0.18), (0.65, 0.36), (0.98, 0.97), (0.75, 1.0), (0.5, 1.01), (0.25, 1.0),
                    (0.02, 0.97), (0.35, 0.36), (0.3, 0.18)))  # fmt: skip
    s.seam("line", ((0.35, 0.36), (0.65, 0.36)), w=0.02)
    for u0, u1 in ((0.44, 0.3), (0.56, 0.7)):
        s.seam("line", ((u0, 0.4), (u1, 0.97)), w=0.008)


@_kind("hoodie", 1.15, (0.5, 0.46))
def _hoodie(s: _Sketch) -> None:
    s.body("ellipse", (0.3, 0.0, 0.7, 0.26))
    s.body("poly", ((0.3, 0.1), (0.7, 0.1), (0.84, 0.16), (0.98, 0.62), (0.99, 0.9), (0.88, 0.92),
                    (0.8, 0.5), (0.8, 1.0), (0.2, 1.0), (0.2, 0.5), (0.12, 0.92), (0.01, 0.9),
                    (0.02, 0.62), (0.16, 0.16)))  # fmt: skip
    s.seam("line", ((0.3, 0.68), (0.7, 0.68), (0.76, 0.9), (0.24, 0.9), (0.3, 0.68)), w=0.012)
    s.seam("line", ((0.2, 0.94), (0.8, 0.94)), w=0.012)
    s.seam("line", ((0.88, 0.85), (0.99, 0.84)), w=0.012)
    s.seam("line", ((0.01, 0.84), (0.12, 0.85)), w=0.012)
    s.over("ellipse", (0.4, 0.05, 0.6, 0.2))
    s.over("line", ((0.44, 0.19), (0.43, 0.34)), tone=LIGHT, w=0.014)
    s.over("line", ((0.56, 0.19), (0.57, 0.34)), tone=LIGHT, w=0.014)


@_kind("cap", 1.4, (0.4, 0.52))
def _cap(s: _Sketch) -> None:
    s.body("pieslice", (0.05, 0.08, 0.8, 1.46, 180, 360))
    s.body("poly", ((0.6, 0.68), (0.92, 0.72), (1.0, 0.8), (0.97, 0.87), (0.6, 0.85)))
    s.seam("line", ((0.42, 0.1), (0.22, 0.77)), w=0.012)
    s.seam("line", ((0.42, 0.1), (0.62, 0.77)), w=0.012)
    s.seam("line", ((0.05, 0.76), (0.8, 0.76)), w=0.016)
    s.over("circle", (0.425, 0.09, 0.04))


@_kind("mug", 1.2, (0.4, 0.56))
def _mug(s: _Sketch) -> None:
    s.body("ellipse", (0.58, 0.22, 0.98, 0.8))
    s.cut("ellipse", (0.68, 0.34, 0.88, 0.68))
    s.body("rect", (0.04, 0.09, 0.76, 0.95), r=0.04)
    s.body("ellipse", (0.04, 0.02, 0.76, 0.16))
    s.body("ellipse", (0.04, 0.9, 0.76, 1.0))
    s.over("ellipse", (0.075, 0.04, 0.725, 0.14))


@_kind("kettle", 1.05, (0.44, 0.62))
def _kettle(s: _Sketch) -> None:
    s.under("arc", (0.2, 0.0, 0.68, 0.52, 180, 360), w=0.055)
    s.under("rect", (0.08, 0.92, 0.8, 1.0), r=0.03)
    s.body("poly", ((0.7, 0.6), (0.92, 0.28), (0.99, 0.29), (0.78, 0.8)))
    s.body("ellipse", (0.22, 0.13, 0.66, 0.3))
    s.body("poly", _profile(((0.2, 0.22), (0.4, 0.27), (0.65, 0.32), (0.93, 0.34)), cu=0.44))
    s.seam("line", ((0.23, 0.22), (0.65, 0.22)), w=0.012)
    s.over("ellipse", (0.39, 0.08, 0.49, 0.16))


@_kind("teapot", 1.45, (0.5, 0.66))
def _teapot(s: _Sketch) -> None:
    s.body("ellipse", (0.67, 0.36, 0.97, 0.86))
    s.cut("ellipse", (0.74, 0.46, 0.9, 0.76))
    s.body("poly", ((0.3, 0.7), (0.12, 0.5), (0.02, 0.3), (0.09, 0.27), (0.2, 0.42), (0.33, 0.52)))
    s.body("ellipse", (0.22, 0.28, 0.78, 1.0))
    s.body("ellipse", (0.34, 0.17, 0.66, 0.38))
    s.seam("line", ((0.33, 0.31), (0.67, 0.31)), w=0.014)
    s.over("circle", (0.5, 0.15, 0.05))


@_kind("water_bottle", 0.4, (0.5, 0.58))
def _water_bottle(s: _Sketch) -> None:
    s.under("rect", (0.28, 0.0, 0.72, 0.13), r=0.08)
    s.body("poly", ((0.3, 0.12), (0.7, 0.12), (0.92, 0.27), (0.08, 0.27)))
    s.body("rect", (0.08, 0.22, 0.92, 1.0), r=0.16)
    s.seam("line", ((0.08, 0.3), (0.92, 0.3)), w=0.02)
    s.seam("line", ((0.09, 0.93), (0.91, 0.93)), w=0.02)


@_kind("bowl", 2.0, (0.5, 0.58))
def _bowl(s: _Sketch) -> None:
    s.under("rect", (0.35, 0.88, 0.65, 1.0), r=0.02)
    s.body("pieslice", (0.0, -0.75, 1.0, 0.95, 0, 180))
    s.body("ellipse", (0.0, 0.0, 1.0, 0.22))
    s.seam("ellipse_outline", (0.025, 0.015, 0.975, 0.205), w=0.025)


@_kind("watch", 0.55, (0.5, 1.0))
def _watch(s: _Sketch) -> None:
    s.body("rect", (0.17, 0.0, 0.83, 1.0), r=0.12)
    for v in (0.07, 0.13):
        s.seam("line", ((0.19, v), (0.81, v)), w=0.015)
    s.over("rect", (0.24, 0.3, 0.76, 0.7), tone=METAL, r=0.1)
    s.over("circle", (0.5, 0.5, 0.43), tone=METAL)
    s.over("circle", (0.5, 0.5, 0.365), tone=LIGHT)
    s.over("rect", (0.91, 0.47, 1.0, 0.53), tone=METAL, r=0.02)
    for k in range(12):
        a = 2 * math.pi * k / 12
        # Radii are in short-side (= width) units; v is in height units, hence the aspect factor.
        pts = tuple((0.5 + r * math.sin(a), 0.5 - r * math.cos(a) * 0.55) for r in (0.27, 0.335))
        s.over("line", pts, w=0.03)
    s.over("line", ((0.5, 0.5), (0.5, 0.5 - 0.27 * 0.55)), w=0.04)
    s.over("line", ((0.5, 0.5), (0.68, 0.5 + 0.05 * 0.55)), w=0.035)


@_kind("headphones", 1.0, (0.5, 0.44), tag_from=(0.3, 0.12))
def _headphones(s: _Sketch) -> None:
    s.under("rect", (0.2, 0.49, 0.31, 0.87), r=0.04)
    s.under("rect", (0.69, 0.49, 0.8, 0.87), r=0.04)
    s.body("arc", (0.08, 0.02, 0.92, 0.92, 180, 360), w=0.09)
    s.body("rect", (0.0, 0.43, 0.23, 0.93), r=0.1)
    s.body("rect", (0.77, 0.43, 1.0, 0.93), r=0.1)
    s.over("rect", (0.07, 0.38, 0.16, 0.46), tone=METAL, r=0.02)
    s.over("rect", (0.84, 0.38, 0.93, 0.46), tone=METAL, r=0.02)


@_kind("phone_case", 0.5, (0.5, 0.63))
def _phone_case(s: _Sketch) -> None:
    s.body("rect", (0.0, 0.0, 1.0, 1.0), r=0.16)
    s.over("rect", (0.07, 0.03, 0.52, 0.25), r=0.12)
    for cu, cv in ((0.19, 0.08), (0.19, 0.19), (0.4, 0.135)):
        s.over("circle", (cu, cv, 0.09), tone=METAL)
        s.over("circle", (cu, cv, 0.055))


@_kind("kids_scooter", 1.2, (0.3, 0.42), tag_from=(0.62, 0.07))
def _kids_scooter(s: _Sketch) -> None:
    s.body("line", ((0.8, 0.8), (0.7, 0.07)), w=0.075)
    s.body("rect", (0.06, 0.71, 0.86, 0.84), r=0.04)
    s.body("rect", (0.56, 0.03, 0.86, 0.1), r=0.03)
    s.over("rect", (0.52, 0.025, 0.6, 0.105), r=0.03)
    s.over("rect", (0.82, 0.025, 0.9, 0.105), r=0.03)
    for cu in (0.14, 0.86):
        s.over("circle", (cu, 0.88, 0.12))
        s.over("circle", (cu, 0.88, 0.045), tone=METAL)


@_kind("toy_car", 1.9, (0.5, 0.5))
def _toy_car(s: _Sketch) -> None:
    s.body("poly", ((0.02, 0.72), (0.02, 0.45), (0.08, 0.35), (0.27, 0.3), (0.38, 0.07),
                    (0.7, 0.07), (0.82, 0.3), (0.96, 0.36), (1.0, 0.48), (1.0, 0.72)))  # fmt: skip
    s.seam("line", ((0.54, 0.32), (0.54, 0.68)), w=0.012)
    s.over("poly", ((0.41, 0.12), (0.52, 0.12), (0.52, 0.29), (0.33, 0.29)), tone=LIGHT)
    s.over("poly", ((0.56, 0.12), (0.68, 0.12), (0.77, 0.29), (0.56, 0.29)), tone=LIGHT)
    for cu in (0.22, 0.78):
        s.over("circle", (cu, 0.72, 0.19))
        s.over("circle", (cu, 0.72, 0.08), tone=METAL)
    s.over("rect", (0.96, 0.42, 1.0, 0.5), tone=LIGHT, r=0.02)


@_kind("teddy_bear", 0.85, (0.5, 0.62))
def _teddy_bear(s: _Sketch) -> None:
    s.body("circle", (0.27, 0.08, 0.1))
    s.body("circle", (0.73, 0.08, 0.1))
    s.body("ellipse", (0.03, 0.42, 0.3, 0.74))
    s.body("ellipse", (0.7, 0.42, 0.97, 0.74))
    s.body("ellipse", (0.1, 0.74, 0.44, 1.0))
    s.body("ellipse", (0.56, 0.74, 0.9, 1.0))
    s.body("ellipse", (0.19, 0.38, 0.81, 0.94))
    s.body("circle", (0.5, 0.24, 0.25))
    s.over("circle", (0.27, 0.08, 0.045))
    s.over("circle", (0.73, 0.08, 0.045))
    s.over("ellipse", (0.39, 0.25, 0.61, 0.37), tone=LIGHT)
    s.over("ellipse", (0.455, 0.26, 0.545, 0.31))
    s.over("circle", (0.4, 0.19, 0.028))
    s.over("circle", (0.6, 0.19, 0.028))


@_kind("umbrella", 1.0, (0.5, 0.3))
def _umbrella(s: _Sketch) -> None:
    s.under("line", ((0.5, 0.45), (0.5, 0.9)), w=0.025)
    s.under("arc", (0.5, 0.82, 0.66, 0.98, 0, 180), w=0.025)
    top = [(0.5 + 0.5 * math.cos(a), 0.5 + 0.46 * math.sin(a))
           for a in np.linspace(math.pi, 2 * math.pi, 33)]  # fmt: skip
    tips = [i / 8 for i in range(9)]
    scallops = []
    for a, b in zip(tips[::-1][:-1], tips[::-1][1:], strict=True):
        for t in np.linspace(0, 1, 7)[:-1]:
            scallops.append((a + (b - a) * t, 0.5 - 0.05 * math.sin(math.pi * t)))
    s.body("poly", top + scallops)
    for u in tips[1:-1]:
        s.seam("line", ((0.5, 0.04), (u, 0.5)), w=0.008)
    s.over("line", ((0.5, 0.05), (0.5, -0.02)), w=0.02)


# ---------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    box: tuple[float, float, float, float]  # object box (x0, y0, w, h) in pixels
    bg_top: RGB
    bg_bottom: RGB
    shadow: tuple[float, float, float, float]  # ellipse (cx, cy, rx, ry) in pixels
    shadow_blur: float  # px
    shadow_alpha: int  # 0..255
    prop: tuple[int, float, float, RGB] | None  # (shape, cx at floor, size px, tone)


def _layout(kind: _Kind, spec: RenderSpec) -> _Layout:
    """Everything that comes from layout_seed. Draw order is fixed: never depends on attributes."""
    rng = random.Random(spec.layout_seed)
    w, h = spec.width, spec.height
    scale = rng.uniform(0.86, 1.0)
    jx, jy = rng.uniform(-1, 1), rng.uniform(-1, 1)
    tint = [rng.uniform(-4, 4) for _ in range(3)]
    fall = rng.uniform(0.04, 0.11)  # how much darker the floor is than the wall
    shadow_dx, shadow_w = rng.uniform(-0.06, 0.06), rng.uniform(0.85, 1.05)
    shadow_blur, shadow_alpha = rng.uniform(0.5, 1.0), rng.uniform(0.35, 0.55)
    has_prop, prop_shape, prop_side = rng.random() < 0.4, rng.randrange(3), rng.random() < 0.5
    prop_size, prop_tone = rng.uniform(0.09, 0.13), rng.randrange(4)

    # Fit the box into 86 % x 76 % of the frame, keeping room for the shadow.
    bh = min(0.76 * h, 0.86 * w / kind.aspect) * scale
    bw = bh * kind.aspect
    cx = w / 2 + jx * (w - bw) * 0.3
    cy = h * 0.49 + jy * (h - bh) * 0.2
    box = (cx - bw / 2, cy - bh / 2, bw, bh)

    tinted = [c + t for c, t in zip(spec.background, tint, strict=True)]
    top = _rgb([c + 6 for c in tinted])
    bottom = _rgb([c * (1 - fall) for c in tinted])
    floor = box[1] + bh
    ry = max(0.03 * h, 0.06 * bh)
    shadow = (cx + shadow_dx * bw, floor - 0.2 * ry, 0.5 * bw * shadow_w, ry)

    prop = None
    if has_prop:
        size = prop_size * h
        gap = 0.15 * size
        cx_prop = box[0] - gap - size / 2 if prop_side else box[0] + bw + gap + size / 2
        cx_prop = min(max(cx_prop, size * 0.6), w - size * 0.6)
        tones = ((214, 208, 198), (190, 190, 192), (226, 222, 214), (160, 158, 154))
        prop = (prop_shape, cx_prop, size, tones[prop_tone])
    return _Layout(box, top, bottom, shadow, shadow_blur * ry, int(255 * shadow_alpha), prop)


def _background(lay: _Layout, w: int, h: int) -> Image.Image:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None] ** 1.6  # (h, 1): wall, then floor
    col = (1 - t) * np.float32(lay.bg_top) + t * np.float32(lay.bg_bottom)  # (h, 3)
    column = Image.fromarray(np.rint(col).astype(np.uint8)[:, None, :])  # (h, 1, 3)
    return column.resize((w, h), Image.Resampling.NEAREST)


def _shade(c: Sequence[int], f: float) -> RGB:
    return _rgb([v * f for v in c])


def _soft_ellipse(img: Image.Image, ellipse: tuple[float, float, float, float], blur: float,
                  alpha: int, color: RGB) -> None:  # fmt: skip
    """Blend a blurred ellipse of `color` into img, drawn at quarter resolution."""
    cx, cy, rx, ry = ellipse
    pad = 2 * blur + 2
    x0, y0 = max(0, int(cx - rx - pad)), max(0, int(cy - ry - pad))
    x1, y1 = min(img.width, int(cx + rx + pad) + 1), min(img.height, int(cy + ry + pad) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    q = 4
    small = Image.new("L", (max(1, (x1 - x0) // q), max(1, (y1 - y0) // q)), 0)
    sx, sy = small.width / (x1 - x0), small.height / (y1 - y0)
    ImageDraw.Draw(small).ellipse(((cx - rx - x0) * sx, (cy - ry - y0) * sy,
                                   (cx + rx - x0) * sx, (cy + ry - y0) * sy), fill=alpha)  # fmt: skip
    small = small.filter(ImageFilter.GaussianBlur(max(0.5, blur * sx)))
    img.paste(color, (x0, y0), small.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))


def _draw_prop(draw: ImageDraw.ImageDraw, prop: tuple, floor: float) -> None:
    shape, cx, size, tone = prop
    top, side = _shade(tone, 1.06), _shade(tone, 0.82)
    if shape == 0:  # sphere
        draw.ellipse((cx - size / 2, floor - size, cx + size / 2, floor), fill=tone)
        r = size * 0.14
        draw.ellipse((cx - size * 0.22 - r, floor - size * 0.72 - r,
                      cx - size * 0.22 + r, floor - size * 0.72 + r), fill=top)  # fmt: skip
    elif shape == 1:  # cylinder
        e = size * 0.18
        draw.rectangle(
            (cx - size * 0.35, floor - size + e / 2, cx + size * 0.35, floor - e / 2), fill=side
        )
        draw.ellipse((cx - size * 0.35, floor - e, cx + size * 0.35, floor), fill=side)
        draw.ellipse((cx - size * 0.35, floor - size, cx + size * 0.35, floor - size + e), fill=top)
    else:  # cube in three-quarter view
        a, b = size * 0.45, size * 0.2
        front = (
            (cx - a, floor - size + b),
            (cx, floor - size + 2 * b),
            (cx, floor),
            (cx - a, floor - 2 * b),
        )
        right = (
            (cx, floor - size + 2 * b),
            (cx + a, floor - size + b),
            (cx + a, floor - 2 * b),
            (cx, floor),
        )
        lid = (
            (cx - a, floor - size + b),
            (cx, floor - size),
            (cx + a, floor - size + b),
            (cx, floor - size + 2 * b),
        )
        draw.polygon(front, fill=tone)
        draw.polygon(right, fill=side)
        draw.polygon(lid, fill=top)


# ---------------------------------------------------------------------------------------- render


def _draw_tag(img: Image.Image, draw: ImageDraw.ImageDraw, spec: RenderSpec, kind: _Kind,
              box: tuple[float, float, float, float]) -> None:  # fmt: skip
    text = spec.brand_text.strip()
    if not text:
        return
    w, h = spec.width, spec.height
    font_path = _brand_font_path(text)
    size = max(8, round(0.085 * h))  # ~8.5 % of the height: readable after a 384 px resize
    ink = _text_mask(text, size, font_path)
    max_w = 0.62 * w
    if ink.width > max_w:  # long names shrink to fit, down to ~5 % of the height
        size = max(8, round(0.05 * h), int(size * max_w / ink.width))
        ink = _text_mask(text, size, font_path)
    pad_x, pad_y = 0.45 * size, 0.3 * size
    hole = 0.55 * size  # room for the tag's eyelet on the left
    tw, th = ink.width + 2 * pad_x + hole, ink.height + 2 * pad_y
    x0, y0, bw, bh = box
    margin = 0.02 * min(w, h)
    cx = min(max(x0 + kind.label[0] * bw, tw / 2 + margin), w - tw / 2 - margin)
    cy = min(max(y0 + kind.label[1] * bh, th / 2 + margin), h - th / 2 - margin)
    rect = (round(cx - tw / 2), round(cy - th / 2), round(cx + tw / 2), round(cy + th / 2))
    eye_x = rect[0] + hole * 0.55
    if kind.tag_from is not None:  # a hanging tag: its string runs to the product
        ax, ay = x0 + kind.tag_from[0] * bw, y0 + kind.tag_from[1] * bh
        draw.line(((ax, ay), (eye_x, cy)), fill=DARK, width=max(1, size // 20))
    line = max(1, size // 22)
    draw.rounded_rectangle(rect, radius=0.22 * size, fill=LABEL_FILL, outline=LABEL_INK, width=line)
    er = 0.12 * size
    draw.ellipse((eye_x - er, cy - er, eye_x + er, cy + er), outline=LABEL_INK, width=line)
    img.paste(LABEL_INK, (round(rect[0] + hole + pad_x), round(rect[1] + pad_y)), ink)


def render_product(spec: RenderSpec) -> Image.Image:
    """The product photo for `spec`: an RGB image of size (spec.width, spec.height)."""
    kind = _KINDS[spec.kind]
    w, h = spec.width, spec.height
    lay = _layout(kind, spec)
    img = _background(lay, w, h)
    draw = ImageDraw.Draw(img)
    x0, y0, bw, bh = lay.box
    floor = y0 + bh

    if lay.prop is not None:
        _, pcx, psize, _ = lay.prop
        _soft_ellipse(img, (pcx, floor, psize * 0.5, psize * 0.1), psize * 0.08, lay.shadow_alpha,
                      _shade(lay.bg_bottom, 0.5))  # fmt: skip
        _draw_prop(draw, lay.prop, floor)
    _soft_ellipse(img, lay.shadow, lay.shadow_blur, lay.shadow_alpha, _shade(lay.bg_bottom, 0.45))

    sketch = _Sketch()
    kind.draw(sketch)
    for op in sketch.ops["under"]:
        _draw_op(draw, op, op[2], lay.box, 1.0)

    # The body mask, at 2x, over the union of the body parts' boxes (spouts reach outside).
    part_boxes = [_op_bbox(op, lay.box) for op in sketch.ops["body"] if op[2]]
    mx0 = max(0, min(b[0] for b in part_boxes) - 2)
    my0 = max(0, min(b[1] for b in part_boxes) - 2)
    mx1 = min(w, max(b[2] for b in part_boxes) + 2)
    my1 = min(h, max(b[3] for b in part_boxes) + 2)
    ss = SUPERSAMPLE
    mask = Image.new("L", ((mx1 - mx0) * ss, (my1 - my0) * ss), 0)
    mdraw = ImageDraw.Draw(mask)
    for op in sketch.ops["body"]:
        _draw_op(mdraw, op, op[2], lay.box, ss, (mx0, my0))
    mask = mask.reduce(ss)
    bb = mask.getbbox()
    if bb is not None:
        fx0, fy0, fx1, fy1 = bb[0] + mx0, bb[1] + my0, bb[2] + mx0, bb[3] + my0
        index = _fabric_index(spec.pattern, spec.material, w, h, (fx0, fy0, fx1, fy1))
        fabric = ImageChops.add(index, _gloss(sketch, spec.material, lay.box, (fx0, fy0, fx1, fy1)))
        body_mask = mask.crop(bb)
        # A dark rim just inside the silhouette (white on white stays legible): index 0 is the
        # palette's darkest shade of the body colour. Differencing with a diagonally shifted
        # copy finds the edges; the threshold keeps whole index values (no stray palette entries).
        d = max(1, round(0.006 * min(w, h)))
        edge = ImageChops.difference(body_mask, ImageChops.offset(body_mask, d, d))
        rim = ImageChops.darker(edge, body_mask).point(_RIM_LUT)
        fabric = ImageChops.subtract(fabric, rim)
        fabric.putpalette(_palette(spec.color, _pattern_color(spec.color)))
        img.paste(fabric.convert("RGB"), (fx0, fy0), body_mask)

    seam = _seam_color(spec.color)
    for op in sketch.ops["seam"]:
        _draw_op(draw, op, seam, lay.box, 1.0)
    for op in sketch.ops["over"]:
        _draw_op(draw, op, op[2], lay.box, 1.0)
    _draw_tag(img, draw, spec, kind, lay.box)
    return img
