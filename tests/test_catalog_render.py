"""pipelines.catalog.render: deterministic product photos whose attributes are each visible."""

from __future__ import annotations

import hashlib
import itertools
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipelines.catalog import render
from pipelines.catalog.render import (
    KINDS,
    MATERIALS,
    PATTERNS,
    RenderSpec,
    render_product,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 320  # small keeps the suite fast; visibility fractions barely depend on size
RED, BLUE, GREY = (200, 30, 40), (35, 90, 200), (128, 128, 128)
BLACK, WHITE = (30, 30, 30), (235, 235, 230)
# A big body, two small ones (watch: a strap under a dial; phone_case) and a sparse one.
AXIS_KINDS = ("sofa", "watch", "phone_case", "kids_scooter")
VISIBLE = 0.005  # the brief: >= 0.5 % of pixels differ by more than 30 grey levels
needs_cjk_font = pytest.mark.skipif(
    not render.CJK_FONT_PATH.is_file(), reason=f"{render.CJK_FONT_PATH} missing (make fonts)"
)


def spec(**kw) -> RenderSpec:
    base = dict(kind="sofa", color=RED, pattern="solid", material="cotton", brand_text="ACME",
                width=SIZE, height=SIZE, layout_seed=3)  # fmt: skip
    return RenderSpec(**{**base, **kw})


def pixels(s: RenderSpec) -> np.ndarray:
    return np.asarray(render_product(s), dtype=np.int16)  # (H, W, 3)


def visible_fraction(a: RenderSpec, b: RenderSpec) -> float:
    """Share of pixels whose largest channel difference exceeds 30 grey levels."""
    return float((np.abs(pixels(a) - pixels(b)).max(axis=2) > 30).mean())


def corners(px: np.ndarray, k: int = 6) -> np.ndarray:
    return np.stack([px[:k, :k], px[:k, -k:], px[-k:, :k], px[-k:, -k:]])


def test_vocabularies():
    assert KINDS == (
        "sofa", "armchair", "dining_chair", "coffee_table", "table_lamp", "floor_lamp", "pillow",
        "rug", "vase", "wall_clock", "handbag", "backpack", "suitcase", "wallet", "sneaker",
        "boot", "tshirt", "dress", "hoodie", "cap", "mug", "kettle", "teapot", "water_bottle",
        "bowl", "watch", "headphones", "phone_case", "kids_scooter", "toy_car", "teddy_bear",
        "umbrella",
    )  # fmt: skip
    assert PATTERNS == ("solid", "striped", "dotted", "plaid", "floral")
    assert MATERIALS == (
        "cotton", "linen", "leather", "velvet", "wool", "wood", "steel", "plastic", "ceramic",
    )  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_a_large_product(kind):
    s = spec(kind=kind, pattern="striped", layout_seed=11)
    im = render_product(s)
    assert im.mode == "RGB" and im.size == (SIZE, SIZE)
    # The product (body, parts, tag) is what a colour change moves, and it must be large.
    changed = np.abs(pixels(s) - pixels(replace(s, color=BLUE))).max(axis=2) > 0
    assert 0.05 < changed.mean() < 0.75, f"{kind}: body covers {changed.mean():.1%}"


@pytest.mark.parametrize(("width", "height"), [(400, 300), (300, 400), (1000, 1000)])
def test_size_and_mode_follow_the_spec(width, height):
    im = render_product(spec(width=width, height=height, kind="hoodie"))
    assert im.mode == "RGB" and im.size == (width, height)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_renders(pattern):
    assert render_product(spec(pattern=pattern)).size == (SIZE, SIZE)


@pytest.mark.parametrize("material", MATERIALS)
def test_every_material_renders(material):
    assert render_product(spec(material=material, pattern="plaid")).size == (SIZE, SIZE)


def test_same_spec_same_pixels():
    s = spec(kind="teapot", pattern="floral", material="ceramic", brand_text="优品 UPIN")
    assert render_product(s).tobytes() == render_product(s).tobytes()
    assert render_product(s).tobytes() == render_product(replace(s)).tobytes()


def test_same_pixels_in_another_process():
    combos = [("sofa", "floral", "velvet"), ("vase", "plaid", "ceramic"),
              ("tshirt", "dotted", "linen"), ("watch", "striped", "leather")]  # fmt: skip
    specs = [spec(kind=k, pattern=p, material=m, brand_text="优品 UPIN", layout_seed=i)
             for i, (k, p, m) in enumerate(combos)]  # fmt: skip
    digest = hashlib.sha256(b"".join(render_product(s).tobytes() for s in specs)).hexdigest()
    code = (
        "import hashlib, sys\n"
        "from pipelines.catalog.render import RenderSpec, render_product\n"
        f"specs = {specs!r}\n"
        "print(hashlib.sha256(b''.join(render_product(s).tobytes() for s in specs)).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""})  # fmt: skip
    assert out.stdout.strip() == digest


@pytest.mark.parametrize("kind", AXIS_KINDS)
def test_color_is_visible(kind):
    for a, b in [(RED, BLUE), (BLACK, WHITE), (RED, (240, 120, 30)), (GREY, WHITE)]:
        f = visible_fraction(spec(kind=kind, color=a), spec(kind=kind, color=b))
        assert f >= VISIBLE, f"{kind} {a} vs {b}: {f:.3%}"


@pytest.mark.parametrize("kind", AXIS_KINDS)
@pytest.mark.parametrize("color", [RED, BLACK, WHITE])
def test_pattern_is_visible(kind, color):
    for a, b in itertools.combinations(PATTERNS, 2):
        f = visible_fraction(spec(kind=kind, color=color, pattern=a),
                             spec(kind=kind, color=color, pattern=b))  # fmt: skip
        assert f >= VISIBLE, f"{kind} {color} {a} vs {b}: {f:.3%}"


@pytest.mark.parametrize("material", MATERIALS)
def test_pattern_shows_on_every_material(material):
    for kind in ("sofa", "watch"):
        for pattern in PATTERNS[1:]:
            f = visible_fraction(spec(kind=kind, material=material),
                                 spec(kind=kind, material=material, pattern=pattern))  # fmt: skip
            assert f >= VISIBLE, f"{kind} {material} solid vs {pattern}: {f:.3%}"


@pytest.mark.parametrize("kind", AXIS_KINDS)
@pytest.mark.parametrize("color", [RED, BLUE])
def test_material_is_visible(kind, color):
    rendered = {m: pixels(spec(kind=kind, color=color, material=m)) for m in MATERIALS}
    for a, b in itertools.combinations(MATERIALS, 2):
        f = float((np.abs(rendered[a] - rendered[b]).max(axis=2) > 30).mean())
        assert f >= VISIBLE, f"{kind} {color} {a} vs {b}: {f:.3%}"


@pytest.mark.parametrize("kind", AXIS_KINDS)
def test_brand_text_is_visible(kind):
    # Whole names, as brand families differ; a one-glyph change ("i" vs "l") is below 0.1 %.
    for a, b in [("ACME", "UPIN"), ("NORDIKA", "ORBIT"), ("M & D", "PANDA")]:
        f = visible_fraction(spec(kind=kind, brand_text=a), spec(kind=kind, brand_text=b))
        assert f >= VISIBLE, f"{kind} {a!r} vs {b!r}: {f:.3%}"


@needs_cjk_font
def test_chinese_brand_text_renders_and_is_visible():
    latin = pixels(spec(kind="suitcase", brand_text="UPIN"))
    for text in ("优品 UPIN", "优品"):
        f = float(
            (np.abs(pixels(spec(kind="suitcase", brand_text=text)) - latin).max(axis=2) > 30).mean()
        )
        assert f >= VISIBLE, f"{text!r} vs 'UPIN': {f:.3%}"
    f = visible_fraction(
        spec(kind="watch", brand_text="优品"), spec(kind="watch", brand_text="小米")
    )
    assert f >= VISIBLE


def test_an_attribute_change_leaves_the_layout_alone():
    s = spec(kind="armchair", pattern="dotted", material="wool", layout_seed=21)
    base = pixels(s)
    for other in (replace(s, color=BLUE), replace(s, pattern="plaid"),
                  replace(s, material="steel"), replace(s, brand_text="优品 UPIN")):  # fmt: skip
        px = pixels(other)
        assert np.array_equal(corners(px), corners(base)), other  # backdrop and tint
        diff = np.abs(px - base).max(axis=2) > 0
        assert 0 < diff.mean() < 0.7
    # Nothing changed, nothing differs.
    assert np.array_equal(pixels(replace(s)), base)


def test_layout_seed_changes_the_layout():
    a, b = spec(kind="handbag", layout_seed=1), spec(kind="handbag", layout_seed=2)
    assert not np.array_equal(corners(pixels(a)), corners(pixels(b)))  # backdrop tint
    assert visible_fraction(a, b) > 0.02  # the product moved or resized


def test_empty_brand_text_draws_no_tag():
    a, b = spec(brand_text=""), spec(brand_text="   ")
    assert np.array_equal(pixels(a), pixels(b))
    assert visible_fraction(a, spec(brand_text="ACME")) >= VISIBLE


def _clear_font_caches() -> None:
    render.truetype_font.cache_clear()
    render._text_mask.cache_clear()
    render._warn_font_missing.cache_clear()


@pytest.fixture
def no_cjk_font(monkeypatch, tmp_path):
    """CJK_FONT_PATH points at a missing file; no font or warning cached from other tests."""
    monkeypatch.setattr(render, "CJK_FONT_PATH", tmp_path / "missing.ttc")
    _clear_font_caches()
    yield
    _clear_font_caches()


def test_missing_cjk_font_draws_the_latin_part_and_warns_once(no_cjk_font, caplog):
    caplog.set_level(logging.WARNING, logger=render.__name__)
    mixed = spec(brand_text="优品 UPIN")
    im = render_product(mixed)
    assert im.mode == "RGB" and im.size == (SIZE, SIZE)
    # The tag keeps the Latin part, in Pillow's default font, as "UPIN" alone would draw it.
    assert np.array_equal(pixels(mixed), pixels(spec(brand_text="UPIN")))
    # All-Chinese text has nothing left to draw: no tag, as for an empty brand.
    assert np.array_equal(pixels(spec(brand_text="优品")), pixels(spec(brand_text="")))
    assert render_product(mixed).tobytes() == im.tobytes()  # still deterministic
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "fonts-wqy-microhei" in warnings[0].getMessage()
    assert "missing.ttc" in warnings[0].getMessage()


def test_missing_cjk_font_is_silent_for_latin_text(no_cjk_font, caplog):
    caplog.set_level(logging.WARNING, logger=render.__name__)
    assert render_product(spec(brand_text="UPIN")).size == (SIZE, SIZE)
    assert not caplog.records


@pytest.mark.parametrize(
    ("field", "value"),
    [("kind", "spaceship"), ("pattern", "paisley"), ("material", "glass"),
     ("color", (300, 0, 0)), ("width", 10), ("height", 100_000)],
)  # fmt: skip
def test_bad_spec_says_what_it_got(field, value):
    with pytest.raises(ValueError, match=field):
        spec(**{field: value})
