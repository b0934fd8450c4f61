"""Attribute-swapped titles: a product's title with one attribute word changed, as a text negative.

The hardest mistakes of a product search are near misses: the red linen sofa for "blue linen
sofa". Families give image-side hard negatives (the blue twin's photo); swapping one attribute in
a title gives the text side for every product, family or not: "M & D Red Linen Sofa" becomes
"M & D Blue Linen Sofa", which the red sofa's photo must not match. Only the one word changes,
in the title's own language and script, so the model can tell the two apart only by seeing the
attribute, not by the wording.

The lexicon holds every attribute value's surface form per title language, taken from
``vocab.py`` the way ``titles.py`` writes them: English (colour keys, pattern and material
words, ``Brand.en``), 汉字 and pinyin (derived with the same ``to_pinyin``). Values are keyed as the
products table writes them: colour, pattern and material keys, and ``Brand.en`` for brands.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipelines.catalog.titles import to_pinyin
from pipelines.catalog.vocab import BRANDS, COLORS, KIND_BY_KEY, MATERIALS, PATTERNS

SWAPPABLE = ("color", "pattern", "material", "brand")
LANGS = ("en", "zh", "pinyin")
# Titles never write these values (a solid product's title names no pattern, in any language), so
# a swapped title naming one would be told apart by the unusual word alone: not chosen by default.
UNWRITTEN = {"pattern": ("solid",)}
_LATIN = re.compile(r"[A-Za-z]")

Lexicon = Mapping[str, Mapping[str, Mapping[str, str | None]]]


@dataclass(frozen=True)
class Found:
    """One attribute value written in a title, at ``title[start:end]``."""

    attribute: str
    value: str
    start: int
    end: int


@functools.cache
def lexicon() -> Lexicon:
    """attribute -> value -> language -> surface form (None: that language never writes it).

    English titles omit a solid pattern, and "solid" alone would also match "solid wood", so it
    has no English form. Do not mutate the result: it is shared.
    """
    english = {
        "color": {key: key for key in COLORS},
        "pattern": {key: None if key == "solid" else en for key, (en, _) in PATTERNS.items()},
        "material": {key: en for key, (en, _, _) in MATERIALS.items()},
        "brand": {brand.en: brand.en for brand in BRANDS},
    }
    chinese = {
        "color": {key: zh for key, (_, zh) in COLORS.items()},
        "pattern": {key: zh for key, (_, zh) in PATTERNS.items()},
        "material": {key: zh for key, (_, zh, _) in MATERIALS.items()},
        "brand": {brand.en: brand.zh for brand in BRANDS},
    }
    return {
        attribute: {
            value: {"en": english[attribute][value], "zh": zh, "pinyin": to_pinyin(zh)}
            for value, zh in chinese[attribute].items()
        }
        for attribute in SWAPPABLE
    }


def _normal(form: str) -> str:
    return " ".join(form.split()).lower()


@functools.cache
def _matcher(lang: str) -> tuple[re.Pattern[str], dict[str, tuple[str, str]]]:
    """One regex of every form of ``lang`` (longest first) and normal form -> (attribute, value)."""
    owners: dict[str, tuple[str, str]] = {}
    for attribute, values in lexicon().items():
        for value, forms in values.items():
            form = forms[lang]
            if form is None:
                continue
            key = _normal(form)
            if key in owners:
                raise ValueError(
                    f"{lang} form {form!r} is written both for {owners[key]} and "
                    f"{(attribute, value)}: titles could not be parsed back"
                )
            owners[key] = (attribute, value)
    body = "|".join(
        r"\s+".join(re.escape(word) for word in key.split())
        for key in sorted(owners, key=len, reverse=True)
    )
    # Chinese has no spaces between words; English and pinyin match whole words only.
    pattern = f"(?:{body})" if lang == "zh" else rf"(?<!\w)(?:{body})(?!\w)"
    return re.compile(pattern, re.IGNORECASE), owners


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")


def find_attributes(title: str, lang: str) -> list[Found]:
    """Every attribute value written in ``title``, left to right, longest form first at a place."""
    _check_lang(lang)
    pattern, owners = _matcher(lang)
    return [
        Found(*owners[_normal(m.group(0))], m.start(), m.end()) for m in pattern.finditer(title)
    ]


def parse_attributes(title: str, lang: str) -> dict[str, tuple[str, ...]]:
    """attribute -> the values ``title`` names (in order, each once; empty when none)."""
    parsed: dict[str, tuple[str, ...]] = {attribute: () for attribute in SWAPPABLE}
    for found in find_attributes(title, lang):
        if found.value not in parsed[found.attribute]:
            parsed[found.attribute] += (found.value,)
    return parsed


def _default_allowed(product: Mapping[str, str], attribute: str) -> Sequence[str]:
    if attribute == "material":
        kind = product.get("kind")
        if kind not in KIND_BY_KEY:
            raise ValueError(
                f"material swaps choose among the kind's materials: product needs a 'kind' "
                f"of {sorted(KIND_BY_KEY)}, got {product!r}"
            )
        return KIND_BY_KEY[kind].materials
    unwritten = UNWRITTEN.get(attribute, ())
    return [value for value in lexicon()[attribute] if value not in unwritten]


def _styled(found: str, new: str, attribute: str) -> str:
    """``new`` in the casing of ``found`` (brands keep their own spelling)."""
    if attribute == "brand":
        return new
    if found.isupper():
        return new.upper()
    if found.islower():
        return new.lower()
    if found.istitle():
        return new.title()
    return new


def _candidates(
    attribute: str, own: str, lang: str, allowed: Sequence[str], present: set[str]
) -> list[str]:
    """The forms a swap may write: allowed, written in ``lang``, not own and not in the title."""
    values = lexicon()[attribute]
    unknown = [value for value in allowed if value not in values]
    if unknown:
        raise ValueError(f"allowed {attribute} values must be of {list(values)}, got {unknown}")
    out = []
    for value in dict.fromkeys(allowed):  # each once, in the caller's order
        form = values[value][lang]
        if value == own or value in present or form is None:
            continue
        if lang == "zh" and _LATIN.search(form):
            continue  # a Latin brand would be the 汉字 title's only new Latin word
        out.append(form)
    return out


def swap_attribute(
    title: str,
    lang: str,
    product: Mapping[str, str],
    attribute: str,
    rng: random.Random,
    *,
    allowed: Sequence[str] | None = None,
) -> str | None:
    """``title`` with the product's ``attribute`` written as another value, or None if impossible.

    None when the title does not write the product's value (no title writes a solid pattern) or
    no allowed value is left. The new value is drawn uniformly with ``rng`` among
    ``allowed`` (default: the kind's materials for ``material``, every written value otherwise)
    minus the product's own and any the title already names. English and pinyin match whole
    words, case-insensitively, and the replacement takes the casing of what it replaces.
    """
    _check_lang(lang)
    if attribute not in SWAPPABLE:
        raise ValueError(f"attribute must be one of {SWAPPABLE}, got {attribute!r}")
    own = product.get(attribute)
    if own not in lexicon()[attribute]:
        raise ValueError(
            f"product {attribute} must be one of {list(lexicon()[attribute])}, got {own!r} "
            f"in {product!r}"
        )
    found = find_attributes(title, lang)
    spans = [f for f in found if f.attribute == attribute and f.value == own]
    if not spans:
        return None
    present = {f.value for f in found if f.attribute == attribute}
    choices = _candidates(
        attribute,
        own,
        lang,
        _default_allowed(product, attribute) if allowed is None else allowed,
        present,
    )
    if not choices:
        return None
    new = rng.choice(choices)
    for span in reversed(spans):
        styled = _styled(title[span.start : span.end], new, attribute)
        title = title[: span.start] + styled + title[span.end :]
    return title


def swapped_titles(
    titles: Mapping[str, str],
    product: Mapping[str, str],
    rng: random.Random,
    attributes: Sequence[str] = SWAPPABLE,
) -> list[tuple[str, str, str]]:
    """``(lang, attribute, swapped title)``: one per language of ``titles`` (en, zh, pinyin order),
    the attribute drawn at random among those its title lets swap; a language with none is
    skipped, and so is an attribute the product has no value for (None or absent)."""
    unknown = sorted(set(titles) - set(LANGS))
    if unknown:
        raise ValueError(f"titles must be keyed by {LANGS}, got keys {unknown}")
    out = []
    known = [attribute for attribute in attributes if product.get(attribute) is not None]
    for lang in (lang for lang in LANGS if lang in titles):
        for attribute in rng.sample(known, len(known)):
            swapped = swap_attribute(titles[lang], lang, product, attribute, rng)
            if swapped is not None:
                out.append((lang, attribute, swapped))
                break
    return out
