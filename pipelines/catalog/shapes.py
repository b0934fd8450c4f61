"""Product kinds as sketches: each kind's silhouette, parts and seams in unit box coordinates.

A kind's drawing records shapes on a ``Sketch``, layer by layer; ``draw_op`` replays one in
image pixels, ``op_bbox`` bounds it and ``gloss_highlight`` gives each body part its own copy of the
material's highlight map. ``SHAPE_KINDS`` maps each of the 32 kinds to its box aspect, tag position and
drawing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipelines.catalog.fabric import RGB, highlight_map

# Neutral tones for secondary parts, so that they never read as the product's colour.
DARK: RGB = (52, 52, 56)
METAL: RGB = (150, 152, 158)
LIGHT: RGB = (238, 238, 234)


# ------------------------------------------------------------------------------------- sketching

Geom = Sequence[float]


class Sketch:
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


def draw_op(draw: ImageDraw.ImageDraw, op: tuple, fill, box: tuple[float, ...], scale: float,
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


def op_bbox(op: tuple, box: tuple[float, ...]) -> tuple[int, int, int, int]:
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


def gloss_highlight(sketch: Sketch, material: str, box: tuple[float, ...],
           body_bbox: tuple[int, int, int, int]) -> Image.Image:  # fmt: skip
    """Shading and highlights, one copy of the material's map per body part (later parts on top).

    Per part, so that each cushion, handle or strap catches its own light, and so that a sparse
    body (a scooter, a lamp) still shows the gloss or sheen that tells its material apart.
    """
    hmap = highlight_map(material)
    fx0, fy0, fx1, fy1 = body_bbox
    out = Image.new("L", (fx1 - fx0, fy1 - fy0), 0)
    for op in sketch.ops["body"]:
        if op[2] == 0:  # holes take no light
            continue
        px0, py0, px1, py1 = op_bbox(op, box)
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
class KindShape:
    aspect: float  # object box width / height
    label: tuple[float, float]  # tag centre in box units (may lie outside the box)
    draw: Callable[[Sketch], None]
    tag_from: tuple[float, float] | None = None  # a hanging tag's string starts here


SHAPE_KINDS: dict[str, KindShape] = {}


def _kind(name: str, aspect: float, label: tuple[float, float],
          tag_from: tuple[float, float] | None = None):  # fmt: skip
    def register(fn: Callable[[Sketch], None]) -> Callable[[Sketch], None]:
        SHAPE_KINDS[name] = KindShape(aspect, label, fn, tag_from)
        return fn

    return register


@_kind("sofa", 1.75, (0.5, 0.3))
def _sofa(s: Sketch) -> None:
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
def _armchair(s: Sketch) -> None:
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
def _dining_chair(s: Sketch) -> None:
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
def _coffee_table(s: Sketch) -> None:
    s.under("rect", (0.19, 0.38, 0.24, 0.84))
    s.under("rect", (0.76, 0.38, 0.81, 0.84))
    s.body("poly", ((0.09, 0.0), (0.91, 0.0), (1.0, 0.3), (0.0, 0.3)))
    s.body("rect", (0.0, 0.29, 1.0, 0.44), r=0.02)
    s.body("poly", ((0.12, 0.64), (0.88, 0.64), (0.94, 0.76), (0.06, 0.76)))
    s.seam("line", ((0.0, 0.3), (1.0, 0.3)))
    s.over("rect", (0.04, 0.43, 0.1, 1.0), r=0.01)
    s.over("rect", (0.9, 0.43, 0.96, 1.0), r=0.01)


@_kind("table_lamp", 0.72, (0.5, 0.24))
def _table_lamp(s: Sketch) -> None:
    s.under("rect", (0.46, 0.4, 0.54, 0.62))
    s.under("ellipse", (0.24, 0.93, 0.76, 1.0))
    s.body("poly", ((0.22, 0.0), (0.78, 0.0), (0.97, 0.44), (0.03, 0.44)))
    s.body("poly", _profile(((0.57, 0.1), (0.64, 0.2), (0.78, 0.25), (0.9, 0.2), (0.95, 0.14))))
    s.seam("line", ((0.22, 0.015), (0.78, 0.015)))
    s.seam("line", ((0.04, 0.425), (0.96, 0.425)))


@_kind("floor_lamp", 0.5, (0.5, 0.62), tag_from=(0.3, 0.41))
def _floor_lamp(s: Sketch) -> None:
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
def _pillow(s: Sketch) -> None:
    quad = ((0.01, 0.03), (0.99, 0.0), (0.98, 0.98), (0.0, 0.96))
    s.body("poly", _bowed_quad(quad, 0.16))
    inner = _bowed_quad(((0.04, 0.06), (0.96, 0.04), (0.95, 0.94), (0.03, 0.93)), 0.16)
    s.seam("line", (*inner, inner[0]), w=0.01)


@_kind("rug", 1.6, (0.76, 0.72))
def _rug(s: Sketch) -> None:
    s.body("poly", ((0.1, 0.1), (0.9, 0.1), (1.0, 0.9), (0.0, 0.9)))
    s.seam("line", ((0.14, 0.16), (0.86, 0.16), (0.94, 0.84), (0.06, 0.84), (0.14, 0.16)), w=0.015)
    for i in range(17):
        t = (i + 0.5) / 17
        s.over("line", ((0.1 + 0.8 * t, 0.1), (0.1 + 0.8 * t, 0.03)), tone=LIGHT, w=0.012)
        s.over("line", ((t, 0.9), (t, 0.98)), tone=LIGHT, w=0.012)


@_kind("vase", 0.62, (0.5, 0.62))
def _vase(s: Sketch) -> None:
    s.body("poly", _profile(((0.0, 0.3), (0.06, 0.23), (0.18, 0.19), (0.36, 0.36), (0.6, 0.5),
                             (0.82, 0.44), (0.96, 0.3), (1.0, 0.27))))  # fmt: skip
    s.over("ellipse", (0.23, -0.015, 0.77, 0.03))


@_kind("wall_clock", 1.0, (0.5, 0.7))
def _wall_clock(s: Sketch) -> None:
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
def _handbag(s: Sketch) -> None:
    s.under("arc", (0.24, 0.0, 0.76, 0.7, 180, 360), w=0.06)
    s.body("poly", ((0.12, 0.33), (0.88, 0.33), (0.99, 0.97), (0.01, 0.97)))
    s.seam("line", ((0.12, 0.34), (0.15, 0.58), (0.5, 0.67), (0.85, 0.58), (0.88, 0.34)), w=0.014)
    s.over("rect", (0.45, 0.58, 0.55, 0.7), tone=METAL, r=0.02)
    s.over("rect", (0.21, 0.29, 0.28, 0.37), r=0.01)
    s.over("rect", (0.72, 0.29, 0.79, 0.37), r=0.01)


@_kind("backpack", 0.8, (0.5, 0.36))
def _backpack(s: Sketch) -> None:
    s.under("arc", (0.38, 0.0, 0.62, 0.18, 180, 360), w=0.04)
    s.under("rect", (0.0, 0.22, 0.12, 0.9), r=0.05)
    s.under("rect", (0.88, 0.22, 1.0, 0.9), r=0.05)
    s.body("ellipse", (0.08, 0.07, 0.92, 0.55))
    s.body("rect", (0.08, 0.3, 0.92, 1.0), r=0.09)
    s.seam("rect_outline", (0.2, 0.58, 0.8, 0.93), r=0.06, w=0.014)
    s.seam("line", ((0.2, 0.66), (0.8, 0.66)), w=0.012)
    s.over("rect", (0.72, 0.63, 0.76, 0.72), tone=METAL, r=0.01)


@_kind("suitcase", 0.68, (0.5, 0.32))
def _suitcase(s: Sketch) -> None:
    s.under("arc", (0.34, 0.0, 0.66, 0.18, 180, 360), w=0.05)
    s.under("circle", (0.16, 0.955, 0.07))
    s.under("circle", (0.84, 0.955, 0.07))
    s.body("rect", (0.03, 0.07, 0.97, 0.94), r=0.1)
    for u in (0.22, 0.78):
        s.seam("line", ((u, 0.12), (u, 0.89)), w=0.016)
    s.seam("line", ((0.5, 0.5), (0.5, 0.89)), w=0.016)


@_kind("wallet", 1.45, (0.44, 0.58))
def _wallet(s: Sketch) -> None:
    s.body("rect", (0.0, 0.1, 1.0, 0.9), r=0.09)
    s.seam("rect_outline", (0.035, 0.15, 0.965, 0.85), r=0.07, w=0.01)
    s.seam("line", ((0.0, 0.34), (1.0, 0.34)), w=0.014)
    s.over("circle", (0.88, 0.34, 0.06), tone=METAL)


@_kind("sneaker", 1.9, (0.3, -0.16), tag_from=(0.47, 0.1))
def _sneaker(s: Sketch) -> None:
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
def _boot(s: Sketch) -> None:
    s.body("poly", _catmull_rom(((0.1, 0.87), (0.11, 0.45), (0.12, 0.0), (0.58, 0.0),
                                 (0.58, 0.5), (0.66, 0.6), (0.88, 0.65), (0.99, 0.74),
                                 (1.0, 0.87))))  # fmt: skip
    s.seam("line", ((0.12, 0.06), (0.58, 0.06)), w=0.015)
    s.seam("line", ((0.58, 0.52), (0.68, 0.7), (0.99, 0.77)), w=0.012)
    s.over("rect", (0.07, 0.86, 1.0, 0.93), r=0.02)
    s.over("rect", (0.07, 0.9, 0.34, 1.0), r=0.01)
    s.over("rect", (0.3, 0.0, 0.4, 0.1), r=0.01)


@_kind("tshirt", 1.1, (0.5, 0.46))
def _tshirt(s: Sketch) -> None:
    s.body("poly", ((0.36, 0.02), (0.64, 0.02), (0.82, 0.07), (1.0, 0.3), (0.86, 0.43),
                    (0.79, 0.35), (0.79, 0.99), (0.21, 0.99), (0.21, 0.35), (0.14, 0.43),
                    (0.0, 0.3), (0.18, 0.07)))  # fmt: skip
    s.cut("ellipse", (0.38, -0.08, 0.62, 0.12))
    s.seam("arc", (0.36, -0.1, 0.64, 0.15, 0, 180), w=0.02)
    s.seam("line", ((0.21, 0.35), (0.22, 0.1)), w=0.01)
    s.seam("line", ((0.79, 0.35), (0.78, 0.1)), w=0.01)
    s.seam("line", ((0.21, 0.95), (0.79, 0.95)), w=0.01)


@_kind("dress", 0.72, (0.5, 0.64))
def _dress(s: Sketch) -> None:
    s.body("poly", ((0.34, 0.0), (0.41, 0.0), (0.44, 0.08), (0.56, 0.08), (0.59, 0.0), (0.66, 0.0),
                    (0.7, 0.18), (0.65, 0.36), (0.98, 0.97), (0.75, 1.0), (0.5, 1.01), (0.25, 1.0),
                    (0.02, 0.97), (0.35, 0.36), (0.3, 0.18)))  # fmt: skip
    s.seam("line", ((0.35, 0.36), (0.65, 0.36)), w=0.02)
    for u0, u1 in ((0.44, 0.3), (0.56, 0.7)):
        s.seam("line", ((u0, 0.4), (u1, 0.97)), w=0.008)


@_kind("hoodie", 1.15, (0.5, 0.46))
def _hoodie(s: Sketch) -> None:
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
def _cap(s: Sketch) -> None:
    s.body("pieslice", (0.05, 0.08, 0.8, 1.46, 180, 360))
    s.body("poly", ((0.6, 0.68), (0.92, 0.72), (1.0, 0.8), (0.97, 0.87), (0.6, 0.85)))
    s.seam("line", ((0.42, 0.1), (0.22, 0.77)), w=0.012)
    s.seam("line", ((0.42, 0.1), (0.62, 0.77)), w=0.012)
    s.seam("line", ((0.05, 0.76), (0.8, 0.76)), w=0.016)
    s.over("circle", (0.425, 0.09, 0.04))


@_kind("mug", 1.2, (0.4, 0.56))
def _mug(s: Sketch) -> None:
    s.body("ellipse", (0.58, 0.22, 0.98, 0.8))
    s.cut("ellipse", (0.68, 0.34, 0.88, 0.68))
    s.body("rect", (0.04, 0.09, 0.76, 0.95), r=0.04)
    s.body("ellipse", (0.04, 0.02, 0.76, 0.16))
    s.body("ellipse", (0.04, 0.9, 0.76, 1.0))
    s.over("ellipse", (0.075, 0.04, 0.725, 0.14))


@_kind("kettle", 1.05, (0.44, 0.62))
def _kettle(s: Sketch) -> None:
    s.under("arc", (0.2, 0.0, 0.68, 0.52, 180, 360), w=0.055)
    s.under("rect", (0.08, 0.92, 0.8, 1.0), r=0.03)
    s.body("poly", ((0.7, 0.6), (0.92, 0.28), (0.99, 0.29), (0.78, 0.8)))
    s.body("ellipse", (0.22, 0.13, 0.66, 0.3))
    s.body("poly", _profile(((0.2, 0.22), (0.4, 0.27), (0.65, 0.32), (0.93, 0.34)), cu=0.44))
    s.seam("line", ((0.23, 0.22), (0.65, 0.22)), w=0.012)
    s.over("ellipse", (0.39, 0.08, 0.49, 0.16))


@_kind("teapot", 1.45, (0.5, 0.66))
def _teapot(s: Sketch) -> None:
    s.body("ellipse", (0.67, 0.36, 0.97, 0.86))
    s.cut("ellipse", (0.74, 0.46, 0.9, 0.76))
    s.body("poly", ((0.3, 0.7), (0.12, 0.5), (0.02, 0.3), (0.09, 0.27), (0.2, 0.42), (0.33, 0.52)))
    s.body("ellipse", (0.22, 0.28, 0.78, 1.0))
    s.body("ellipse", (0.34, 0.17, 0.66, 0.38))
    s.seam("line", ((0.33, 0.31), (0.67, 0.31)), w=0.014)
    s.over("circle", (0.5, 0.15, 0.05))


@_kind("water_bottle", 0.4, (0.5, 0.58))
def _water_bottle(s: Sketch) -> None:
    s.under("rect", (0.28, 0.0, 0.72, 0.13), r=0.08)
    s.body("poly", ((0.3, 0.12), (0.7, 0.12), (0.92, 0.27), (0.08, 0.27)))
    s.body("rect", (0.08, 0.22, 0.92, 1.0), r=0.16)
    s.seam("line", ((0.08, 0.3), (0.92, 0.3)), w=0.02)
    s.seam("line", ((0.09, 0.93), (0.91, 0.93)), w=0.02)


@_kind("bowl", 2.0, (0.5, 0.58))
def _bowl(s: Sketch) -> None:
    s.under("rect", (0.35, 0.88, 0.65, 1.0), r=0.02)
    s.body("pieslice", (0.0, -0.75, 1.0, 0.95, 0, 180))
    s.body("ellipse", (0.0, 0.0, 1.0, 0.22))
    s.seam("ellipse_outline", (0.025, 0.015, 0.975, 0.205), w=0.025)


@_kind("watch", 0.55, (0.5, 1.0))
def _watch(s: Sketch) -> None:
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
def _headphones(s: Sketch) -> None:
    s.under("rect", (0.2, 0.49, 0.31, 0.87), r=0.04)
    s.under("rect", (0.69, 0.49, 0.8, 0.87), r=0.04)
    s.body("arc", (0.08, 0.02, 0.92, 0.92, 180, 360), w=0.09)
    s.body("rect", (0.0, 0.43, 0.23, 0.93), r=0.1)
    s.body("rect", (0.77, 0.43, 1.0, 0.93), r=0.1)
    s.over("rect", (0.07, 0.38, 0.16, 0.46), tone=METAL, r=0.02)
    s.over("rect", (0.84, 0.38, 0.93, 0.46), tone=METAL, r=0.02)


@_kind("phone_case", 0.5, (0.5, 0.63))
def _phone_case(s: Sketch) -> None:
    s.body("rect", (0.0, 0.0, 1.0, 1.0), r=0.16)
    s.over("rect", (0.07, 0.03, 0.52, 0.25), r=0.12)
    for cu, cv in ((0.19, 0.08), (0.19, 0.19), (0.4, 0.135)):
        s.over("circle", (cu, cv, 0.09), tone=METAL)
        s.over("circle", (cu, cv, 0.055))


@_kind("kids_scooter", 1.2, (0.3, 0.42), tag_from=(0.62, 0.07))
def _kids_scooter(s: Sketch) -> None:
    s.body("line", ((0.8, 0.8), (0.7, 0.07)), w=0.075)
    s.body("rect", (0.06, 0.71, 0.86, 0.84), r=0.04)
    s.body("rect", (0.56, 0.03, 0.86, 0.1), r=0.03)
    s.over("rect", (0.52, 0.025, 0.6, 0.105), r=0.03)
    s.over("rect", (0.82, 0.025, 0.9, 0.105), r=0.03)
    for cu in (0.14, 0.86):
        s.over("circle", (cu, 0.88, 0.12))
        s.over("circle", (cu, 0.88, 0.045), tone=METAL)


@_kind("toy_car", 1.9, (0.5, 0.5))
def _toy_car(s: Sketch) -> None:
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
def _teddy_bear(s: Sketch) -> None:
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
def _umbrella(s: Sketch) -> None:
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
