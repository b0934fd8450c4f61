"""The search-quality protocol: four tasks, every figure with a bootstrap 95% interval over queries.

One recall figure answers one question, so the protocol asks four, on the catalog that
``pipelines.make_catalog`` writes (family-disjoint train / val / test splits):

- **Task A, the paper's task** (:func:`task_a`): each product's own titles (English, 汉字, pinyin)
  against the split's images, both ways, R@1/5/10 for ITC and ITC→ITM per ``k_test``. Comparable
  with BLIP's tables; a title is not what a shopper types, though.
- **ITM diagnostics** (:func:`itm_auc`): does the matching head tell a product's own title from a
  family sibling's (same product, another colour / pattern / material / brand) and from a random
  title? ROC AUC of the ITM logits; the re-rank can only help where this is well above 0.5.
- **Task B, shoppers** (:func:`task_b`): the held-out shopper queries rank every product of the
  split. A query such as "red sofa" is answered by every red sofa, so relevance comes from
  ``pipelines.catalog.relevance`` (same kind, every named attribute equal): success@1 and
  nDCG@10 over relevant products, and R@1/5/10 of the product the query was written for.
- **Task C, the service** (:func:`task_c`): Task B's figures through the service's own two-stage
  search (``pipelines.search.engine.search``) on a table the real index job published, for each
  hybrid × re-rank mode, restricted to the test split as the demo is.

Intervals are percentile bootstraps over queries (AUCs: over products), and "B minus A" figures
resample the same queries for both methods (:mod:`blip_ops.metrics`), which is what decides whether
a difference is real. Library code with no command line: ``benchmarks/bench_quality.py`` calls it.
Each task has a ``*_from_*`` / ``*_report`` part that takes in-memory inputs, for tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from blip_ops.evaluate import ImageTokenCache, embed_images, embed_texts, evaluate_model
from blip_ops.metrics import (
    grouped_auc_ci,
    hits_at_k,
    ndcg_at_k,
    paired_summary,
    roc_auc,
    success_at_1,
    summary,
)
from blip_ops.rerank import combine_scores
from pipelines.evaluate import EvalInputError, load_catalog

if TYPE_CHECKING:
    from blip_ops.family import RetrievalModel
    from pipelines.config import AppConfig
    from pipelines.search.engine import Scorer
    from pipelines.search.request import Limits
    from pipelines.search.snapshot import Snapshot

logger = logging.getLogger(__name__)

LANGS = ("en", "zh", "pinyin")
ATTRIBUTES = ("color", "pattern", "material", "brand")
SIBLING_AXES = ("color", "pattern", "material")  # auc_sibling: what the photo itself shows
PRODUCT_COLUMNS = ("product_id", "family_id", "split", "differs_by", "kind", *ATTRIBUTES)
QUERY_COLUMNS = ("query_id", "product_id", "split", "lang", "query", "kind", *ATTRIBUTES)
RECALL_AT = (1, 5, 10)
NDCG_AT = 10
DEPTH = max(*RECALL_AT, NDCG_AT)  # results looked at per query
SERVICE_MODES = (("off", False), ("off", True), ("rrf", False), ("rrf", True))  # hybrid, rerank
TEST_FILTER = "split = 'test'"
TOKEN_CACHE_BYTES = 1 << 30
# (queries, products) -> (Q, P) bool: pipelines.catalog.relevance.relevance_matrix's signature
Relevance = Callable[[Sequence[Mapping], Sequence[Mapping]], np.ndarray]


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _lang_order(langs: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(langs))
    return [lang for lang in LANGS if lang in seen] + [lang for lang in seen if lang not in LANGS]


# --------------------------------------------------------------------------- catalog inputs


def _read_catalog_table(root: str, cfg: AppConfig, name: str, columns: Sequence[str]) -> list[dict]:
    import pyarrow.parquet as pq

    from pipelines.storage import S3Settings, filesystem_for, join

    fs, base = filesystem_for(root, S3Settings.from_config(cfg.s3))
    path = join(base, name)
    try:
        table = pq.read_table(path, filesystem=fs)
    except OSError as err:
        raise EvalInputError(f"catalog {root}: cannot read {name}: {err}") from err
    missing = sorted(set(columns) - set(table.column_names))
    if missing:
        raise EvalInputError(
            f"{path}: missing columns {missing} (it has {table.column_names}); "
            "rewrite the catalog with the current pipelines.make_catalog"
        )
    return table.select(list(columns)).to_pylist()


def catalog_products(catalog_root: str, cfg: AppConfig, split: str) -> list[dict]:
    """The split's products (``PRODUCT_COLUMNS`` of pairs.parquet), sorted by product_id: the
    order of ``load_catalog``'s pool, and what :func:`task_c` and the relevance rule take."""
    rows = _read_catalog_table(catalog_root, cfg, "pairs.parquet", PRODUCT_COLUMNS)
    picked = sorted((r for r in rows if r["split"] == split), key=lambda r: r["product_id"])
    if not picked:
        splits = sorted({r["split"] for r in rows} - {None})
        raise EvalInputError(f"catalog {catalog_root} has no products in split {split!r}: {splits}")
    return picked


