"""BLIP's retrieval losses and negative mining: ITC, ITM with hard negatives, cross-rank gathering.

The algorithm is the original BLIP's (salesforce/BLIP ``models/blip_retrieval.py``), taken apart into functions so each can be tested on its own:

- :func:`itc_loss`: symmetric InfoNCE over L2-normalised features with a learnable temperature,
  clamped to [0.001, 0.5]. Every pair sharing a product id is a positive (soft targets = the
  same-id mask normalised per row, BLIP's ``sim_targets``): all titles of one product (English,
  汉字, pinyin) are positives of its image, never negatives. B images may face T >= B texts.
- :func:`sample_hard_negatives`: one negative text per image and one negative image per text,
  drawn with ``torch.multinomial`` from softmax(cosine / temp) with same-product entries masked.
  Vectorised: one ``multinomial`` call per direction, whatever the batch size (the original loops
  over the batch in Python). ``mode="random"`` draws uniformly among the non-same-product entries
  (the ablation).
- :func:`gather_features`: all-gather across ranks with the gradient flowing back to each rank's
  own shard (BLIP's ``all_gather_with_grad``), identity without ``torch.distributed``; this is how
  the sampling pool spans all ranks (BLIP's ``negative_all_rank``).
- :func:`itm_loss`: cross-entropy on the 2-way ITM head.

- :func:`itc_loss_with_momentum`: BLIP's momentum-distilled ITC (optional, off by default): the
  online features face [batch ; queue] momentum features (:mod:`blip_ops.momentum`), targets =
  alpha * softmax(momentum sims / temp) + (1 - alpha) * same-product positives over batch and
  queue. :func:`itc_loss` is unchanged when momentum is off.

Imports only torch at module load (this module is part of the ``blip_ops`` core).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

TEMP_INIT = 0.07  # BLIP's initial temperature
TEMP_MIN, TEMP_MAX = 0.001, 0.5  # BLIP clamps the learnable temperature to this range
NEGATIVE_MODES = ("hard", "random")


# ---- ids --------------------------------------------------------------------------------------
def product_id_tensor(ids: Sequence[str | int] | torch.Tensor) -> torch.Tensor:
    """Product ids → (N,) int64 codes that agree across processes and calls.

    Integers pass through; strings map to a stable 63-bit digest (not Python's salted ``hash``), so
    two ranks that see the same product id produce the same code and cross-rank masking works.
    """
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 1 or ids.dtype.is_floating_point:
            raise ValueError(
                f"product ids must be a 1-d integer tensor, got {ids.dtype} {tuple(ids.shape)}"
            )
        return ids.long()
    codes = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, str)):
            raise TypeError(f"product ids must be str or int, got {type(i).__name__}: {i!r:.60}")
        if isinstance(i, int):
            codes.append(i)
        else:
            digest = hashlib.blake2b(i.encode(), digest_size=8).digest()
            codes.append(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.tensor(codes, dtype=torch.long)


def same_product_mask(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """(R, C) bool: True where row and column belong to the same product."""
    return row_ids.view(-1, 1) == col_ids.to(row_ids.device).view(1, -1)


# ---- temperature ------------------------------------------------------------------------------
def make_temperature(init: float = TEMP_INIT) -> torch.nn.Parameter:
    """BLIP's learnable ITC temperature (a scalar parameter the caller optimises)."""
    return torch.nn.Parameter(torch.tensor(float(init)))


def clamp_temperature_(temp: torch.Tensor) -> torch.Tensor:
    """Clamp the temperature parameter in place to [0.001, 0.5], as BLIP does every step.

    In place and without grad (BLIP's ``self.temp.clamp_``) rather than a functional clamp, so the
    parameter itself never drifts outside the range and its gradient is never cut off.
    """
    with torch.no_grad():
        temp.clamp_(TEMP_MIN, TEMP_MAX)
    return temp


# ---- ITC --------------------------------------------------------------------------------------
class ItcOutput(NamedTuple):
    loss: torch.Tensor  # () float32, mean of the image→text and text→image losses
    sim_i2t: torch.Tensor  # (B, T) cosine similarities, no temperature
    sim_t2i: torch.Tensor  # (T, B) cosine similarities (the transpose of sim_i2t)
    positives: torch.Tensor  # (B, T) bool, same product


def _soft_targets(positives: torch.Tensor, what: str) -> torch.Tensor:
    counts = positives.sum(dim=1, keepdim=True)  # (R, 1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts.view(-1) == 0).view(-1)[:8].tolist()
        raise ValueError(
            f"ITC: {what} rows {rows} have no positive in the batch; every image needs at least "
            "one title of its product and every title its product's image"
        )
    return positives.float() / counts  # BLIP's sim_targets: same-id mask normalised per row


def _checked_ids_and_temperature(image_feat, text_feat, image_ids, text_ids, temp):
    """Shared argument checks of the ITC losses; returns the temperature clamped as BLIP does
    (a trainable leaf parameter is clamped in place so it never drifts out of range)."""
    if image_ids.shape != (image_feat.shape[0],) or text_ids.shape != (text_feat.shape[0],):
        raise ValueError(
            f"ITC: got {tuple(image_ids.shape)} image ids for {image_feat.shape[0]} images and "
            f"{tuple(text_ids.shape)} text ids for {text_feat.shape[0]} texts"
        )
    if isinstance(temp, torch.Tensor):
        if temp.is_leaf and temp.requires_grad:
            clamp_temperature_(temp)
        else:
            temp = temp.clamp(TEMP_MIN, TEMP_MAX)
    else:
        temp = min(max(float(temp), TEMP_MIN), TEMP_MAX)
    return temp


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor | float,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
) -> ItcOutput:
    """Symmetric InfoNCE between B images and T texts; all same-product pairs are positives.

    ``image_feat`` (B, D) and ``text_feat`` (T, D) are projected features (normalised here too:
    normalising twice changes nothing). ``temp`` is the learnable temperature; a parameter is
    clamped in place first (:func:`clamp_temperature_`). ``image_ids`` (B,) and ``text_ids`` (T,)
    are int64 product codes (:func:`product_id_tensor`).
    """
    if image_feat.ndim != 2 or text_feat.ndim != 2 or image_feat.shape[1] != text_feat.shape[1]:
        raise ValueError(
            "ITC: expected image features (B, D) and text features (T, D), got "
            f"{tuple(image_feat.shape)} and {tuple(text_feat.shape)}"
        )
    temp = _checked_ids_and_temperature(image_feat, text_feat, image_ids, text_ids, temp)
    img = F.normalize(image_feat.float(), dim=-1)  # (B, D)
    txt = F.normalize(text_feat.float(), dim=-1)  # (T, D)
    sim_i2t = img @ txt.t()  # (B, T) cosine
    sim_t2i = sim_i2t.t()  # (T, B): the same similarities seen from the texts
    positives = same_product_mask(image_ids.to(img.device), text_ids.to(img.device))  # (B, T)
    targets_i2t = _soft_targets(positives, "image")  # (B, T), rows sum to 1
    targets_t2i = _soft_targets(positives.t(), "text")  # (T, B)
    loss_i2t = -(F.log_softmax(sim_i2t / temp, dim=1) * targets_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i / temp, dim=1) * targets_t2i).sum(dim=1).mean()
    return ItcOutput((loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i, positives)


class MomentumItcOutput(NamedTuple):
    loss: torch.Tensor  # () float32, mean of the image→text and text→image losses
    sim_i2t: torch.Tensor  # (B, T + Qt) online images · [momentum batch texts ; queued texts]
    sim_t2i: torch.Tensor  # (T, B + Qi) online texts · [momentum batch images ; queued images]
    targets_i2t: torch.Tensor  # (B, T + Qt) soft targets, rows sum to 1
    targets_t2i: torch.Tensor  # (T, B + Qi)
    positives_i2t: torch.Tensor  # (B, T + Qt) bool, same product
    positives_t2i: torch.Tensor  # (T, B + Qi) bool, same product


def momentum_targets(
    sim_m: torch.Tensor,
    positives: torch.Tensor,
    alpha: float,
    temp: torch.Tensor | float,
    what: str,
) -> torch.Tensor:
    """BLIP's distilled targets: ``alpha * softmax(sim_m / temp) + (1 - alpha) * sim_targets``,
    ``sim_targets`` the same-product mask normalised per row (batch and queue columns alike)."""
    hard = _soft_targets(positives, what)
    if alpha == 0:
        return hard
    return alpha * F.softmax(sim_m.float() / temp, dim=1) + (1 - alpha) * hard


def _with_queue(
    feat: torch.Tensor,
    ids: torch.Tensor,
    queue: torch.Tensor | None,
    queue_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if queue is None or queue.numel() == 0:
        return feat, ids
    if queue_ids is None or queue_ids.shape != (queue.shape[0],):
        raise ValueError(f"ITC: a queue of {queue.shape[0]} features needs as many product ids")
    queue = F.normalize(queue.detach().float().to(feat.device), dim=-1)
    return torch.cat([feat, queue]), torch.cat([ids, queue_ids.to(ids.device).long()])


def itc_loss_with_momentum(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor | float,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    *,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor | None = None,
    image_queue_ids: torch.Tensor | None = None,
    text_queue: torch.Tensor | None = None,
    text_queue_ids: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> MomentumItcOutput:
    """BLIP's ITC with momentum distillation and a feature queue.

    ``image_feat`` (B, D) / ``text_feat`` (T, D): online features (with grad);
    ``image_feat_m`` (B, D) / ``text_feat_m`` (T, D): the momentum encoder's features of the same
    batch; ``image_queue`` (Qi, D) + ``image_queue_ids`` (Qi,) and ``text_queue`` (Qt, D) +
    ``text_queue_ids`` (Qt,): earlier momentum features (None or empty: none). Every column of
    the same product, in the batch or in the queue, is a positive, never a negative. ``alpha``
    (already ramped by the caller, :func:`blip_ops.momentum.alpha_at`) weighs the momentum
    model's softmax against the same-product targets; with ``alpha`` 0, an empty queue and
    momentum features equal to the online ones, the loss equals :func:`itc_loss`'s.
    """
    if image_feat.ndim != 2 or text_feat.ndim != 2 or image_feat.shape[1] != text_feat.shape[1]:
        raise ValueError(
            "ITC: expected image features (B, D) and text features (T, D), got "
            f"{tuple(image_feat.shape)} and {tuple(text_feat.shape)}"
        )
    if image_feat_m.shape != image_feat.shape or text_feat_m.shape != text_feat.shape:
        raise ValueError(
            f"ITC: momentum features {tuple(image_feat_m.shape)} / {tuple(text_feat_m.shape)} do "
            f"not match the online ones {tuple(image_feat.shape)} / {tuple(text_feat.shape)}"
        )
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"ITC: alpha must be in [0, 1], got {alpha}")
    temp = _checked_ids_and_temperature(image_feat, text_feat, image_ids, text_ids, temp)
    img = F.normalize(image_feat.float(), dim=-1)  # (B, D)
    txt = F.normalize(text_feat.float(), dim=-1)  # (T, D)
    device = img.device
    image_ids, text_ids = image_ids.to(device), text_ids.to(device)
    with torch.no_grad():
        img_m = F.normalize(image_feat_m.detach().float().to(device), dim=-1)  # (B, D)
        txt_m = F.normalize(text_feat_m.detach().float().to(device), dim=-1)  # (T, D)
        img_m_all, img_ids_all = _with_queue(img_m, image_ids, image_queue, image_queue_ids)
        txt_m_all, txt_ids_all = _with_queue(txt_m, text_ids, text_queue, text_queue_ids)
        pos_i2t = same_product_mask(image_ids, txt_ids_all)  # (B, T + Qt)
        pos_t2i = same_product_mask(text_ids, img_ids_all)  # (T, B + Qi)
        t = temp.detach() if isinstance(temp, torch.Tensor) else temp
        a = float(alpha)
        targets_i2t = momentum_targets(img_m @ txt_m_all.t(), pos_i2t, a, t, "image")
        targets_t2i = momentum_targets(txt_m @ img_m_all.t(), pos_t2i, a, t, "text")
    sim_i2t = img @ txt_m_all.t()  # (B, T + Qt) cosine
    sim_t2i = txt @ img_m_all.t()  # (T, B + Qi) cosine
    loss_i2t = -(F.log_softmax(sim_i2t / temp, dim=1) * targets_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i / temp, dim=1) * targets_t2i).sum(dim=1).mean()
    return MomentumItcOutput(
        (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i, targets_i2t, targets_t2i, pos_i2t, pos_t2i
    )


# ---- hard negatives ---------------------------------------------------------------------------
class Negatives(NamedTuple):
    text_for_image: torch.Tensor  # (B,) int64 column of sim_i2t: a negative text per image
    image_for_text: torch.Tensor  # (T,) int64 column of sim_t2i: a negative image per text


def negative_weights(
    sim: torch.Tensor,
    row_ids: torch.Tensor,
    col_ids: torch.Tensor,
    temp: torch.Tensor | float,
    *,
    mode: str = "hard",
    extra: torch.Tensor | None = None,
    what: str = "row",
) -> torch.Tensor:
    """(R, C) sampling weights for negatives: zero on same-product entries, rows sum > 0.

    ``hard``: softmax(sim / temp) over the non-same-product entries (masking the logits before the
    softmax, not the probabilities after, so a dominant positive cannot underflow the candidates
    to zero). ``random``: uniform over them. ``extra`` (R, C) bool or non-negative float is added
    to the normalised weights: ``True`` (1.0) gives that candidate as much mass as the whole
    in-batch distribution; the same-product mask wins over it.
    """
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"negative mode must be one of {NEGATIVE_MODES}, got {mode!r}")
    if sim.shape != (row_ids.numel(), col_ids.numel()):
        raise ValueError(
            f"similarities of shape {tuple(sim.shape)} do not match {row_ids.numel()} row ids "
            f"and {col_ids.numel()} column ids"
        )
    with torch.no_grad():
        same = same_product_mask(row_ids.to(sim.device), col_ids.to(sim.device))  # (R, C)
        empty = ~(~same).any(dim=1)  # (R,) rows with no other product at all
        if bool(empty.any()):
            rows = torch.nonzero(empty).view(-1)[:8].tolist()
            raise ValueError(
                f"no negative candidate for {what}s {rows}: every candidate belongs to the same "
                "product; a batch (or, with gathering, all ranks together) needs at least 2 products"
            )
        if mode == "hard":
            t = temp.detach() if isinstance(temp, torch.Tensor) else temp
            logits = (sim.detach().float() / t).masked_fill(same, float("-inf"))
            weights = torch.softmax(logits, dim=1)  # (R, C), exactly 0 where same
        else:
            weights = (~same).float()
            weights /= weights.sum(dim=1, keepdim=True)
        if extra is not None:
            if extra.shape != sim.shape:
                raise ValueError(
                    f"extra negatives of shape {tuple(extra.shape)} for similarities "
                    f"{tuple(sim.shape)}"
                )
            extra = extra.to(device=sim.device, dtype=torch.float32)
            if bool((extra < 0).any()):
                raise ValueError("extra negative weights must be non-negative")
            weights = weights + extra.masked_fill(same, 0.0)
    return weights


def _multinomial(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # A generator only draws on its own device; the weights are small (R, C), so move them there.
    dev = weights.device
    if generator is not None and generator.device != dev:
        weights = weights.to(generator.device)
    picked = torch.multinomial(weights, 1, generator=generator).view(-1)  # (R,)
    return picked.to(dev)


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    temp: torch.Tensor | float,
    generator: torch.Generator | None = None,
    mode: str = "hard",
    extra_negatives: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    *,
    all_image_ids: torch.Tensor | None = None,
    all_text_ids: torch.Tensor | None = None,
) -> Negatives:
    """One negative text per image and one negative image per text, never of the same product.

    ``sim_i2t`` (B, T') and ``sim_t2i`` (T, B') are cosine similarities (no temperature; weights
    are softmax(sim / temp)). Rows are this rank's images (``image_ids`` (B,)) and texts
    (``text_ids`` (T,)); columns are the sampling pool: the same texts/images (T' = T, B' = B), or,
    with ``negative_all_rank``, those of all ranks, whose ids are then ``all_text_ids`` (T',) and
    ``all_image_ids`` (B',). ``extra_negatives`` = (extra_i2t (B, T'), extra_t2i (T, B')), each bool
    or float or None, upweights mined candidates (see :func:`negative_weights`).

    Seeded: the same ``generator`` state gives the same negatives. Raises ``ValueError`` when a row
    has no candidate of another product (no silent fallback: such a row would teach ITM nothing).
    """
    col_text_ids = text_ids if all_text_ids is None else all_text_ids
    col_image_ids = image_ids if all_image_ids is None else all_image_ids
    extra_i2t, extra_t2i = extra_negatives if extra_negatives is not None else (None, None)
    w_i2t = negative_weights(
        sim_i2t, image_ids, col_text_ids, temp, mode=mode, extra=extra_i2t, what="image"
    )  # (B, T')
    w_t2i = negative_weights(
        sim_t2i, text_ids, col_image_ids, temp, mode=mode, extra=extra_t2i, what="text"
    )  # (T, B')
    return Negatives(_multinomial(w_i2t, generator), _multinomial(w_t2i, generator))


# A negative sampler: sample_hard_negatives' signature, returning one negative per row.
NegativeSampler = Callable[..., Negatives]


def first_candidate_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    temp: torch.Tensor | float,
    generator: torch.Generator | None = None,
    mode: str = "hard",
    extra_negatives=None,
    *,
    all_image_ids: torch.Tensor | None = None,
    all_text_ids: torch.Tensor | None = None,
) -> Negatives:
    """A deterministic :data:`NegativeSampler`: each row takes its first candidate of another
    product. For exactness tests only (distributed vs one process draw from different streams)."""
    t_ids = text_ids if all_text_ids is None else all_text_ids
    i_ids = image_ids if all_image_ids is None else all_image_ids
    w_i2t = negative_weights(sim_i2t, image_ids, t_ids, temp, mode="random")  # (B, T')
    w_t2i = negative_weights(sim_t2i, text_ids, i_ids, temp, mode="random")  # (T, B')
    return Negatives((w_i2t > 0).float().argmax(dim=1), (w_t2i > 0).float().argmax(dim=1))


