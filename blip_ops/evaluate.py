"""Retrieval evaluation: Recall@K both ways, ITC alone and ITC→ITM re-ranked by BLIP's rule.

Two directions over a pool of P products (images) and T texts, each text belonging to one product:

- **text→product** (image retrieval, "IR"): each text ranks all products; a hit at K when its own
  product is among the first K.
- **product→text** (text retrieval, "TR"): each product with at least one text ranks all texts; a
  hit at K when any of its texts is among the first K (several titles or captions per product).

ITC ranks by the cosine matrix (no temperature). ITC→ITM is BLIP's evaluation rule as the search
service applies it (``blip_ops.rerank.combine_scores``): the first ``k_test`` candidates by cosine
are re-scored with ITM positive-class logit + ITC cosine and sorted; the rest keep their cosine
order below them. Ties keep the cosine order (stable sorts everywhere), so ``k_test = 1`` can never
change the first place.

``itm_weight`` scales the logit (cosine + itm_weight × logit; 1.0, the default, is BLIP's rule).

A recall without its spread over queries cannot tell two models apart, so ``with_ci`` adds a
bootstrap 95% interval over the queries beside every recall, and ``with_ranks`` hands back each
query's rank so that callers can form paired intervals ("ITM minus ITC") with
:mod:`blip_ops.metrics`.

The metric code (:func:`rank_positives`, :func:`retrieval_metrics`) takes a similarity matrix and
ITM *scorers* (callables), so it runs on hand-made numbers; :func:`evaluate_model` builds both from a
:class:`~blip_ops.family.RetrievalModel`. No Ray here; torch, numpy and PIL only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from blip_ops.family import RetrievalModel
from blip_ops.metrics import bootstrap_ci, hits_at_k
from blip_ops.rerank import combine_scores
from blip_ops.token_cache import TokenCache

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)
DIRECTIONS = ("text_to_product", "product_to_text")
# (query index, candidate indices (k,)) -> ITM positive-class logits (k,) for those pairs
ItmScorer = Callable[[int, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- ranks and recalls


@dataclass
class RankResult:
    """0-based rank of each query's best-placed positive (C = no positive among the candidates)."""

    itc: np.ndarray  # (Q,) int64, cosine order
    itm: dict[int, np.ndarray] = field(default_factory=dict)  # k_test -> (Q,) int64, re-ranked
    itm_pairs: int = 0  # ITM pairs scored (queries whose positive lies outside every head skip it)