def catalog_queries(catalog_root: str, cfg: AppConfig, split: str) -> list[dict]:
    """The split's shopper queries (``QUERY_COLUMNS`` of queries.parquet), in file order."""
    rows = _read_catalog_table(catalog_root, cfg, "queries.parquet", QUERY_COLUMNS)
    picked = [r for r in rows if r["split"] == split]
    if not picked:
        splits = sorted({r["split"] for r in rows} - {None})
        raise EvalInputError(
            f"catalog {catalog_root} has no shopper queries in split {split!r}: {splits}"
        )
    return picked


def _aligned(products: list[dict], product_ids: Sequence[str]) -> list[dict]:
    ids = [p["product_id"] for p in products]
    if ids != list(product_ids):
        extra, absent = sorted(set(ids) - set(product_ids)), sorted(set(product_ids) - set(ids))
        raise EvalInputError(
            f"pairs.parquet and products/ disagree on the split's products: only in pairs "
            f"{extra[:3]}, only in products {absent[:3]} ({len(ids)} vs {len(product_ids)})"
        )
    return products


# --------------------------------------------------------------------------- Task A


def _recalls(ranks: Mapping[str, np.ndarray], n_boot: int) -> dict:
    """{direction: {"R@K": summary}} from each direction's (n,) 0-based ranks."""
    return {
        d: {f"R@{k}": summary(hits_at_k(r, k), n_boot=n_boot) for k in RECALL_AT}
        for d, r in ranks.items()
    }


def _recall_deltas(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], n_boot: int) -> dict:
    """{direction: {"R@K": paired summary of b minus a}} over the same queries."""
    return {
        d: {
            f"R@{k}": paired_summary(hits_at_k(a[d], k), hits_at_k(b[d], k), n_boot=n_boot)
            for k in RECALL_AT
        }
        for d in a
    }


def task_a_report(metrics: dict, *, k_default: int = 16, n_boot: int = 1000) -> dict:
    """Task A's figures from ``retrieval_metrics(..., languages=..., with_ranks=True)``.

    Returns {lang: {"counts", "itc": {direction: {"R@K": {"value", "ci", "n"}}}, "itm": {"<k>":
    same}, "itm_minus_itc": {"<k>": same, paired}, "itc_r1", "itm_r1"}}; ``itc_r1`` / ``itm_r1``
    are text→product R@1 (fractions), ITM at ``k_default``.
    """
    if "by_lang" not in metrics:
        raise ValueError("Task A needs metrics computed with languages (got no 'by_lang')")
    k = str(int(k_default))
    out = {}
    for lang, block in metrics["by_lang"].items():
        ranks = block.get("ranks")
        if ranks is None:
            raise ValueError("Task A needs metrics computed with with_ranks=True")
        if k not in ranks["itm"]:
            raise ValueError(f"k_default {k} is not among the k_test values {list(ranks['itm'])}")
        itc = _recalls(ranks["itc"], n_boot)
        itm = {kk: _recalls(r, n_boot) for kk, r in ranks["itm"].items()}
        out[lang] = {
            "counts": block["counts"],
            "itc": itc,
            "itm": itm,
            "itm_minus_itc": {
                kk: _recall_deltas(ranks["itc"], r, n_boot) for kk, r in ranks["itm"].items()
            },
            "itc_r1": itc["text_to_product"]["R@1"]["value"],
            "itm_r1": itm[k]["text_to_product"]["R@1"]["value"],
        }
    return out


