"""Listing titles and shopper queries in English, 汉字 and pinyin.

Titles imitate marketplace listings: brand, marketing words, style, every visible attribute, the
product noun, filler (sizes, ages, features) and a model code, in a noisy order and casing, e.g.
"M & D Simple Modern Light Luxury Grey Linen Sofa 3 Seater TE04" or
"【热销】优品简约现代灰色亚麻沙发 三人位 TE04". Queries are what a shopper types: short, lower
case, a synonym now and then, and always the attribute that tells a product from its family.
Each query also says which attributes it names (:class:`ShopperQueries`), so an evaluation can
count every product those words describe as a right answer, not only the one it was written for.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pipelines.catalog.vocab import (
    BRANDS,
    COLORS,
    KIND_BY_KEY,
    MARKETING,
    MATERIALS,
    PATTERNS,
    STYLES,
)

_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
_SPACES = re.compile(r"\s+")
_BRACKETS = re.compile(r"[【】]")


def to_pinyin(text: str) -> str:
    """Spell the Chinese runs of ``text`` in toneless pinyin; keep Latin words, numbers and codes."""
    from pypinyin import lazy_pinyin  # the catalog's only use of it; keeps module import light

    text = _BRACKETS.sub(" ", text)
    text = _CJK_RUN.sub(lambda m: " " + " ".join(lazy_pinyin(m.group(0))) + " ", text)
    return _SPACES.sub(" ", text).strip()


def _attribute_words(product, lang: str) -> list[str]:
    """Colour, pattern and material words; pattern omitted for solid (listings rarely say it)."""
    color_zh = COLORS[product.color][1]
    pattern_en, pattern_zh = PATTERNS[product.pattern]
    material_en, material_zh, _ = MATERIALS[product.material]
    if lang == "en":
        words = [product.color, material_en]
        if product.pattern != "solid":
            words.insert(1, pattern_en)
        return words
    words = [color_zh, material_zh]
    if product.pattern != "solid":
        words.insert(1, pattern_zh)
    return words


def _noisy_case(word: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        return word.title() if word.islower() else word
    if r < 0.7:
        return word.upper()
    return word


def english_title(product, rng: random.Random) -> str:
    kind = KIND_BY_KEY[product.kind]
    brand = BRANDS[product.brand]
    style = STYLES[product.style][0]
    noun = kind.en[0] if rng.random() < 0.7 else rng.choice(kind.en)
    attrs = _attribute_words(product, "en")
    if rng.random() < 0.3:
        attrs = [attrs[-1], *attrs[:-1]]  # "Linen Grey Sofa" happens as often as not
    extras = rng.sample(kind.extras_en, k=min(len(kind.extras_en), rng.randint(1, 2)))
    words = [brand.en, style, *attrs, noun, *extras, product.model_code]
    words = [_noisy_case(w, rng) if w not in (brand.en, product.model_code) else w for w in words]
    title = " ".join(words)
    if rng.random() < 0.5:
        promo = rng.choice(MARKETING)[0]
        title = f"{promo} {title}" if rng.random() < 0.5 else f"{title} | {promo}"
    if rng.random() < 0.15:
        title = title.replace(" ", "  ", 1)  # double spaces are common in scraped titles
    return title


def chinese_title(product, rng: random.Random) -> str:
    kind = KIND_BY_KEY[product.kind]
    brand = BRANDS[product.brand]
    style = STYLES[product.style][1]
    extras = rng.sample(kind.extras_zh, k=min(len(kind.extras_zh), rng.randint(1, 2)))
    body = brand.zh + style + "".join(_attribute_words(product, "zh")) + kind.zh
    title = f"{body} {' '.join(extras)} {product.model_code}"
    if rng.random() < 0.6:
        title = f"【{rng.choice(MARKETING)[1]}】{title}"
    return title


def titles_for(product, rng: random.Random) -> dict[str, str]:
    zh = chinese_title(product, rng)
    return {"en": english_title(product, rng), "zh": zh, "pinyin": to_pinyin(zh)}


QUERY_ATTRIBUTES = ("color", "pattern", "material", "brand")  # what a query may name, in order


@dataclass(frozen=True)
class ShopperQueries:
    """One product's shopper query in every language, and what the query names.

    ``attributes`` maps each of :data:`QUERY_ATTRIBUTES` to the product's value when the query
    names it, else None, written as the products table writes it: colour, pattern and material
    keys ("red", "striped", "linen") and the brand's English name ("M & D"). The same attributes
    are named in all three languages.
    """

    texts: dict[str, str]
    attributes: dict[str, str | None]


def queries_for(product, rng: random.Random) -> ShopperQueries:
    """A short shopper query per language, always naming the attribute its family varies in."""
    kind = KIND_BY_KEY[product.kind]
    brand = BRANDS[product.brand]
    pattern_en, pattern_zh = PATTERNS[product.pattern]
    material_en, material_zh, _ = MATERIALS[product.material]
    # Which attributes the query names: the family's varying one, plus one or two others.
    axes = list(QUERY_ATTRIBUTES)
    keep = {product.differs_by} if product.differs_by else set()
    keep |= set(rng.sample(axes, k=rng.randint(1, 2)))
    if product.pattern == "solid" and product.differs_by != "pattern":
        keep.discard("pattern")  # shoppers say "solid" only to tell it from a patterned twin
    en, zh = [], ""
    if "brand" in keep:
        en.append(brand.en.lower())
        zh += brand.zh
    if "color" in keep:
        en.append(product.color)
        zh += COLORS[product.color][1]
    if "pattern" in keep:
        en.append(pattern_en)
        zh += pattern_zh
    if "material" in keep:
        en.append(material_en.split()[-1])  # "leather", not "genuine leather"
        zh += material_zh
    en.append(rng.choice(kind.en))
    zh += kind.zh
    values = {
        "color": product.color,
        "pattern": product.pattern,
        "material": product.material,
        "brand": brand.en,
    }
    return ShopperQueries(
        texts={"en": " ".join(en), "zh": zh, "pinyin": to_pinyin(zh)},
        attributes={a: values[a] if a in keep else None for a in QUERY_ATTRIBUTES},
    )
