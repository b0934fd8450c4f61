"""ITM diagnostics: does the matching head tell a product's own title from a family sibling's
(same product, another colour / pattern / material / brand) and from a random title? ROC AUC of
the ITM logits, intervals over products."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from blip_ops.evaluate import ImageTokenCache
from blip_ops.metrics import grouped_auc_ci, roc_auc
from pipelines.evaluation.catalog import load_catalog
from pipelines.quality.common import (
    ATTRIBUTES,
    LANGS,
    SIBLING_AXES,
    TOKEN_CACHE_BYTES,
    lang_order,
    num,
)
from pipelines.quality.inputs import aligned, catalog_products

if TYPE_CHECKING:
    from blip_ops.family import RetrievalModel
    from pipelines.config import AppConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItmPair:
    """One (image, text) pair of the ITM diagnostics."""

    product: int  # the image: index into the pool
    lang: str
    text: str
    role: str  # "own" | "sibling" (a family sibling's title) | "random" (another family's)
    axis: str | None  # what the image's family varies in (its differs_by)


def itm_auc_pairs(products: Sequence[Mapping], *, seed: int = 0) -> tuple[list[ItmPair], int]:
    """The pairs to score, and how many sibling titles were left out for equalling the own title.

    ``products``: rows with product_id, family_id, differs_by and ``titles`` {lang: text}. For
    every product with a family sibling in the pool and each language: its own title, every
    sibling's title, and one title of another family drawn with ``seed``.
    """
    rng = np.random.default_rng(seed)
    families = np.array([p["family_id"] for p in products], dtype=object)  # (P,)
    with_title = {
        lang: np.array([i for i, p in enumerate(products) if p["titles"].get(lang)], np.int64)
        for lang in LANGS
    }
    pairs: list[ItmPair] = []
    same_text = 0
    for i, p in enumerate(products):
        siblings = np.flatnonzero(families == p["family_id"])
        siblings = siblings[siblings != i]
        if not len(siblings):
            continue
        for lang in LANGS:
            own = p["titles"].get(lang)
            if not own:
                continue
            pairs.append(ItmPair(i, lang, own, "own", p["differs_by"]))
            for j in siblings:
                text = products[j]["titles"].get(lang)
                if text == own:  # the text cannot tell them apart: no negative
                    same_text += 1
                elif text:
                    pairs.append(ItmPair(i, lang, text, "sibling", p["differs_by"]))
            others = with_title[lang][families[with_title[lang]] != p["family_id"]]
            if len(others):
                pick = products[int(others[rng.integers(len(others))])]["titles"][lang]
                pairs.append(ItmPair(i, lang, pick, "random", p["differs_by"]))
    return pairs, same_text


def score_pairs(
    model: RetrievalModel,
    images: Sequence,
    pairs: Sequence[ItmPair],
    *,
    batch_size: int = 32,
    itm_batch_size: int = 128,
) -> np.ndarray:
    """(len(pairs),) float32 ITM logits, one vision pass per image (``ImageTokenCache``)."""
    cache = ImageTokenCache(model, images, max_bytes=TOKEN_CACHE_BYTES, batch_size=batch_size)
    by_product: dict[int, list[int]] = {}
    for n, pair in enumerate(pairs):
        by_product.setdefault(pair.product, []).append(n)
    logits = np.empty(len(pairs), dtype=np.float32)
    order = list(by_product)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        tokens = cache.get(chunk)  # (b, N, H)
        for product, image_tokens in zip(chunk, tokens, strict=True):
            todo = by_product[product]
            for s in range(0, len(todo), itm_batch_size):
                part = todo[s : s + itm_batch_size]
                expanded = image_tokens.unsqueeze(0).expand(len(part), -1, -1)  # (n, N, H)
                texts = [pairs[n].text for n in part]
                logits[part] = np.asarray(model.itm_scores(texts, expanded), dtype=np.float32)
    return logits


def _auc(
    logits: np.ndarray, groups: np.ndarray, pos: np.ndarray, neg: np.ndarray, n_boot: int, seed: int
) -> tuple[float | None, list]:
    auc = roc_auc(logits[pos], logits[neg])
    lo, hi = grouped_auc_ci(
        logits[pos], logits[neg], groups[pos], groups[neg], n_boot=n_boot, seed=seed
    )
    return num(auc), [num(lo), num(hi)]


def itm_auc_report(
    pairs: Sequence[ItmPair],
    logits: np.ndarray,
    *,
    same_text: int = 0,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """ROC AUCs of own-title logits against sibling and random titles (intervals over products).

    Returns {"auc_sibling" (colour, pattern and material families), "auc_sibling_by_attribute":
    {attribute: auc}, "auc_random", "ci": {same keys: [lo, hi]}, "by_lang": {lang:
    {"auc_sibling", "auc_random"}}, "pairs": counts}; None where a side has no pairs.
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)  # (n,)
    if len(logits) != len(pairs):
        raise ValueError(f"got {len(logits)} logits for {len(pairs)} pairs")
    role = np.array([p.role for p in pairs], dtype=object)  # (n,)
    axis = np.array([p.axis or "" for p in pairs], dtype=object)  # (n,)
    lang = np.array([p.lang for p in pairs], dtype=object)  # (n,)
    groups = np.array([p.product for p in pairs], dtype=np.int64)  # (n,)
    own, sib, rand = role == "own", role == "sibling", role == "random"
    visible = np.isin(axis, SIBLING_AXES)

    def auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float | None, list]:
        return _auc(logits, groups, pos, neg, n_boot, seed)

    sibling, sibling_ci = auc(own & visible, sib & visible)
    random_auc, random_ci = auc(own, rand)
    by_attr = {a: auc(own & (axis == a), sib & (axis == a)) for a in ATTRIBUTES}
    by_lang = {}
    for code in lang_order(lang.tolist()):
        m = lang == code  # (n,)
        by_lang[code] = {
            "auc_sibling": num(roc_auc(logits[own & visible & m], logits[sib & visible & m])),
            "auc_random": num(roc_auc(logits[own & m], logits[rand & m])),
        }
    return {
        "auc_sibling": sibling,
        "auc_sibling_by_attribute": {a: v for a, (v, _) in by_attr.items()},
        "auc_random": random_auc,
        "ci": {
            "auc_sibling": sibling_ci,
            "auc_sibling_by_attribute": {a: ci for a, (_, ci) in by_attr.items()},
            "auc_random": random_ci,
        },
        "by_lang": by_lang,
        "pairs": {
            "products": len(set(groups.tolist())),
            "own": int(own.sum()),
            "sibling": {a: int((sib & (axis == a)).sum()) for a in ATTRIBUTES},
            "random": int(rand.sum()),
            "sibling_same_text": same_text,
        },
    }