def task_a(
    model: RetrievalModel,
    catalog_root: str,
    cfg: AppConfig,
    *,
    split: str = "test",
    k_tests: Sequence[int] = (4, 8, 16),
    k_default: int = 16,
    itm_weight: float = 1.0,
    batch_size: int = 32,
    n_boot: int = 1000,
) -> dict:
    """The paper's task on the split's own titles, per language (see :func:`task_a_report`).

    Text→product: each title ranks the split's products; product→text: each product ranks the
    split's titles of that language. ``k_default`` joins ``k_tests`` when it is not among them.
    """
    started = time.perf_counter()
    data = load_catalog(
        catalog_root, split, cfg, target_size=model.image_settings.size, texts="titles"
    )
    ks = sorted({int(k) for k in k_tests} | {int(k_default)})
    metrics = evaluate_model(
        model, data.images, data.texts, data.text_product, languages=data.languages, k_test=ks,
        batch_size=batch_size, itm_weight=itm_weight, with_ranks=True,
    )  # fmt: skip
    out = task_a_report(metrics, k_default=k_default, n_boot=n_boot)
    logger.info(
        "task A (%s, %d products, %d titles, k_test %s): %.1fs",
        split, len(data.product_ids), len(data.texts), ks, time.perf_counter() - started,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- ITM diagnostics


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
    return _num(auc), [_num(lo), _num(hi)]


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
    for code in _lang_order(lang.tolist()):
        m = lang == code  # (n,)
        by_lang[code] = {
            "auc_sibling": _num(roc_auc(logits[own & visible & m], logits[sib & visible & m])),
            "auc_random": _num(roc_auc(logits[own & m], logits[rand & m])),
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
    rows = _aligned(catalog_products(catalog_root, cfg, split), data.product_ids)
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


# --------------------------------------------------------------------------- relevance, rankings


@dataclass
class Judgements:
    """Who answers each query: the labelled product and every relevant one."""

    labelled: np.ndarray  # (Q,) int64 index of the product each query was written for
    relevant: np.ndarray  # (Q, P) bool, the labelled product always included
    index: dict[str, int]  # product_id -> index into the pool
    langs: list[str]  # (Q,)


def judge(
    queries: Sequence[Mapping], products: Sequence[Mapping], relevance: Relevance | None = None
) -> Judgements:
    """Relevance of every pool product to every query (``relevance_matrix`` by default)."""
    if relevance is None:
        from pipelines.catalog.relevance import relevance_matrix as relevance
    index = {p["product_id"]: i for i, p in enumerate(products)}
    outside = [q.get("query_id", q["query"]) for q in queries if q["product_id"] not in index]
    if outside:
        raise EvalInputError(
            f"{len(outside)} of {len(queries)} queries are for products outside the pool of "
            f"{len(products)}, e.g. {outside[:3]}"
        )
    labelled = np.array([index[q["product_id"]] for q in queries], dtype=np.int64)  # (Q,)
    rel = np.array(relevance(queries, products), dtype=bool)  # (Q, P)
    if rel.shape != (len(queries), len(products)):
        raise ValueError(f"relevance gave {rel.shape} for {len(queries)} x {len(products)}")
    rows = np.arange(len(queries))
    missed = int((~rel[rows, labelled]).sum())
    if missed:
        logger.warning("%d queries did not find their own product relevant: counted so", missed)
    rel[rows, labelled] = True
    return Judgements(labelled, rel, index, [q["lang"] for q in queries])


def per_query_metrics(top: np.ndarray, labelled: np.ndarray, relevant: np.ndarray) -> dict:
    """{metric: (Q,) float}: success@1, ndcg@10 and the labelled product's R@1/5/10.

    top: (Q, D) product indices, best first, -1 where a result list is shorter than D.
    """
    top = np.asarray(top, dtype=np.int64)
    n_q = len(labelled)
    if top.ndim != 2 or top.shape[0] != n_q:
        raise ValueError(f"expected ({n_q}, depth) ranked product indices, got {top.shape}")
    if top.shape[1] == 0:
        top = np.full((n_q, 1), -1, dtype=np.int64)
    valid = top >= 0  # (Q, D)
    rows = np.arange(n_q)[:, None]
    rel_ranked = valid & relevant[rows, np.where(valid, top, 0)]  # (Q, D)
    hit = valid & (top == np.asarray(labelled)[:, None])  # (Q, D)
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), np.iinfo(np.int64).max)  # (Q,)
    out = {
        "success@1": success_at_1(rel_ranked),
        f"ndcg@{NDCG_AT}": ndcg_at_k(rel_ranked, NDCG_AT, n_relevant=relevant.sum(axis=1)),
    }
    out.update({f"R@{k}": hits_at_k(rank, k) for k in RECALL_AT})
    return out