def rank_positives(
    sims: np.ndarray,
    query_labels: np.ndarray,
    candidate_labels: np.ndarray,
    *,
    k_test: Sequence[int] = (),
    itm: ItmScorer | None = None,
    chunk: int = 1024,
    itm_weight: float = 1.0,
) -> RankResult:
    """Ranks of the positives of Q queries over C candidates (positive: equal labels).

    ``sims`` (Q, C) are ITC cosines. For each ``k`` in ``k_test`` the first ``min(k, C)``
    candidates by cosine are re-ordered by ``combine_scores`` with the logits ``itm`` gives for
    them. ITM is asked once per query, for the largest head; a query whose first positive lies
    below that head is not scored at all (no head re-ordering can move a candidate across the
    head boundary, so its rank is its cosine rank for every ``k``). ``itm_weight`` scales the
    logit in the head's score (cosine + itm_weight × logit; 1.0 is BLIP's rule).
    """
    sims = np.asarray(sims, dtype=np.float32)
    if sims.ndim != 2:
        raise ValueError(f"expected a (queries, candidates) similarity matrix, got {sims.shape}")
    n_q, n_c = sims.shape
    query_labels = np.asarray(query_labels)
    candidate_labels = np.asarray(candidate_labels)
    if query_labels.shape != (n_q,) or candidate_labels.shape != (n_c,):
        raise ValueError(
            f"got {query_labels.shape} query labels and {candidate_labels.shape} candidate labels "
            f"for a {sims.shape} similarity matrix"
        )
    if any(k < 1 for k in k_test):
        raise ValueError(f"k_test values must be >= 1, got {list(k_test)}")
    if k_test and itm is None:
        raise ValueError("k_test given but no ITM scorer")
    k_max = min(max(k_test, default=0), n_c)

    itc = np.empty(n_q, dtype=np.int64)
    heads = np.empty((n_q, k_max), dtype=np.int64)
    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        order = np.argsort(-sims[start:stop], axis=1, kind="stable")  # (q, C) best first
        hit = query_labels[start:stop, None] == candidate_labels[order]  # (q, C)
        itc[start:stop] = np.where(hit.any(axis=1), hit.argmax(axis=1), n_c)
        heads[start:stop] = order[:, :k_max]

    result = RankResult(itc=itc, itm={k: itc.copy() for k in k_test})
    if k_max == 0:
        return result
    for q in np.flatnonzero(itc < k_max):
        cands = heads[q]  # (k_max,) candidate indices in cosine order
        logits = np.asarray(itm(int(q), cands), dtype=np.float32).reshape(-1)
        if logits.shape != (k_max,):
            raise ValueError(f"ITM scorer returned {logits.shape} logits for {k_max} candidates")
        result.itm_pairs += k_max
        cos = sims[q, cands]  # (k_max,)
        hit = query_labels[q] == candidate_labels[cands]  # (k_max,)
        for k in k_test:
            kk = min(k, n_c)
            if itc[q] >= kk:  # no positive inside this head: nothing above it moves
                continue
            # the service's rule, head only
            head = combine_scores(cos[:kk], logits[:kk], itm_weight)
            result.itm[k][q] = int(np.argmax(hit[:kk][head.order]))
    return result


def recall_from_ranks(ranks: np.ndarray, recall_at: Sequence[int] = RECALL_AT) -> dict:
    """{"R@K": share of ranks < K}; None for each K when there are no queries."""
    ranks = np.asarray(ranks)
    return {f"R@{k}": (float((ranks < k).mean()) if len(ranks) else None) for k in recall_at}


def ci_from_ranks(
    ranks: np.ndarray, recall_at: Sequence[int] = RECALL_AT, *, n_boot: int = 1000, seed: int = 0
) -> dict:
    """{"R@K": [lo, hi]}: bootstrap 95% interval of each recall over the queries ([None, None]
    when there are none); the same queries are resampled for every K."""
    ranks = np.asarray(ranks)
    if not len(ranks):
        return {f"R@{k}": [None, None] for k in recall_at}
    return {
        f"R@{k}": list(bootstrap_ci(hits_at_k(ranks, k), n_boot=n_boot, seed=seed))
        for k in recall_at
    }


def _mean_recall(block: dict) -> float | None:
    values = [v for d in DIRECTIONS for v in block[d].values() if v is not None]
    return float(np.mean(values)) if values else None


class _MemoScorer:
    """Caches ITM logits per (query, candidate) pair so overlapping pools are scored once."""

    def __init__(self, scorer: ItmScorer):
        self.scorer = scorer
        self.cache: dict[tuple[int, int], float] = {}

    def __call__(self, q: int, cands: np.ndarray) -> np.ndarray:
        missing = np.array([c for c in cands if (q, int(c)) not in self.cache], dtype=np.int64)
        if len(missing):
            logits = np.asarray(self.scorer(q, missing), dtype=np.float32).reshape(-1)
            if logits.shape != missing.shape:
                raise ValueError(
                    f"ITM scorer returned {logits.shape} logits for {len(missing)} candidates"
                )
            self.cache.update({(q, int(c)): float(v) for c, v in zip(missing, logits, strict=True)})
        return np.array([self.cache[q, int(c)] for c in cands], dtype=np.float32)