def itm_auc_from_products(
    model: RetrievalModel,
    images: Sequence,
    products: Sequence[Mapping],
    *,
    seed: int = 0,
    batch_size: int = 32,
    n_boot: int = 1000,
) -> dict:
    """:func:`itm_auc` on in-memory inputs: ``images[i]`` is ``products[i]``'s image, each product
    a row with product_id, family_id, differs_by and ``titles`` {lang: text}."""
    if len(images) != len(products):
        raise ValueError(f"got {len(images)} images for {len(products)} products")
    pairs, same_text = itm_auc_pairs(products, seed=seed)
    logits = score_pairs(model, images, pairs, batch_size=batch_size)
    return itm_auc_report(pairs, logits, same_text=same_text, n_boot=n_boot, seed=seed)


def itm_auc(
    model: RetrievalModel,
    catalog_root: str,
    cfg: AppConfig,
    *,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 32,
    n_boot: int = 1000,
) -> dict:
    """ITM's own title vs a family sibling's and vs a random one, on the split (see
    :func:`itm_auc_report`); ``split="val"`` to choose settings, ``"test"`` to report."""
    started = time.perf_counter()
    data = load_catalog(
        catalog_root, split, cfg, target_size=model.image_settings.size, texts="titles"
    )
    rows = aligned(catalog_products(catalog_root, cfg, split), data.product_ids)
    titles: list[dict[str, str]] = [{} for _ in rows]
    for text, product, lang in zip(data.texts, data.text_product, data.languages, strict=True):
        titles[int(product)][lang] = text
    products = [{**row, "titles": t} for row, t in zip(rows, titles, strict=True)]
    out = itm_auc_from_products(
        model, data.images, products, seed=seed, batch_size=batch_size, n_boot=n_boot
    )
    logger.info(
        "ITM AUC (%s): %d products with siblings, %.1fs",
        split, out["pairs"]["products"], time.perf_counter() - started,
    )  # fmt: skip
    return out