def _by_lang(langs: Sequence[str], figure: Callable[[np.ndarray], dict]) -> dict:
    langs = np.asarray(list(langs), dtype=object)
    return {
        "overall": figure(np.ones(len(langs), dtype=bool)),
        "by_lang": {lang: figure(langs == lang) for lang in _lang_order(langs.tolist())},
    }


def ranking_report(per_query: Mapping[str, np.ndarray], langs: Sequence[str], n_boot: int) -> dict:
    """{"overall": {metric: summary}, "by_lang": {lang: same}}."""
    return _by_lang(
        langs, lambda m: {name: summary(v[m], n_boot=n_boot) for name, v in per_query.items()}
    )


def paired_report(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], langs: Sequence[str], n_boot: int
) -> dict:
    """:func:`ranking_report` of b minus a, paired over the same queries."""
    return _by_lang(
        langs,
        lambda m: {name: paired_summary(a[name][m], b[name][m], n_boot=n_boot) for name in a},
    )


# --------------------------------------------------------------------------- Task B


def rerank_top(
    model: RetrievalModel,
    texts: Sequence[str],
    sims: np.ndarray,
    cache: ImageTokenCache,
    *,
    k_test: int,
    depth: int = DEPTH,
    itm_weight: float = 1.0,
) -> np.ndarray:
    """(Q, min(depth, P)) product indices after ITC→ITM: the first ``k_test`` by cosine ordered by
    cosine + itm_weight × ITM logit (``combine_scores``), the rest in cosine order."""
    n_q, n_p = sims.shape  # (Q, P)
    r = min(k_test, n_p)
    keep = min(max(k_test, depth), n_p)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :keep]  # (Q, keep)
    out = np.empty((n_q, min(depth, n_p)), dtype=np.int64)
    for q in range(n_q):
        cands = order[q]  # (keep,)
        logits = model.itm_scores(texts[q], cache.get(cands[:r])).numpy()  # (r,)
        ranked = combine_scores(sims[q, cands], logits, itm_weight)
        out[q] = cands[ranked.order[: out.shape[1]]]
    return out


def task_b_from_data(
    model: RetrievalModel,
    images: Sequence,
    products: Sequence[Mapping],
    queries: Sequence[Mapping],
    *,
    k_test: int = 16,
    itm_weight: float = 1.0,
    batch_size: int = 32,
    n_boot: int = 1000,
    relevance: Relevance | None = None,
) -> dict:
    """:func:`task_b` on in-memory inputs: ``images[i]`` is ``products[i]``'s image."""
    if k_test < 1:
        raise ValueError(f"k_test must be >= 1, got {k_test}")
    if len(images) != len(products):
        raise ValueError(f"got {len(images)} images for {len(products)} products")
    judged = judge(queries, products, relevance)
    cache = ImageTokenCache(model, images, max_bytes=TOKEN_CACHE_BYTES, batch_size=batch_size)
    image_emb = embed_images(model, images, batch_size=batch_size, token_cache=cache)  # (P, D)
    texts = [q["query"] for q in queries]
    sims = embed_texts(model, texts) @ image_emb.T  # (Q, P) cosines
    top_itc = np.argsort(-sims, axis=1, kind="stable")[:, :DEPTH]  # (Q, min(DEPTH, P))
    top_itm = rerank_top(model, texts, sims, cache, k_test=k_test, itm_weight=itm_weight)
    itc = per_query_metrics(top_itc, judged.labelled, judged.relevant)
    itm = per_query_metrics(top_itm, judged.labelled, judged.relevant)
    return {
        "k_test": k_test,
        "itm_weight": itm_weight,
        "counts": {
            "queries": len(queries),
            "products": len(products),
            "relevant_per_query": float(judged.relevant.sum(axis=1).mean()),
        },
        "itc": ranking_report(itc, judged.langs, n_boot),
        "itm": ranking_report(itm, judged.langs, n_boot),
        "itm_minus_itc": paired_report(itc, itm, judged.langs, n_boot),
    }