def retrieval_metrics(
    sims: np.ndarray,
    text_product: np.ndarray,
    *,
    k_test: Sequence[int] | int = (),
    itm_t2p: ItmScorer | None = None,
    itm_p2t: ItmScorer | None = None,
    languages: Sequence[str] | None = None,
    recall_at: Sequence[int] = RECALL_AT,
    itm_weight: float = 1.0,
    with_ci: bool = False,
    with_ranks: bool = False,
    n_boot: int = 1000,
) -> dict:
    """Recall@K both ways, ITC and (with scorers) ITC→ITM per ``k_test``, overall and per language.

    sims: (T, P) cosine of every text with every product's image.
    text_product: (T,) index of each text's product.
    itm_t2p(text, products) / itm_p2t(product, texts): ITM logits for those pairs.
    languages: (T,) language of each text; adds ``by_lang`` (text→product over that language's
        texts; product→text against that language's texts only).
    itm_weight: re-rank score = cosine + itm_weight × ITM logit (1.0: BLIP's rule).
    with_ci: add ``"ci": {direction: {"R@K": [lo, hi]}}`` beside the recalls of every figure
        (bootstrap 95% over that block's queries, ``n_boot`` resamples, seed 0).
    with_ranks: add ``"ranks": {"itc": {direction: (n,) int64}, "itm": {"<k>": same}}`` to every
        block: each query's 0-based rank of its best positive (numpy, not JSON), for paired
        intervals between methods (``blip_ops.metrics``).

    Returns {"counts", "itc": {direction: {"R@K"}, "mean"}, "itm": {"<k>": same}, "by_lang"}.
    """
    sims = np.asarray(sims, dtype=np.float32)
    n_t, n_p = sims.shape
    text_product = np.asarray(text_product, dtype=np.int64)
    if text_product.shape != (n_t,):
        raise ValueError(f"got {text_product.shape} text→product labels for {n_t} texts")
    if n_t and (text_product.min() < 0 or text_product.max() >= n_p):
        raise ValueError(
            f"text→product labels must lie in [0, {n_p}), got {text_product.min()}…{text_product.max()}"
        )
    ks = sorted({int(k_test)} if isinstance(k_test, int) else {int(k) for k in k_test})
    with_itm = bool(ks)
    if with_itm and (itm_t2p is None or itm_p2t is None):
        raise ValueError("ITC→ITM figures need both itm_t2p and itm_p2t scorers")
    p2t_memo = _MemoScorer(itm_p2t) if with_itm else None

    def t2p(rows: np.ndarray) -> RankResult:
        return rank_positives(
            sims[rows], text_product[rows], np.arange(n_p), k_test=ks,
            itm=(lambda q, c: itm_t2p(int(rows[q]), c)) if with_itm else None,
            itm_weight=itm_weight,
        )  # fmt: skip

    def p2t(texts: np.ndarray) -> tuple[RankResult, int]:
        products = np.unique(text_product[texts])  # products with a text in this pool
        ranks = rank_positives(
            sims[texts][:, products].T, products, text_product[texts], k_test=ks,
            itm=(lambda q, c: p2t_memo(int(products[q]), texts[c])) if with_itm else None,
            itm_weight=itm_weight,
        )  # fmt: skip
        return ranks, len(products)

    def figure(by_direction: dict[str, np.ndarray]) -> dict:
        fig = {d: recall_from_ranks(r, recall_at) for d, r in by_direction.items()}
        fig["mean"] = _mean_recall(fig)
        if with_ci:
            fig["ci"] = {
                d: ci_from_ranks(r, recall_at, n_boot=n_boot) for d, r in by_direction.items()
            }
        return fig

    def block(t2p_ranks: RankResult, p2t_ranks: RankResult, n_products: int, rows) -> dict:
        itc = {"text_to_product": t2p_ranks.itc, "product_to_text": p2t_ranks.itc}
        itm = {
            str(k): {"text_to_product": t2p_ranks.itm[k], "product_to_text": p2t_ranks.itm[k]}
            for k in ks
        }
        out = {
            "counts": {"texts": len(rows), "products_with_texts": n_products},
            "itc": figure(itc),
        }
        if with_itm:
            out["itm"] = {k: figure(by_direction) for k, by_direction in itm.items()}
        if with_ranks:
            out["ranks"] = {"itc": itc, "itm": itm}
        return out

    all_rows = np.arange(n_t)
    t2p_all = t2p(all_rows)
    p2t_all, n_with = p2t(all_rows)
    metrics = block(t2p_all, p2t_all, n_with, all_rows)
    metrics["counts"]["products"] = n_p
    metrics["k_test"] = ks
    metrics["itm_pairs"] = t2p_all.itm_pairs + p2t_all.itm_pairs

    if languages is not None:
        languages = np.asarray(list(languages), dtype=object)
        if languages.shape != (n_t,):
            raise ValueError(f"got {languages.shape} languages for {n_t} texts")
        metrics["by_lang"] = {}
        for lang in dict.fromkeys(languages.tolist()):  # first-seen order
            rows = np.flatnonzero(languages == lang)
            # text→product: the pool is every product, so the overall ranks apply as they are.
            sub = RankResult(
                itc=t2p_all.itc[rows], itm={k: r[rows] for k, r in t2p_all.itm.items()}
            )
            p2t_lang, n_lang = p2t(rows)
            metrics["by_lang"][str(lang)] = block(sub, p2t_lang, n_lang, rows)
    return metrics


