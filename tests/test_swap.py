"""pipelines.catalog.swap: a title with exactly one attribute word changed, in its own language."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from pipelines.catalog.plan import ProductPlan, plan_catalog
from pipelines.catalog.swap import (
    LANGS,
    SWAPPABLE,
    lexicon,
    parse_attributes,
    swap_attribute,
    swapped_titles,
)
from pipelines.catalog.titles import to_pinyin
from pipelines.catalog.vocab import BRANDS, KIND_BY_KEY

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")


def _product(p: ProductPlan) -> dict[str, str]:
    return {"kind": p.kind, "color": p.color, "pattern": p.pattern, "material": p.material,
            "brand": BRANDS[p.brand].en}  # fmt: skip


@pytest.fixture(scope="module")
def plan() -> list[ProductPlan]:
    return plan_catalog(400, seed=3)


def _check_swap(original: str, swapped: str, lang: str, product: dict, attribute: str) -> None:
    assert swapped != original
    if lang == "zh":
        assert _CJK.search(swapped)
        assert set(_LATIN_WORD.findall(swapped)) <= set(_LATIN_WORD.findall(original))
    else:
        assert not _CJK.search(swapped)
    before, after = parse_attributes(original, lang), parse_attributes(swapped, lang)
    changed = [a for a in SWAPPABLE if before[a] != after[a]]
    assert changed == [attribute], (original, swapped)
    assert before[attribute] == (product[attribute],)
    assert len(after[attribute]) == 1 and after[attribute][0] != product[attribute]
    if attribute == "material":
        assert after["material"][0] in KIND_BY_KEY[product["kind"]].materials


def test_generated_titles_parse_back_to_their_products_attributes(plan):
    for p in plan:
        product = _product(p)
        for lang in LANGS:
            want = {a: (product[a],) for a in SWAPPABLE}
            if p.pattern == "solid":
                want["pattern"] = ()  # titles never write a solid pattern
            assert parse_attributes(p.titles[lang], lang) == want, (lang, p.titles[lang])


def test_swapped_titles_change_exactly_the_reported_attribute(plan):
    rng = random.Random(0)
    counts = Counter()
    for p in plan:
        product = _product(p)
        swaps = swapped_titles(p.titles, product, rng)
        assert [lang for lang, _, _ in swaps] == list(LANGS)  # colour is always written
        for lang, attribute, swapped in swaps:
            _check_swap(p.titles[lang], swapped, lang, product, attribute)
            counts[lang, attribute] += 1
    assert {attribute for _, attribute in counts} == set(SWAPPABLE)


def test_every_attribute_in_every_language(plan):
    rng = random.Random(1)
    swapped_any = Counter()
    for p in plan:
        product = _product(p)
        for lang in LANGS:
            for attribute in SWAPPABLE:
                swapped = swap_attribute(p.titles[lang], lang, product, attribute, rng)
                if attribute == "pattern" and p.pattern == "solid":
                    assert swapped is None  # nothing written to swap
                    continue
                assert swapped is not None, (lang, attribute, p.titles[lang])
                _check_swap(p.titles[lang], swapped, lang, product, attribute)
                swapped_any[lang, attribute] += 1
    assert len(swapped_any) == len(LANGS) * len(SWAPPABLE)


# ---- hand-made titles --------------------------------------------------------------------------
SOFA = {"kind": "sofa", "color": "red", "pattern": "striped", "material": "leather",
        "brand": "M & D"}  # fmt: skip
EN = "Hot Sale M & D Simple Modern RED Striped Genuine Leather Sofa 3 Seater TE04"
ZH = "【热销】M&D简约现代红色条纹真皮沙发 三人位 TE04"
PY = "re xiao M&D jian yue xian dai hong se tiao wen zhen pi sha fa san ren wei TE04"


def _swap(title, lang, attribute, allowed, product=SOFA):
    return swap_attribute(title, lang, product, attribute, random.Random(0), allowed=allowed)


def test_hand_made_english():
    assert _swap(EN, "en", "color", ["navy"]) == EN.replace("RED", "NAVY")
    assert _swap(EN, "en", "pattern", ["dotted"]) == EN.replace("Striped", "Polka Dot")
    assert _swap(EN, "en", "material", ["wood"]) == EN.replace("Genuine Leather", "Solid Wood")
    assert _swap(EN, "en", "brand", ["Panda Home"]) == EN.replace("M & D", "Panda Home")
    lower = "m & d red striped genuine leather couch"
    assert _swap(lower, "en", "material", ["linen"]) == "m & d red striped linen couch"
    # Whole words only: "red" inside "Tired" is not the colour; double spaces are still spaces.
    assert _swap("Tired? Red Sofa", "en", "color", ["blue"]) == "Tired? Blue Sofa"
    assert _swap("M  & D red sofa", "en", "brand", ["UPIN"]) == "UPIN red sofa"
    assert _swap("Bred Sofa", "en", "color", ["blue"]) is None


def test_hand_made_chinese_and_pinyin():
    assert ZH == "【热销】M&D简约现代红色条纹真皮沙发 三人位 TE04" and to_pinyin(ZH) == PY
    assert _swap(ZH, "zh", "color", ["navy"]) == ZH.replace("红色", "藏青色")
    assert _swap(ZH, "zh", "material", ["velvet"]) == ZH.replace("真皮", "丝绒")
    assert _swap(ZH, "zh", "brand", ["UPIN"]) == ZH.replace("M&D", "优品")
    assert _swap(PY, "pinyin", "color", ["navy"]) == PY.replace("hong se", "zang qing se")
    assert _swap(PY, "pinyin", "pattern", ["floral"]) == PY.replace("tiao wen", "sui hua")
    assert _swap(PY, "pinyin", "brand", ["Panda Home"]) == PY.replace("M&D", "xiong mao jia ju")
    # 青色 (teal) is part of 藏青色 (navy): the longer word wins, both ways.
    navy = {**SOFA, "color": "navy"}
    assert _swap("藏青色沙发", "zh", "color", ["teal"], navy) == "青色沙发"
    assert _swap("青色沙发", "zh", "color", ["navy"], {**SOFA, "color": "teal"}) == "藏青色沙发"
    assert _swap("zang qing se sha fa", "pinyin", "color", ["teal"], navy) == "qing se sha fa"
    # A Latin brand would be the only new Latin word of a 汉字 title.
    upin = {**SOFA, "brand": "UPIN"}
    assert _swap("优品红色沙发", "zh", "brand", ["M & D"], upin) is None
    assert (
        _swap("you pin hong se sha fa", "pinyin", "brand", ["M & D"], upin) == "M&D hong se sha fa"
    )


def test_what_cannot_be_swapped_gives_none():
    solid = {**SOFA, "pattern": "solid"}
    assert _swap("M & D Red Genuine Leather Sofa", "en", "pattern", None, solid) is None
    assert _swap("M&D红色真皮沙发", "zh", "pattern", None, solid) is None
    assert _swap(EN, "en", "color", ["red"]) is None  # only the product's own value is allowed
    # Every allowed value already written in the title: nothing new to say.
    assert _swap("Red Sofa, Blue Piping", "en", "color", ["blue"]) is None


def test_choice_is_uniform_among_new_values_and_defaults_are_plausible():
    title = "Red Sofa, Blue Piping"
    seen = Counter(
        swap_attribute(
            title, "en", SOFA, "color", random.Random(i), allowed=["blue", "green", "pink"]
        )
        for i in range(300)
    )
    assert set(seen) == {"Green Sofa, Blue Piping", "Pink Sofa, Blue Piping"}
    assert min(seen.values()) > 100
    materials, patterns = Counter(), Counter()
    for i in range(300):
        rng = random.Random(i)
        swapped = swap_attribute(EN, "en", SOFA, "material", rng)
        materials[parse_attributes(swapped, "en")["material"]] += 1
        swapped = swap_attribute(ZH, "zh", SOFA, "pattern", rng)
        patterns[parse_attributes(swapped, "zh")["pattern"]] += 1
    others = set(KIND_BY_KEY["sofa"].materials) - {"leather"}
    assert set(materials) == {(m,) for m in others}
    assert set(patterns) == {("dotted",), ("plaid",), ("floral",)}  # never the unwritten "solid"
    assert swap_attribute(ZH, "zh", SOFA, "pattern", random.Random(0), allowed=["solid"]) == (
        ZH.replace("条纹", "纯色")
    )
    first = swapped_titles({"en": EN, "zh": ZH, "pinyin": PY}, SOFA, random.Random(5))
    assert first == swapped_titles({"pinyin": PY, "zh": ZH, "en": EN}, SOFA, random.Random(5))


def test_attributes_the_product_lacks_are_skipped():
    titles = {"en": EN, "zh": ZH, "pinyin": PY}
    colour_only = {"color": "red"}
    swaps = swapped_titles(titles, colour_only, random.Random(0))
    assert [(lang, attribute) for lang, attribute, _ in swaps] == [
        (lang, "color") for lang in LANGS
    ]
    assert swapped_titles(titles, {"kind": "sofa"}, random.Random(0)) == []


def test_lexicon_forms():
    lex = lexicon()
    assert lex["color"]["red"] == {"en": "red", "zh": "红色", "pinyin": "hong se"}
    assert lex["pattern"]["dotted"] == {"en": "polka dot", "zh": "波点", "pinyin": "bo dian"}
    assert lex["pattern"]["solid"]["en"] is None
    assert lex["material"]["wood"] == {"en": "solid wood", "zh": "实木", "pinyin": "shi mu"}
    assert lex["brand"]["M & D"] == {"en": "M & D", "zh": "M&D", "pinyin": "M&D"}
    assert set(lex["brand"]) == {b.en for b in BRANDS}


def test_bad_arguments_say_what_was_received():
    with pytest.raises(ValueError, match="lang must be one of .* got 'fr'"):
        swap_attribute(EN, "fr", SOFA, "color", random.Random(0))
    with pytest.raises(ValueError, match="attribute must be one of .* got 'size'"):
        swap_attribute(EN, "en", SOFA, "size", random.Random(0))
    with pytest.raises(ValueError, match="product color must be one of .* got 'crimson'"):
        swap_attribute(EN, "en", {**SOFA, "color": "crimson"}, "color", random.Random(0))
    with pytest.raises(ValueError, match=r"allowed color values .* got \['crimson'\]"):
        swap_attribute(EN, "en", SOFA, "color", random.Random(0), allowed=["crimson"])
    no_kind = {k: v for k, v in SOFA.items() if k != "kind"}
    with pytest.raises(ValueError, match="needs a 'kind'"):
        swap_attribute(EN, "en", no_kind, "material", random.Random(0))
    with pytest.raises(ValueError, match=r"keyed by .* got keys \['title_en'\]"):
        swapped_titles({"title_en": EN}, SOFA, random.Random(0))