def task_b(
    model: RetrievalModel,
    catalog_root: str,
    cfg: AppConfig,
    *,
    split: str = "test",
    k_test: int = 16,
    itm_weight: float = 1.0,
    batch_size: int = 32,
    n_boot: int = 1000,
    relevance: Relevance | None = None,
) -> dict:
    """Shopper queries of the split rank all its products, ITC and ITC→ITM at ``k_test``.

    Returns {"k_test", "itm_weight", "counts", "itc" / "itm": {"overall": {metric: {"value",
    "ci", "n"}}, "by_lang": {lang: same}}, "itm_minus_itc": same, paired}; metrics success@1,
    ndcg@10 (relevant = ``relevance``) and R@1/5/10 of the labelled product.
    """
    started = time.perf_counter()
    data = load_catalog(
        catalog_root, split, cfg, target_size=model.image_settings.size, texts="queries"
    )
    products = _aligned(catalog_products(catalog_root, cfg, split), data.product_ids)
    queries = catalog_queries(catalog_root, cfg, split)
    out = task_b_from_data(
        model, data.images, products, queries, k_test=k_test, itm_weight=itm_weight,
        batch_size=batch_size, n_boot=n_boot, relevance=relevance,
    )  # fmt: skip
    logger.info(
        "task B (%s, %d queries, %d products): %.1fs",
        split, len(queries), len(products), time.perf_counter() - started,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- Task C


@dataclass
class Service:
    """What :func:`task_c` searches with: a pinned published version, a scorer, request limits."""

    snapshot: Snapshot
    scorer: Scorer
    limits: Limits


def open_service(cfg: AppConfig, model: RetrievalModel | None = None) -> Service:
    """The published table of ``cfg.index.uri`` and a local scorer on ``model`` (default: load
    ``cfg.model``), as the search service builds them, without Ray Serve."""
    from pipelines.search.engine import LocalScorer
    from pipelines.search.request import Limits
    from pipelines.search.scorer import QueryScorer
    from pipelines.search.snapshot import ann_settings, open_snapshot
    from pipelines.storage import S3Settings

    snap = open_snapshot(
        cfg.index.uri, S3Settings.from_config(cfg.s3), cache_dir=cfg.serve.cache_dir,
        ann=ann_settings(cfg.index),
    )  # fmt: skip
    if model is None:
        from blip_ops import load_model

        model = load_model(cfg.model.name_or_path, device=cfg.model.device, dtype=cfg.model.dtype)
    if model.model_id != snap.model_id:
        raise ValueError(
            f"the published table was encoded by {snap.model_id}, the model given is "
            f"{model.model_id}: load the checkpoint its run recorded"
        )
    scorer = LocalScorer(QueryScorer(model, cfg.serve.token_cache_items))
    return Service(snap, scorer, Limits.from_config(cfg.serve))


def run_searches(
    snapshot: Snapshot,
    scorer: Scorer,
    queries: Sequence[Mapping],
    limits: Limits,
    *,
    hybrid: str,
    rerank: bool,
    candidate_filter: str | None = TEST_FILTER,
    k: int = DEPTH,
) -> list[list[str]]:
    """Each query through ``pipelines.search.engine.search``: its ranked product ids (first k)."""
    from pipelines.search.engine import search
    from pipelines.search.request import parse_search

    async def run_all() -> list[list[str]]:
        ranked = []
        for q in queries:
            body = {"text": q["query"], "k": k, "rerank": rerank, "hybrid": hybrid}
            if candidate_filter:
                body["filter"] = candidate_filter
            response = await search(parse_search(body, limits), snapshot, scorer)
            ranked.append([r["product_id"] for r in response["results"]])
        return ranked

    return asyncio.run(run_all())


def _mode_name(hybrid: str, rerank: bool) -> tuple[str, str]:
    return hybrid, "rerank_on" if rerank else "rerank_off"


def task_c_report(
    ranked: Mapping[tuple[str, bool], Sequence[Sequence[str]]],
    queries: Sequence[Mapping],
    products: Sequence[Mapping],
    *,
    relevance: Relevance | None = None,
    n_boot: int = 1000,
) -> dict:
    """Task B's metrics from the service's answers.

    ranked: {(hybrid, rerank): one list of ranked product ids per query}; ids outside
    ``products`` count as irrelevant results. Returns {"modes": {hybrid: {"rerank_off",
    "rerank_on": ranking report, "rerank_on_minus_off", "minus_hybrid_off": {"rerank_off",
    "rerank_on"}: paired reports}}, "counts"} (each where both sides were run).
    """
    judged = judge(queries, products, relevance)
    per_query: dict[tuple[str, str], dict] = {}
    for (hybrid, rerank), lists in ranked.items():
        if len(lists) != len(queries):
            raise ValueError(f"{hybrid}/{rerank}: {len(lists)} answers, {len(queries)} queries")
        top = np.full((len(lists), DEPTH), -1, dtype=np.int64)  # (Q, DEPTH)
        for q, ids in enumerate(lists):
            found = [judged.index.get(pid, -1) for pid in ids[:DEPTH]]
            top[q, : len(found)] = found
        per_query[_mode_name(hybrid, rerank)] = per_query_metrics(
            top, judged.labelled, judged.relevant
        )
    modes: dict[str, dict] = {}
    for (hybrid, which), values in per_query.items():
        modes.setdefault(hybrid, {})[which] = ranking_report(values, judged.langs, n_boot)
    for hybrid, block in modes.items():
        if {"rerank_off", "rerank_on"} <= set(block):
            a, b = per_query[hybrid, "rerank_off"], per_query[hybrid, "rerank_on"]
            block["rerank_on_minus_off"] = paired_report(a, b, judged.langs, n_boot)
        if hybrid != "off":
            block["minus_hybrid_off"] = {
                which: paired_report(per_query["off", which], values, judged.langs, n_boot)
                for (h, which), values in per_query.items()
                if h == hybrid and ("off", which) in per_query
            }
    counts = {"queries": len(queries), "products": len(products)}
    return {"modes": modes, "counts": counts}


def task_c(
    snapshot: Snapshot,
    scorer: Scorer,
    queries: Sequence[Mapping],
    products: Sequence[Mapping],
    *,
    limits: Limits,
    modes: Sequence[tuple[str, bool]] = SERVICE_MODES,
    candidate_filter: str | None = TEST_FILTER,
    itm_weight: float | None = None,
    n_boot: int = 1000,
    relevance: Relevance | None = None,
) -> dict:
    """Task B's metrics through the service's two-stage search, per (hybrid, rerank) mode.

    snapshot / scorer / limits: :func:`open_service`. queries / products: the test split's
    (:func:`catalog_queries`, :func:`catalog_products`). ``itm_weight`` overrides the limits'
    (``serve.itm_weight``). Returns :func:`task_c_report` plus "settings".
    """
    started = time.perf_counter()
    if itm_weight is not None:
        limits = dataclasses.replace(limits, itm_weight=itm_weight)
    ranked = {}
    for hybrid, rerank in modes:
        ranked[hybrid, bool(rerank)] = run_searches(
            snapshot, scorer, queries, limits, hybrid=hybrid, rerank=bool(rerank),
            candidate_filter=candidate_filter,
        )  # fmt: skip
    out = task_c_report(ranked, queries, products, relevance=relevance, n_boot=n_boot)
    out["settings"] = {
        "modes": [list(m) for m in ranked],
        "filter": candidate_filter,
        "k": DEPTH,
        "candidates": limits.candidates,
        "rerank_k": limits.rerank_k,
        "itm_weight": getattr(limits, "itm_weight", 1.0),
        "table_version": snapshot.version,
        "model_id": snapshot.model_id,
    }
    logger.info(
        "task C (%d queries x %d modes): %.1fs",
        len(queries), len(ranked), time.perf_counter() - started,
    )  # fmt: skip
    return out