def recall_vs_k_test(metrics: dict) -> dict:
    """The ITC→ITM figures of :func:`retrieval_metrics` as series over k_test (for a plot).

    Returns {"k_test": [k...], "itc": {direction: {"R@K": v}}, direction: {"R@K": [v per k]},
    "mean": [v per k], "itc_mean": v}.
    """
    ks = list(metrics.get("k_test", []))
    out: dict = {"k_test": ks, "itc": {d: dict(metrics["itc"][d]) for d in DIRECTIONS}}
    out["itc_mean"] = metrics["itc"]["mean"]
    for d in DIRECTIONS:
        names = list(metrics["itc"][d])
        out[d] = {name: [metrics["itm"][str(k)][d][name] for k in ks] for name in names}
    out["mean"] = [metrics["itm"][str(k)]["mean"] for k in ks]
    return out


# --------------------------------------------------------------------------- the model side


class ImageTokenCache:
    """ITM image tokens by image index, computed on demand and kept up to ``max_bytes`` (LRU:
    :class:`blip_ops.token_cache.TokenCache`).

    ``images[i]`` is anything ``model.encode_images`` takes as one item (a PIL image, a (3, H, W)
    uint8 tensor); a lazy sequence that decodes on access keeps only the tokens in memory.
    """

    def __init__(
        self, model: RetrievalModel, images: Sequence, *, max_bytes: int, batch_size: int = 32
    ):
        self.model = model
        self.images = images
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self._tokens = TokenCache(max_bytes=max_bytes)  # i -> (N, H) on the device
        self.computed = 0  # vision passes run by get() (misses)

    def has_room(self) -> bool:
        return self._tokens.has_room()

    def put(self, index: int, tokens: torch.Tensor) -> None:
        self._tokens.put(int(index), tokens)

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """(k, N, H) tokens of ``indices``, in that order."""
        return self._tokens.fetch(
            [int(i) for i in indices], self._encode, batch_size=self.batch_size
        )

    def _encode(self, indices: list[int]) -> torch.Tensor:
        self.computed += len(indices)
        return self.model.encode_images(
            [self.images[i] for i in indices], return_tokens=True
        ).tokens  # (b, N, H)


def embed_images(
    model: RetrievalModel,
    images: Sequence,
    *,
    batch_size: int = 32,
    token_cache: ImageTokenCache | None = None,
) -> np.ndarray:
    """(P, D) float32 ITC embeddings; fills ``token_cache`` with the tokens while it has room."""
    out = []
    last_log = time.perf_counter()
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        keep = token_cache is not None and token_cache.has_room()
        enc = model.encode_images([images[i] for i in range(start, stop)], return_tokens=keep)
        out.append(enc.embeddings.float().numpy())
        if keep:
            for i, t in zip(range(start, stop), enc.tokens, strict=True):
                token_cache.put(i, t)
        if stop == len(images) or time.perf_counter() - last_log >= 10.0:
            last_log = time.perf_counter()
            logger.info("embedded %d/%d images", stop, len(images))
    return np.concatenate(out) if out else np.zeros((0, model.embedding_dim), np.float32)


