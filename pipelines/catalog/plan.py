"""The catalog plan: which products exist, in which families, with which attributes and titles.

Everything is decided here, cheaply and deterministically from the seed, before any pixel is
drawn; rendering (in worker processes) only turns a :class:`ProductPlan` into image bytes. Every
random choice draws from a generator seeded by ``(seed, what, index)``, so a product's content
does not depend on how the work is split across processes or files.

Families are near-duplicates: 2–4 products of one kind that differ in exactly one *visible*
attribute (colour, pattern, material or the printed brand), shot with the same layout. They are
the hard negatives of retrieval, and a family never straddles two splits.

Splits are by family: ``train`` (70%) to fine-tune on, ``val`` (10%) to choose checkpoints and
settings on, ``test`` (20%) to report. Choosing on the figures that are reported would flatter
them, so the two held-out splits are kept apart. A family's split is one draw from
``(seed, "split", family)``: below TEST_FRACTION is ``test`` (as when there was no ``val``), the
next VAL_FRACTION is ``val``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from pipelines.catalog.titles import queries_for, titles_for
from pipelines.catalog.vocab import BRANDS, COLORS, KINDS, MATERIALS, PATTERNS, STYLES

TITLE_LANGS = ("en", "zh", "pinyin")
LANG_WEIGHTS = (0.45, 0.35, 0.20)  # listing language mix across the catalog
FAMILY_SIZES = (1, 2, 3, 4)
FAMILY_SIZE_WEIGHTS = (0.3, 0.35, 0.25, 0.1)
AXES = ("color", "pattern", "material", "brand")  # what a family may vary in: all visible
FORMATS = ("JPEG", "PNG", "WEBP")
FORMAT_WEIGHTS = (0.88, 0.07, 0.05)
SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
# On near-black or near-white bodies the materials' textures have little room to show (a black
# wood vs black steel coffee table differed in 0.3% of pixels), so material families avoid them.
_FLAT_FOR_MATERIAL = ("black", "navy", "white")


@dataclass(frozen=True)
class ProductPlan:
    product_id: str
    family_id: str
    kind: str
    color: str
    pattern: str
    material: str
    brand: int  # index into vocab.BRANDS
    style: int  # index into vocab.STYLES; a claim about the product, so shared by its family
    model_code: str  # e.g. "TE04": shared by a family, as marketplaces do
    differs_by: str | None  # the attribute this product's family varies in (None: no family)
    split: str  # one of SPLITS ("train" | "val" | "test"), by family
    width: int
    height: int
    layout_seed: int  # everything in the photo that is not an attribute
    image_format: str  # JPEG | PNG | WEBP
    price: float
    title_lang: str
    titles: dict[str, str] = field(default_factory=dict)  # all three languages
    queries: dict[str, str] = field(default_factory=dict)  # shopper queries, all three languages
    # What the queries name: {"color"|"pattern"|"material"|"brand": the product's value or None}
    query_attributes: dict[str, str | None] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.titles[self.title_lang]


def _rng(seed: int, what: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{what}:{index}")


def _split(seed: int, family: int) -> str:
    draw = _rng(seed, "split", family).random()
    if draw < TEST_FRACTION:
        return "test"
    return "val" if draw < TEST_FRACTION + VAL_FRACTION else "train"


def _image_size(rng: random.Random) -> tuple[int, int]:
    side = rng.randrange(400, 1001, 10)
    shape = rng.random()
    if shape < 0.7:
        return side, side
    short = max(400, int(side * 0.75) // 10 * 10)
    return (side, short) if shape < 0.85 else (short, side)


def _base_product(seed: int, family: int) -> ProductPlan:
    rng = _rng(seed, "family", family)
    kind = rng.choice(KINDS)
    width, height = _image_size(rng)
    return ProductPlan(
        product_id="",
        family_id=f"f{family:06d}",
        kind=kind.key,
        color=rng.choice(list(COLORS)),
        pattern=rng.choices(list(PATTERNS), weights=(4, 1, 1, 1, 1))[0],
        material=rng.choice(kind.materials),
        brand=rng.randrange(len(BRANDS)),
        style=rng.randrange(len(STYLES)),
        model_code=f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randrange(1, 100):02d}",
        differs_by=None,
        split=_split(seed, family),
        width=width,
        height=height,
        layout_seed=rng.randrange(2**31),
        image_format=rng.choices(FORMATS, weights=FORMAT_WEIGHTS)[0],
        price=0.0,
        title_lang="en",
    )


def _axis_values(base: ProductPlan, axis: str) -> list:
    if axis == "color":
        return list(COLORS)
    if axis == "pattern":
        return list(PATTERNS)
    if axis == "material":
        return list(next(k for k in KINDS if k.key == base.kind).materials)
    return list(range(len(BRANDS)))


def _family(seed: int, family: int, size: int) -> list[ProductPlan]:
    base = _base_product(seed, family)
    if size == 1:
        return [base]
    rng = _rng(seed, "variants", family)
    axes = [a for a in AXES if len(_axis_values(base, a)) >= size]
    axis = rng.choice(axes)
    if axis == "material" and base.color in _FLAT_FOR_MATERIAL:
        base = replace(base, color=rng.choice([c for c in COLORS if c not in _FLAT_FOR_MATERIAL]))
    current = getattr(base, axis)
    others = [v for v in _axis_values(base, axis) if v != current]
    values = [current, *rng.sample(others, size - 1)]
    return [replace(base, differs_by=axis, **{axis: v}) for v in values]


def _finish(seed: int, index: int, product: ProductPlan) -> ProductPlan:
    """Per-product choices: id, listing language, price, titles and queries."""
    rng = _rng(seed, "product", index)
    factor = MATERIALS[product.material][2]
    base_price = next(k.price for k in KINDS if k.key == product.kind)
    price = max(round(base_price * factor * rng.uniform(0.7, 1.3)) - 0.01, 0.99)
    product = replace(
        product,
        product_id=f"p{index:07d}",
        title_lang=rng.choices(TITLE_LANGS, weights=LANG_WEIGHTS)[0],
        price=round(price, 2),
    )
    titles = titles_for(product, rng)
    queries = queries_for(product, rng)
    return replace(
        product, titles=titles, queries=queries.texts, query_attributes=queries.attributes
    )


def plan_catalog(n_products: int, seed: int) -> list[ProductPlan]:
    """``n_products`` products in families, deterministic for ``seed``."""
    if n_products < 1:
        raise ValueError(f"n_products must be at least 1, got {n_products}")
    products: list[ProductPlan] = []
    family = 0
    while len(products) < n_products:
        size = _rng(seed, "size", family).choices(FAMILY_SIZES, weights=FAMILY_SIZE_WEIGHTS)[0]
        size = min(size, n_products - len(products))
        for product in _family(seed, family, size):
            products.append(_finish(seed, len(products), product))
        family += 1
    return products