# ---- cross-rank gathering ---------------------------------------------------------------------
def _dist_world() -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (shards may differ in length); backward returns the local shard's
    gradient summed over ranks, as BLIP's ``all_gather_with_grad`` does (each rank computes the
    same loss on the gathered batch; DDP's averaging then yields the full-batch gradient)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        world, rank = dist.get_world_size(), dist.get_rank()
        size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        shards = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(shards, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([s[:n] for s, n in zip(shards, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)  # sum over ranks
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_features(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (N_r, ...) from all ranks along dim 0, rank order; shards may differ
    in length but not in trailing shape or dtype. The gradient flows back to this rank's shard.
    Identity (the very tensor) when ``torch.distributed`` is not initialised or has one rank."""
    if _dist_world() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


# ---- ITM --------------------------------------------------------------------------------------
def itm_loss(
    itm_logits: torch.Tensor, labels: torch.Tensor, *, balanced: bool = False
) -> torch.Tensor:
    """Cross-entropy of the 2-way ITM head: ``itm_logits`` (N, 2), ``labels`` (N,) 1 = matching.

    BLIP feeds B positives and 2B negatives (one negative text per image, one negative image per
    text), unweighted. ``balanced`` weighs each class by the inverse of its count, so positives
    and negatives carry equal total weight: "no" to everything then costs ln 2, not the entropy
    of the class prior, and stops being the easy minimum a fresh head falls into.
    """
    if itm_logits.ndim != 2 or itm_logits.shape[1] != 2 or labels.shape != itm_logits.shape[:1]:
        raise ValueError(
            f"ITM: expected logits (N, 2) and labels (N,), got {tuple(itm_logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    labels = labels.to(itm_logits.device).long()
    if not balanced:
        return F.cross_entropy(itm_logits.float(), labels)
    counts = torch.bincount(labels, minlength=2).float().clamp_min(1.0)  # (2,)
    return F.cross_entropy(itm_logits.float(), labels, weight=counts.sum() / (2.0 * counts))