def embed_texts(
    model: RetrievalModel, texts: Sequence[str], *, batch_size: int = 256
) -> np.ndarray:
    """(T, D) float32 ITC embeddings (texts normalised by the model's own rule)."""
    out = [
        model.encode_texts(list(texts[start : start + batch_size])).float().numpy()
        for start in range(0, len(texts), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.embedding_dim), np.float32)


class _Progress:
    """Logs how many ITM pairs were scored, at most every ``every_s`` seconds."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.pairs = 0
        self.started = self.last = time.perf_counter()

    def add(self, n: int) -> None:
        self.pairs += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            logger.info(
                "ITM re-rank: %d pairs scored (%.0f pairs/s)",
                self.pairs,
                self.pairs / (now - self.started),
            )


def evaluate_model(
    model: RetrievalModel,
    images: Sequence,
    texts: Sequence[str],
    text_product: Sequence[int],
    *,
    languages: Sequence[str] | None = None,
    k_test: Sequence[int] = (16,),
    batch_size: int = 32,
    itm_batch_size: int = 128,
    token_cache_mb: float = 2048,
    itm_weight: float = 1.0,
    with_ci: bool = False,
    with_ranks: bool = False,
) -> dict:
    """Embed, rank and re-rank with ``model``; :func:`retrieval_metrics` plus model_id and timings.

    images: the P products' images (``images[i]`` decoded on access is fine).
    texts / text_product / languages: the T texts, each text's product index, its language.
    k_test: re-rank depths; ITM is run once per query for the largest.
    token_cache_mb: ITM image tokens kept between queries (recomputed when evicted).
    itm_weight, with_ci, with_ranks: as :func:`retrieval_metrics` (re-rank weight, bootstrap
        intervals, per-query ranks).
    """
    timings = {}
    started = time.perf_counter()
    cache = ImageTokenCache(
        model, images, max_bytes=int(token_cache_mb * 2**20), batch_size=batch_size
    )
    image_emb = embed_images(model, images, batch_size=batch_size, token_cache=cache)  # (P, D)
    timings["embed_images"] = time.perf_counter() - started
    t0 = time.perf_counter()
    text_emb = embed_texts(model, texts)  # (T, D)
    timings["embed_texts"] = time.perf_counter() - t0
    sims = text_emb @ image_emb.T  # (T, P) cosines: both sides are L2-normalised
    progress = _Progress()

    def itm_t2p(t: int, products: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(products), itm_batch_size):
            part = products[start : start + itm_batch_size]
            out.append(model.itm_scores(texts[t], cache.get(part)).numpy())
            progress.add(len(part))
        return np.concatenate(out)

    def itm_p2t(p: int, text_ids: np.ndarray) -> np.ndarray:
        tokens = cache.get([p])  # (1, N, H)
        out = []
        for start in range(0, len(text_ids), itm_batch_size):
            part = text_ids[start : start + itm_batch_size]
            expanded = tokens.expand(len(part), -1, -1)  # (b, N, H): one image, b texts, no copy
            out.append(model.itm_scores([texts[int(i)] for i in part], expanded).numpy())
            progress.add(len(part))
        return np.concatenate(out)

    t0 = time.perf_counter()
    metrics = retrieval_metrics(
        sims, np.asarray(text_product), k_test=k_test, itm_t2p=itm_t2p, itm_p2t=itm_p2t,
        languages=languages, itm_weight=itm_weight, with_ci=with_ci, with_ranks=with_ranks,
    )  # fmt: skip
    timings["rank"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    metrics["model_id"] = model.model_id
    metrics["vision_recomputed"] = cache.computed
    metrics["seconds"] = {name: round(s, 3) for name, s in timings.items()}
    return metrics
