"""Two-stage ranking: ITC (embedding cosine) finds candidates, ITM (cross-attention) orders them.

The rule is BLIP's evaluation rule (salesforce/BLIP ``train_retrieval.py``): candidates arrive in
ANN order; the first ``rerank_k`` are re-scored with ``score = ITC cosine + itm_weight * ITM
positive-class logit`` and sorted by it; the rest follow in ANN order with no ITM score (their
``score`` is their ITC cosine). ``itm_weight`` 1.0 is BLIP's rule exactly. A smaller weight keeps
the cosine in play: the raw logit spans several units while cosines of near-duplicates differ by
hundredths, so at 1.0 the re-ranked order is the ITM head's order alone.

:func:`rerank` is the one entry point for a query's candidates: the search service's scorers
(``pipelines.search.scorer.rerank_job``) call it with the ITM logits their model replica scored in a
batch; offline callers hand it the model and the candidates' tokens or images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from blip_ops.family import RetrievalModel


@dataclass
class RerankResult:
    """Per ranked position (best first); indices refer to the caller's candidate list."""

    order: np.ndarray  # (n,) int64 candidate indices
    score: np.ndarray  # (n,) float32 final score
    itc: np.ndarray  # (n,) float32 ITC cosine
    itm: np.ndarray  # (n,) float32 ITM logit; NaN where the candidate was not re-ranked

    def __len__(self) -> int:
        return len(self.order)

    def head(self, k: int) -> RerankResult:
        return RerankResult(self.order[:k], self.score[:k], self.itc[:k], self.itm[:k])


def combine_scores(itc_scores, itm_logits, itm_weight: float = 1.0) -> RerankResult:
    """Apply the rule to ITC cosines of n candidates (ANN order) and ITM logits of the first r."""
    if not np.isfinite(itm_weight) or itm_weight < 0:
        raise ValueError(f"itm_weight must be a finite number >= 0, got {itm_weight!r}")
    itc = np.asarray(itc_scores, dtype=np.float32).reshape(-1)  # (n,)
    itm = np.asarray(itm_logits, dtype=np.float32).reshape(-1)  # (r,)
    n, r = len(itc), len(itm)
    if r > n:
        raise ValueError(f"got {r} ITM scores for only {n} candidates")
    head = np.float32(itm_weight) * itm + itc[:r]  # (r,)
    head_order = np.argsort(-head, kind="stable")  # ties keep ANN order
    order = np.concatenate([head_order, np.arange(r, n)]).astype(np.int64)
    itm_full = np.full(n, np.nan, dtype=np.float32)
    itm_full[:r] = itm
    score = np.concatenate([head, itc[r:]])
    return RerankResult(order=order, score=score[order], itc=itc[order], itm=itm_full[order])


def rerank(
    model: RetrievalModel | None,
    text: str,
    itc_scores,
    *,
    image_tokens: torch.Tensor | None = None,
    images: torch.Tensor | Sequence[Image.Image] | None = None,
    itm_logits=None,
    rerank_k: int = 32,
    k: int | None = None,
    itm_weight: float = 1.0,
) -> RerankResult:
    """Re-rank candidates (``itc_scores``: their ITC cosines, in ANN order) for one text query.

    The first ``rerank_k`` candidates' ITM logits come from the first of: ``itm_logits`` (already
    scored, e.g. by the search service's model replica, which batches the pairs of concurrent
    requests; ``model`` and ``text`` are then unused), their ``image_tokens`` (cached), or their
    ``images`` / pixel values (the vision tower then runs for the first ``rerank_k`` only).
    Returns the first ``k`` (all when None).
    """
    r = max(0, min(rerank_k, len(itc_scores)))
    if itm_logits is not None:
        itm = np.asarray(itm_logits, dtype=np.float32).reshape(-1)
        if len(itm) < r:
            raise ValueError(f"got ITM logits for {len(itm)} candidates, need the first {r}")
        itm = itm[:r]
    else:
        itm = _itm_logits(model, text, r, image_tokens, images)
    result = combine_scores(itc_scores, itm, itm_weight)
    return result if k is None else result.head(k)


def _itm_logits(model, text: str, r: int, image_tokens, images) -> np.ndarray:
    """(r,) ITM logits of the first ``r`` candidates, from their tokens or their images."""
    if image_tokens is None and images is None:
        raise ValueError("rerank needs the candidates' itm_logits, image_tokens or their images")
    if not r:
        return np.empty(0, np.float32)
    if model is None:
        raise ValueError("rerank needs a model to score ITM when no itm_logits are given")
    if image_tokens is None:
        tokens = model.encode_images(images[:r], return_tokens=True).tokens
    else:
        if len(image_tokens) < r:
            raise ValueError(f"got image tokens for {len(image_tokens)} candidates, need the first {r}")
        tokens = image_tokens[:r]
    return model.itm_scores(text, tokens).numpy()
