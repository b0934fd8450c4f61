"""The model side of a search: query encoding and ITM re-ranking with a cache of image tokens.

:class:`QueryScorer` works on lists so that one call serves many concurrent requests (Ray Serve's
``@serve.batch`` hands it a batch; offline callers a list of one). ITM needs each candidate's image
tokens. Where the index stored them (``index.store_itm_tokens``: float16, made by the encode pass
that made the row's embedding) the job carries them and no vision pass runs, so a cold query costs
what a warm one does. Otherwise they are computed from the model-resolution JPEG stored in the
table and kept in a bounded LRU cache (:class:`blip_ops.token_cache.TokenCache`, the one evaluation
uses too) keyed by (product_id, content_hash), so hot products skip the vision tower and a changed
product never reuses stale tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from blip_ops.rerank import RerankResult, rerank
from blip_ops.token_cache import StoredTokens, TokenCache

logger = logging.getLogger(__name__)

WARM_UP_TEXT = "warm up 预热"  # every path of the query normaliser: Latin, and Chinese to pinyin
ITM_LENGTH_RATIO = 1.5  # longest over shortest text (in tokens) that share one ITM pass


@dataclass(frozen=True)
class ItmJob:
    """One request's re-rank: its text against candidates (keys, and per candidate its stored
    ITM tokens or its model-resolution JPEG)."""

    text: str
    keys: tuple[str, ...]  # "product_id:content_hash" per candidate
    # Model-resolution JPEG per candidate (decoded only on a cache miss); None where ``tokens``
    # holds the candidate's stored tokens.
    images: tuple[bytes | None, ...]
    tokens: tuple[StoredTokens | None, ...] = ()  # stored tokens per candidate; (): none stored
    model_id: str | None = None  # the model that stored ``tokens`` (the table's)

    def stored(self) -> tuple[StoredTokens | None, ...]:
        """The stored tokens per candidate (None where there are none), checked against keys."""
        if len(self.images) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(self.images)} images")
        if not self.tokens:
            return (None,) * len(self.keys)
        if len(self.tokens) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(self.tokens)} stored token sets")
        for key, image, tokens in zip(self.keys, self.images, self.tokens, strict=True):
            if image is None and tokens is None:
                raise ValueError(f"candidate {key} has neither stored tokens nor a model image")
        return self.tokens


class ItmScorer(Protocol):
    async def itm(self, job: ItmJob) -> np.ndarray: ...


async def rerank_job(
    scorer: ItmScorer, job: ItmJob, itc_scores, *, itm_weight: float, k: int
) -> RerankResult:
    """One request's re-rank: the ITM logits of ``job``'s candidates (the first ``len(job.keys)``
    of ``itc_scores``, in ANN order) from ``scorer.itm`` (the model replica's batched call in the
    service, :meth:`QueryScorer.itm` offline), combined by :func:`blip_ops.rerank.rerank`; the
    first ``k`` positions. A job without candidates makes no model call: ANN order."""
    logits = await scorer.itm(job) if job.keys else np.empty(0, np.float32)
    n = len(logits)
    return rerank(
        None, job.text, itc_scores, itm_logits=logits, rerank_k=n, k=k, itm_weight=itm_weight
    )


# Below this side a JPEG decodes faster than a thread hand-off costs (tiny test model at 64 px:
# 12.5 ms for 32 on one thread, 13.9 ms on four, in a bench_ann.py run before this threshold;
# at BLIP-base's 384 px: 18.5 ms vs 11.2 ms, benchmarks/results/ann-query.json).
POOL_MIN_SIDE = 256


def decode_candidates(
    blobs: Sequence[bytes], size: int, pool: ThreadPoolExecutor | None = None
) -> list[Image.Image]:
    """Stored model-resolution JPEGs → RGB images for the vision tower, on ``pool``'s threads
    when there is more than one and they are large enough to be worth it (``decode_image``: the
    same checks as indexing)."""
    from blip_ops.decode import decode_image

    if pool is not None and len(blobs) > 1 and size >= POOL_MIN_SIDE:
        return list(pool.map(partial(decode_image, target_size=size), blobs))
    return [decode_image(b, target_size=size) for b in blobs]


class QueryScorer:
    """Encodes queries and scores ITM pairs with one loaded ``RetrievalModel``."""

    def __init__(self, model, cache_items: int = 4096, decode_threads: int = 4):
        self.model = model
        self.model_id: str = model.model_id
        self.cache = TokenCache(cache_items)
        self.stored_used = 0  # candidates scored from their stored tokens (no cache lookup)
        # Cache misses' JPEGs are decoded on these threads (PIL releases the GIL while decoding):
        # 32 candidates at 384 px took 13.8 ms one at a time (benchmarks/bench_ann.py).
        self._decode_pool = (
            ThreadPoolExecutor(decode_threads, thread_name_prefix="rerank-decode")
            if decode_threads > 1
            else None
        )

    def warm_up(self, rerank_k: int) -> float:
        """One query's model calls (text encode, a vision pass, ITM of ``rerank_k`` pairs) on
        made-up inputs, so a fresh replica's first real query does not pay the first calls'
        one-off costs; returns seconds. The text mixes Latin and Chinese characters: the first
        Chinese query otherwise loads pypinyin's dictionaries (~240 ms, compact model, 2 CPU
        cores). Nothing enters the token cache. Measured with and without it (make
        bench-serve-compact, float32): the first query's one-off cost 124 ms -> 12 ms."""
        import time

        started = time.perf_counter()
        size = self.model.image_settings.size
        blank = Image.new("RGB", (size, size), (128, 128, 128))
        self.encode_texts([WARM_UP_TEXT])
        tokens = self.model.encode_images([blank], return_tokens=True).tokens
        n = max(1, rerank_k)
        self.model.itm_scores([WARM_UP_TEXT] * n, tokens.expand(n, *tokens.shape[1:]))
        return time.perf_counter() - started

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(B, D) float32 ITC embeddings of raw query texts (normalised by the checkpoint's rule)."""
        return self.model.encode_texts(list(texts)).numpy()

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, D) float32 ITC embeddings of decoded RGB query images."""
        return self.model.encode_images(self.model.preprocess(list(images))).embeddings.numpy()

    def image_tokens(
        self,
        keys: Sequence[str],
        images: Sequence[bytes | None],
        stored: Sequence[StoredTokens | None] | None = None,
    ) -> torch.Tensor:
        """(k, N, H) tokens for the candidates: their ``stored`` tokens where given (no vision
        pass, not cached: reading them is as cheap as a cache hit), the others from the cache or
        by one vision pass over the misses."""
        stored = stored if stored is not None else [None] * len(keys)
        by_key: dict[str, bytes | None] = {}
        given: dict[str, torch.Tensor] = {}
        for key, image, tokens in zip(keys, images, stored, strict=True):
            by_key.setdefault(key, image)
            if tokens is not None and key not in given:
                given[key] = tokens.tensor(self.model.device, self.model.dtype)
        self.stored_used += len(given)

        def encode(missing: list[str]) -> torch.Tensor:
            decoded = decode_candidates(
                [by_key[k] for k in missing], self.model.image_settings.size, self._decode_pool
            )
            return self.model.encode_images(decoded, return_tokens=True).tokens  # (m, N, H)

        if not given:
            return self.cache.fetch(keys, encode)
        rest = list(dict.fromkeys(k for k in keys if k not in given))
        if rest:
            given.update(zip(rest, self.cache.fetch(rest, encode), strict=True))
        return _stack([given[k] for k in keys])

    def _checked_tokens(self, job: ItmJob) -> tuple[StoredTokens | None, ...]:
        """``job``'s stored tokens per candidate; refused when another model stored them."""
        stored = job.stored()
        if job.model_id not in (None, self.model_id) and any(t is not None for t in stored):
            raise ValueError(
                f"stored image tokens of model {job.model_id} sent to the scorer of model "
                f"{self.model_id}"
            )
        return stored

    def itm(self, jobs: Sequence[ItmJob]) -> list[np.ndarray]:
        """ITM positive-class logits per job, (k_i,) float32: one forward pass per group of jobs
        whose texts are of similar length (:func:`length_groups`)."""
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(jobs)
        lengths = (
            self.model.text_lengths([job.text for job in jobs])
            if len(jobs) > 1
            else [1] * len(jobs)
        )
        for group in length_groups(lengths):
            for i, logits in zip(group, self._itm_pass([jobs[i] for i in group]), strict=True):
                out[i] = logits
        return out

    def _itm_pass(self, jobs: Sequence[ItmJob]) -> list[np.ndarray]:
        """ITM positive-class logits per job, (k_i,) float32, all jobs in one forward pass."""
        texts: list[str] = []
        keys: list[str] = []
        # The same product in several jobs of the batch is encoded (or unpacked) once.
        images: dict[str, bytes | None] = {}
        stored: dict[str, StoredTokens | None] = {}
        for job in jobs:
            texts.extend([job.text] * len(job.keys))
            keys.extend(job.keys)
            for key, image, tokens in zip(
                job.keys, job.images, self._checked_tokens(job), strict=True
            ):
                if images.get(key) is None:
                    images[key] = image
                if stored.get(key) is None:
                    stored[key] = tokens
        if not keys:
            return [np.empty(0, np.float32) for _ in jobs]
        unique = list(images)
        tokens = self.image_tokens(unique, [images[k] for k in unique], [stored[k] for k in unique])
        index = {key: i for i, key in enumerate(unique)}
        pair_tokens = tokens[[index[k] for k in keys]]  # (P, N, H)
        logits = self.model.itm_scores(texts, pair_tokens).numpy()  # (P,)
        out, start = [], 0
        for job in jobs:
            out.append(logits[start : start + len(job.keys)].astype(np.float32))
            start += len(job.keys)
        return out


def length_groups(lengths: Sequence[int], ratio: float = ITM_LENGTH_RATIO) -> list[list[int]]:
    """Indices of ``lengths`` in groups to run as one batch each: sorted by length, a group
    closes where the next length exceeds ``ratio`` times its shortest. One ITM pass pads every
    pair to its longest text; with shopper queries of 5 to 35 tokens, 8 queries in one pass cost
    32 ms a query on the compact model (bf16, 1 thread) against 19 ms grouped."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= ratio * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _stack(tokens: list[torch.Tensor]) -> torch.Tensor:
    """(k, N, H) from k (N, H) token sets, which must agree in shape (stored and computed)."""
    shapes = sorted({tuple(t.shape) for t in tokens})
    if len(shapes) > 1:
        raise ValueError(f"image tokens of one batch differ in shape: {shapes}")
    return torch.stack(tokens)
