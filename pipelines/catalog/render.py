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
* brand text on a white tag, 6-10 % of the image height, in WenQuanYi Micro Hei. Without that
  font (``CJK_FONT_PATH``) the tag keeps the text's Latin part in Pillow's default font and one
  warning names the package to install.

The kinds' silhouettes are drawn in ``shapes`` and the body's fabric (palette, pattern and material
textures, highlight maps) comes from ``fabric``; this module holds the public API, fonts, layout,
background, shadow and prop, the brand tag and ``render_product``.

``render_product`` is pure: the same spec gives the same pixels in any process (with the same
fonts installed).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from pipelines.catalog.fabric import (
    MATERIALS,
    PATTERNS,
    RGB,
    fabric_index,
    fabric_palette,
    fabric_pattern_color,
    seam_color,
    to_rgb,
)
from pipelines.catalog.shapes import (
    DARK,
    SHAPE_KINDS,
    KindShape,
    Sketch,
    draw_op,
    gloss_highlight,
    op_bbox,
)

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = (
    "sofa", "armchair", "dining_chair", "coffee_table", "table_lamp", "floor_lamp", "pillow",
    "rug", "vase", "wall_clock", "handbag", "backpack", "suitcase", "wallet", "sneaker", "boot",
    "tshirt", "dress", "hoodie", "cap", "mug", "kettle", "teapot", "water_bottle", "bowl", "watch",
    "headphones", "phone_case", "kids_scooter", "toy_car", "teddy_bear", "umbrella",
)  # fmt: skip
# PATTERNS and MATERIALS, imported above from fabric (whose textures they name), are API too.
CJK_FONT_PATH: Path = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
FONT_PACKAGE = "fonts-wqy-microhei"  # the Debian package that ships CJK_FONT_PATH

MIN_SIZE, MAX_SIZE = 64, 4096  # the catalog uses 400..1000; smaller sizes keep tests fast

# The brand tag's colours: neutral, so that they never read as the product's colour.
LABEL_FILL: RGB = (252, 252, 250)
LABEL_INK: RGB = (28, 28, 32)

SUPERSAMPLE = 2  # body masks are drawn at 2x and reduced: smooth edges for ~0.5 ms
_RIM_LUT = [255 if v >= 128 else 0 for v in range(256)]  # rim pixels: full or none


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


def _beyond_fallback(ch: str) -> bool:
    # Beyond Latin Extended-B the fallback font has no glyphs.
    return ord(ch) > 0x24F


def _needs_cjk(text: str) -> bool:
    return any(_beyond_fallback(ch) for ch in text)


@functools.lru_cache(maxsize=64)
def truetype_font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size)
    return ImageFont.truetype(path, size)


def brand_font_path(text: str) -> str | None:
    """The CJK font's path, or None for Pillow's default font: for Latin-only text, and (with a
    warning, once per process) for CJK text when the CJK font is missing."""
    path = Path(CJK_FONT_PATH)  # read at call time so tests can point it elsewhere
    if path.is_file():
        return str(path)
    if _needs_cjk(text):
        _warn_font_missing(str(path))
    return None


@functools.cache
def _warn_font_missing(path: str) -> None:
    # Cached: a catalog draws thousands of tags, and one warning says all there is to say.
    logger.warning(
        "CJK font %s is missing: Chinese brand text is drawn without its Chinese characters "
        "(Pillow's default font has none). For the full labels install the Debian package %s "
        "(apt-get install %s, or make fonts) and render again.",
        path, FONT_PACKAGE, FONT_PACKAGE,
    )  # fmt: skip


def drawable_text(text: str, font_path: str | None) -> str:
    """`text` as the font at `font_path` can draw it: Pillow's default font (None) drops the
    characters it has no glyphs for, so a mixed name like "优品 UPIN" keeps "UPIN"."""
    if font_path is not None:
        return text
    return " ".join("".join(" " if _beyond_fallback(ch) else ch for ch in text).split())


@functools.lru_cache(maxsize=512)
def _text_mask(text: str, size: int, font_path: str | None) -> Image.Image:
    """The text's ink (L, tight box), bold by a stroke: more ink, so a changed name shows more."""
    font = truetype_font(font_path, size)
    stroke = max(1, size // 28)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font, stroke_width=stroke)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255,
                              stroke_width=stroke, stroke_fill=255)  # fmt: skip
    return mask


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


def _layout(kind: KindShape, spec: RenderSpec) -> _Layout:
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
    top = to_rgb([c + 6 for c in tinted])
    bottom = to_rgb([c * (1 - fall) for c in tinted])
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
    return to_rgb([v * f for v in c])


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


def _draw_tag(img: Image.Image, draw: ImageDraw.ImageDraw, spec: RenderSpec, kind: KindShape,
              box: tuple[float, float, float, float]) -> None:  # fmt: skip
    text = spec.brand_text.strip()
    if not text:
        return
    w, h = spec.width, spec.height
    font_path = brand_font_path(text)
    text = drawable_text(text, font_path)
    if not text:  # all of it Chinese, and no font for it: no tag rather than empty boxes
        return
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
    kind = SHAPE_KINDS[spec.kind]
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

    sketch = Sketch()
    kind.draw(sketch)
    for op in sketch.ops["under"]:
        draw_op(draw, op, op[2], lay.box, 1.0)

    # The body mask, at 2x, over the union of the body parts' boxes (spouts reach outside).
    part_boxes = [op_bbox(op, lay.box) for op in sketch.ops["body"] if op[2]]
    mx0 = max(0, min(b[0] for b in part_boxes) - 2)
    my0 = max(0, min(b[1] for b in part_boxes) - 2)
    mx1 = min(w, max(b[2] for b in part_boxes) + 2)
    my1 = min(h, max(b[3] for b in part_boxes) + 2)
    ss = SUPERSAMPLE
    mask = Image.new("L", ((mx1 - mx0) * ss, (my1 - my0) * ss), 0)
    mdraw = ImageDraw.Draw(mask)
    for op in sketch.ops["body"]:
        draw_op(mdraw, op, op[2], lay.box, ss, (mx0, my0))
    mask = mask.reduce(ss)
    bb = mask.getbbox()
    if bb is not None:
        fx0, fy0, fx1, fy1 = bb[0] + mx0, bb[1] + my0, bb[2] + mx0, bb[3] + my0
        index = fabric_index(spec.pattern, spec.material, w, h, (fx0, fy0, fx1, fy1))
        fabric = ImageChops.add(index, gloss_highlight(sketch, spec.material, lay.box, (fx0, fy0, fx1, fy1)))
        body_mask = mask.crop(bb)
        # A dark rim just inside the silhouette (white on white stays legible): index 0 is the
        # palette's darkest shade of the body colour. Differencing with a diagonally shifted
        # copy finds the edges; the threshold keeps whole index values (no stray palette entries).
        d = max(1, round(0.006 * min(w, h)))
        edge = ImageChops.difference(body_mask, ImageChops.offset(body_mask, d, d))
        rim = ImageChops.darker(edge, body_mask).point(_RIM_LUT)
        fabric = ImageChops.subtract(fabric, rim)
        fabric.putpalette(fabric_palette(spec.color, fabric_pattern_color(spec.color)))
        img.paste(fabric.convert("RGB"), (fx0, fy0), body_mask)

    seam = seam_color(spec.color)
    for op in sketch.ops["seam"]:
        draw_op(draw, op, seam, lay.box, 1.0)
    for op in sketch.ops["over"]:
        draw_op(draw, op, op[2], lay.box, 1.0)
    _draw_tag(img, draw, spec, kind, lay.box)
    return img
