"""The BLIP retrieval train step: ITC + ITM with hard negatives, on an :class:`HFBlipModel`.

One call = one forward of BLIP's retrieval objective (``models/blip_retrieval.py``) with grad
enabled; the caller owns ``backward``, the optimiser, the schedule and ``model.model.train()``.
``HFBlipModel.encode_*`` run under ``torch.inference_mode`` and cannot train, so the vision,
text and ITM paths are repeated here with grad, calling the same submodules in the same way
(vision CLS → ``vision_proj``; text CLS → ``text_proj``; ITM = text encoder with cross-attention
to the image tokens → ``itm_head`` on CLS, as transformers does for HF checkpoints).

A batch holds B images and T >= B titles (several per product: English, 汉字, pinyin). ITM pairs:
every title with its product's image (T positives), one hard negative title per image (B) and
one hard negative image per title (T); with one title per product that is BLIP's B + 2B.
With ``torch.distributed`` initialised, ITC runs over the batch gathered from all ranks and the
negatives are drawn from all ranks (BLIP's ``negative_all_rank``), gradients flowing back to the
rank that owns each example.

With a :class:`blip_ops.momentum.MomentumDistiller` (optional, off by default), ITC is BLIP's
momentum-distilled loss against [batch ; queue] momentum features
(:func:`blip_ops.losses.itc_loss_with_momentum`): the copy takes its EMA step first, then gives
the batch's momentum features, which are enqueued (all ranks' ones) after the loss. Hard
negatives are still drawn from the online in-batch similarities, as BLIP does.

Imports only torch at module load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from blip_ops.losses import (
    NEGATIVE_MODES,
    Negatives,
    NegativeSampler,
    gather_features,
    itc_loss,
    itc_loss_with_momentum,
    itm_loss,
    product_id_tensor,
    sample_hard_negatives,
)

ITM_TITLES = ("all", "one")

if TYPE_CHECKING:
    from blip_ops.hf_blip import HFBlipModel
    from blip_ops.momentum import MomentumDistiller


@dataclass
class RetrievalBatch:
    """One training batch: B images and T titles, each with its product id."""

    pixel_values: torch.Tensor  # (B, 3, S, S) float, as ``model.preprocess`` returns
    image_ids: Sequence[str | int] | torch.Tensor  # (B,) product id of each image
    texts: Sequence[str]  # T raw titles (normalised by the model's own text rule)
    text_ids: Sequence[str | int] | torch.Tensor  # (T,) product id of each title
    # (anchor, neighbour) image indices into this batch: mined hard-negative pairs (may be empty)
    mined_pairs: Sequence[tuple[int, int]] = ()
    # Synthetic ITM negatives: a product's own title with one attribute word swapped (S texts),
    # each paired with the image at ``swap_images[s]`` (index into this batch) as a non-match.
    swap_texts: Sequence[str] = ()
    swap_images: Sequence[int] = ()

    @classmethod
    def coerce(cls, batch: RetrievalBatch | Mapping[str, Any]) -> RetrievalBatch:
        if isinstance(batch, cls):
            return batch
        if isinstance(batch, Mapping):
            missing = {"pixel_values", "image_ids", "texts", "text_ids"} - set(batch)
            if missing:
                raise KeyError(f"batch lacks {sorted(missing)}; got keys {sorted(batch)}")
            return cls(
                batch["pixel_values"], batch["image_ids"], batch["texts"], batch["text_ids"],
                batch.get("mined_pairs", ()), batch.get("swap_texts", ()),
                batch.get("swap_images", ()),
            )  # fmt: skip
        raise TypeError(f"expected a RetrievalBatch or a mapping, got {type(batch).__name__}")

    def mined_negatives(self, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``extra_negatives`` for :func:`retrieval_train_step` from ``mined_pairs``, or None.

        extra_i2t (B, T): anchor image a → every title of its mined neighbours in the batch;
        extra_t2i (T, B): every title of anchor a → its neighbours' images. Each row with mined
        candidates sums to ``weight`` (spread evenly over them), so ``weight`` 1.0 gives a row's
        mined candidates together as much sampling mass as all its in-batch candidates.
        """
        if weight < 0:
            raise ValueError(f"mined negative weight must be >= 0, got {weight}")
        if not self.mined_pairs or weight == 0:
            return None
        img = product_id_tensor(self.image_ids)  # (B,)
        txt = product_id_tensor(self.text_ids)  # (T,)
        n_img = img.numel()
        pair = torch.zeros(n_img, n_img)  # (B, B) anchor image -> neighbour image
        for a, n in self.mined_pairs:
            if not (0 <= a < n_img and 0 <= n < n_img):
                raise ValueError(f"mined pair {(a, n)} outside a batch of {n_img} images")
            if img[a] == img[n]:
                raise ValueError(f"mined pair {(a, n)} joins a product to itself")
            pair[a, n] = 1.0
        titles = (img.view(-1, 1) == txt.view(1, -1)).float()  # (B, T) image b's product's titles
        i2t = pair @ titles  # (B, T)
        t2i = titles.t() @ pair  # (T, B)
        i2t = i2t * (weight / i2t.sum(dim=1, keepdim=True).clamp_min(1e-12))
        t2i = t2i * (weight / t2i.sum(dim=1, keepdim=True).clamp_min(1e-12))
        return i2t, t2i


def _pad_tokens(enc: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    # Right-padding with masked pad tokens leaves every unpadded position's output unchanged.
    extra = length - enc["input_ids"].shape[1]
    if extra <= 0:
        return enc
    return {
        "input_ids": F.pad(enc["input_ids"], (0, extra), value=pad_id),
        "attention_mask": F.pad(enc["attention_mask"], (0, extra), value=0),
    }


def mined_share(
    extra_negatives: tuple[torch.Tensor | None, torch.Tensor | None] | None, neg: Negatives
) -> float | None:
    """Share of the rows with mined candidates whose sampled negative is one of them (None: no
    mined candidates this step)."""
    if extra_negatives is None:
        return None
    rows = hits = 0
    for extra, picked in zip(extra_negatives, neg, strict=True):
        if extra is None:
            continue
        extra = extra.to(picked.device)
        has = extra.sum(dim=1) > 0  # (R,)
        hit = extra.gather(1, picked.view(-1, 1)).view(-1) > 0  # (R,)
        rows += int(has.sum())
        hits += int((hit & has).sum())
    return hits / rows if rows else None


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def retrieval_train_step(
    model: HFBlipModel,
    batch: RetrievalBatch | Mapping[str, Any],
    temp_param: torch.Tensor,
    *,
    negatives: str = "hard",
    generator: torch.Generator | None = None,
    extra_negatives: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    momentum: MomentumDistiller | None = None,
    alpha: float = 0.0,
    itm_titles: str = "all",
    sampler: NegativeSampler = sample_hard_negatives,
    itm_balanced: bool = False,
) -> dict[str, Any]:
    """Forward of ITC + ITM (hard or random negatives) with grad; returns the losses.

    ``temp_param``: the learnable temperature (:func:`blip_ops.losses.make_temperature`), clamped
    in place. ``negatives``: ``"hard"`` (BLIP) or ``"random"`` (the ablation). ``generator``
    seeds the negative sampling. ``extra_negatives``: (B, T_all) / (T, B_all) weights for mined
    negatives, see :func:`blip_ops.losses.sample_hard_negatives`. ``momentum``: a
    :class:`blip_ops.momentum.MomentumDistiller` for BLIP's momentum-distilled ITC with a queue
    (updated and enqueued here); ``alpha``: its distillation weight for this step (ramped by the
    caller). None (the default) is plain in-batch ITC. ``itm_titles``: ``"all"`` (default) puts
    every title in the ITM pairs (2T + B of them); ``"one"`` draws one title per image (seeded by
    ``generator``) for its positive pair and its title → negative image pair (3B pairs, as BLIP's
    one caption per image), which roughly halves a step's text-side cost when each product has
    several titles. ITC always uses every title. ``sampler``: draws the negatives
    (:func:`blip_ops.losses.sample_hard_negatives`, or a deterministic one for exactness tests).
    The batch's ``swap_texts`` join the ITM pairs as extra negatives of their ``swap_images``.
    ``itm_balanced``: the class-balanced ITM loss (:func:`blip_ops.losses.itm_loss`).

    Returns ``loss`` (ITC + ITM, equal weights, with grad), ``itc`` and ``itm`` (detached),
    ``temp``, ``itm_accuracy`` and its split over positive / sampled negative / swapped pairs
    (``itm_accuracy_pos`` / ``_neg`` / ``_swap``: an ITM head that says "no" to everything
    scores 1.0 on negatives and 0.0 on positives), the sampled ``negatives``, the pair counts and
    ``mined_share`` (:func:`mined_share`; None without ``extra_negatives``).
    """
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
    if itm_titles not in ITM_TITLES:
        raise ValueError(f"itm_titles must be one of {ITM_TITLES}, got {itm_titles!r}")
    step = _StepInputs.of(model, RetrievalBatch.coerce(batch))
    with torch.enable_grad():
        e = _encode_and_itc(model, step, temp_param, momentum, alpha)
        neg = _sample_negatives(e, step, temp_param, sampler, generator, negatives, extra_negatives)
        itm_enc, itm_images, kinds, chosen = _itm_pairs(model, e, step, neg, itm_titles, generator)
        itm_logits = model.itm_forward(itm_enc, itm_images).float()  # (2T+B+S, 2)
        labels = (kinds == 0).long()
        itm = itm_loss(itm_logits, labels, balanced=itm_balanced)

    with torch.no_grad():
        correct = (itm_logits.argmax(dim=1) == labels).float()  # (2T+B+S,)
        itm_accuracy = correct.mean()
        by_kind = [
            float(correct[kinds == k].mean()) if bool((kinds == k).any()) else None
            for k in range(3)
        ]
    if momentum is not None:  # all ranks' momentum features, after the loss (BLIP's order)
        momentum.enqueue(
            *e.momentum_feats, e.image_ids_all.detach(), e.text_ids_all.detach(), gather=False
        )
    return {
        "loss": e.itc.loss + itm,
        "itc": e.itc.loss.detach(),
        "itm": itm.detach(),
        "temp": float(temp_param.detach() if isinstance(temp_param, torch.Tensor) else temp_param),
        "itm_accuracy": float(itm_accuracy),
        "itm_accuracy_pos": by_kind[0],
        "itm_accuracy_neg": by_kind[1],
        "itm_accuracy_swap": by_kind[2],
        "negatives": neg,
        "n_images": step.image_ids.numel(),
        "n_texts": step.text_ids.numel(),
        "n_itm_pairs": int(labels.numel()),
        "itm_text_rows": chosen.detach(),  # titles in the ITM pairs (all, or one per image)
        "mined_share": mined_share(extra_negatives, neg),
        "alpha": float(alpha) if momentum is not None else None,
        "queue": len(momentum.text_queue) if momentum is not None else None,
    }


@dataclass
class _StepInputs:
    """A batch checked and on the model's device."""

    image_ids: torch.Tensor  # (B,)
    text_ids: torch.Tensor  # (T,)
    texts: list[str]
    pixels: torch.Tensor  # (B, 3, S, S) or cached vision inputs
    swap_texts: list[str]
    swap_images: list[int]

    @classmethod
    def of(cls, model: HFBlipModel, batch: RetrievalBatch) -> _StepInputs:
        device = model.device
        image_ids = product_id_tensor(batch.image_ids).to(device)
        text_ids = product_id_tensor(batch.text_ids).to(device)
        texts = list(batch.texts)
        if isinstance(batch.texts, str) or len(texts) != text_ids.numel():
            raise ValueError(f"got {len(texts)} texts for {text_ids.numel()} text ids")
        pixels = model._pixels(batch.pixel_values)  # model device and dtype
        if pixels.shape[0] != image_ids.numel():
            raise ValueError(f"got {pixels.shape[0]} images for {image_ids.numel()} image ids")
        swap_texts, swap_images = list(batch.swap_texts), [int(i) for i in batch.swap_images]
        if len(swap_texts) != len(swap_images):
            raise ValueError(f"got {len(swap_texts)} swapped titles for {len(swap_images)} images")
        if any(not 0 <= i < pixels.shape[0] for i in swap_images):
            raise ValueError(
                f"swapped-title image indices {swap_images} outside a batch of {pixels.shape[0]}"
            )
        return cls(image_ids, text_ids, texts, pixels, swap_texts, swap_images)


@dataclass
class _Encoded:
    """The step's encoder outputs, this rank's and the pool's (all ranks'), and the ITC loss."""

    image_embeds: torch.Tensor  # (B, N, H)
    image_feat: torch.Tensor  # (B, D)
    text_feat: torch.Tensor  # (T, D)
    enc: dict[str, torch.Tensor]  # the titles' tokens (T, L)
    swap_enc: dict[str, torch.Tensor]  # the swapped titles' tokens (S, L)
    image_feat_all: torch.Tensor  # (B', D)
    text_feat_all: torch.Tensor  # (T', D)
    image_ids_all: torch.Tensor  # (B',)
    text_ids_all: torch.Tensor  # (T',)
    itc: Any
    distributed: bool
    momentum_feats: tuple[torch.Tensor, torch.Tensor] | None = None  # (B', D), (T', D)


def _encode_and_itc(model, step: _StepInputs, temp_param, momentum, alpha: float) -> _Encoded:
    # Encoders (ITC). Swapped titles are tokenised with the batch's (one padding length).
    image_embeds, image_feat = model.image_forward(step.pixels)  # (B, N, H), (B, D)
    enc_all = model._tokenize(step.texts + step.swap_texts)  # input_ids / attention_mask (T+S, L)
    distributed = _distributed()
    if distributed:  # a fixed length so that token ids gather across ranks
        pad_id = model.tokenizer.pad_token_id or 0
        enc_all = _pad_tokens(enc_all, model.text_settings.max_length, pad_id)
    n_texts = len(step.texts)
    enc = {name: t[:n_texts] for name, t in enc_all.items()}  # (T, L)
    swap_enc = {name: t[n_texts:] for name, t in enc_all.items()}  # (S, L)
    _, text_feat = model.text_forward(enc)  # (T, D)

    # The pool: this rank's examples, or all ranks' (gradient back to the owner).
    e = _Encoded(
        image_embeds, image_feat, text_feat, enc, swap_enc,
        image_feat_all=gather_features(image_feat), text_feat_all=gather_features(text_feat),
        image_ids_all=gather_features(step.image_ids), text_ids_all=gather_features(step.text_ids),
        itc=None, distributed=distributed,
    )  # fmt: skip
    if momentum is None:
        e.itc = itc_loss(e.image_feat_all, e.text_feat_all, temp_param, e.image_ids_all,
                         e.text_ids_all)  # fmt: skip
        return e
    from blip_ops.momentum import gather_no_grad

    momentum.update(model.model)  # BLIP's _momentum_update, before the momentum features
    image_feat_m, text_feat_m = momentum.features(step.pixels, enc, model.text_pooling)
    e.momentum_feats = (gather_no_grad(image_feat_m), gather_no_grad(text_feat_m))
    iq, tq = momentum.image_queue, momentum.text_queue
    e.itc = itc_loss_with_momentum(
        e.image_feat_all, e.text_feat_all, temp_param, e.image_ids_all, e.text_ids_all,
        image_feat_m=e.momentum_feats[0], text_feat_m=e.momentum_feats[1],
        image_queue=iq.feats, image_queue_ids=iq.ids,
        text_queue=tq.feats, text_queue_ids=tq.ids, alpha=alpha,
    )  # fmt: skip
    return e


def _sample_negatives(e: _Encoded, step: _StepInputs, temp_param, sampler, generator, mode,
                      extra_negatives):  # fmt: skip
    """Local rows against the pool's columns."""
    if e.distributed:
        with torch.no_grad():
            sim_i2t = e.image_feat.detach() @ e.text_feat_all.detach().t()  # (B, T')
            sim_t2i = e.text_feat.detach() @ e.image_feat_all.detach().t()  # (T, B')
    elif e.momentum_feats is None:
        sim_i2t, sim_t2i = e.itc.sim_i2t.detach(), e.itc.sim_t2i.detach()
    else:  # the ITC sims face momentum features: negatives use the online ones
        with torch.no_grad():
            sim_i2t = e.image_feat.detach() @ e.text_feat.detach().t()  # (B, T)
            sim_t2i = sim_i2t.t()  # (T, B)
    return sampler(
        sim_i2t, sim_t2i, step.image_ids, step.text_ids, temp_param, generator=generator,
        mode=mode, extra_negatives=extra_negatives,
        all_image_ids=e.image_ids_all, all_text_ids=e.text_ids_all,
    )  # fmt: skip


def _itm_pairs(model, e: _Encoded, step: _StepInputs, neg, itm_titles: str, generator):
    """ITM inputs over [positives | B negative titles | negative images | swapped titles]:
    (tokens, image tokens, kinds (0 positive, 1 sampled negative, 2 swapped title), chosen)."""
    device = model.device
    if e.distributed:
        image_embeds_all = gather_features(e.image_embeds)  # (B', N, H)
        ids_all = gather_features(e.enc["input_ids"])  # (T', L)
        mask_all = gather_features(e.enc["attention_mask"])  # (T', L)
    else:
        image_embeds_all = e.image_embeds
        ids_all, mask_all = e.enc["input_ids"], e.enc["attention_mask"]
    # Each title's positive image: the first local image of its product.
    same = step.text_ids.view(-1, 1) == step.image_ids.view(1, -1)  # (T, B)
    if not bool(same.any(dim=1).all()):
        lonely = torch.nonzero(~same.any(dim=1)).view(-1)[:8].tolist()
        raise ValueError(f"texts {lonely} have no image of their product in this batch")
    pos_image = same.float().argmax(dim=1)  # (T,)
    if itm_titles == "one":  # one own title per image, drawn at random among its titles
        draw = torch.rand(same.shape[0], generator=generator).to(device)  # (T,)
        chosen = (same.t().float() * (1.0 + draw)).argmax(dim=1)  # (B,) a title per image
    else:
        chosen = torch.arange(same.shape[0], device=device)  # (T,) every title

    n_chosen, n_image, n_swap = chosen.numel(), step.image_ids.numel(), len(step.swap_texts)
    ids_sel, mask_sel = e.enc["input_ids"][chosen], e.enc["attention_mask"][chosen]
    itm_enc = {
        "input_ids": torch.cat(
            [ids_sel, ids_all[neg.text_for_image], ids_sel, e.swap_enc["input_ids"]]
        ),  # (2T+B+S, L)
        "attention_mask": torch.cat(
            [mask_sel, mask_all[neg.text_for_image], mask_sel, e.swap_enc["attention_mask"]]
        ),
    }
    swap_rows = torch.tensor(step.swap_images, dtype=torch.long, device=device)  # (S,)
    itm_images = torch.cat(
        [
            e.image_embeds[pos_image[chosen]],
            e.image_embeds,
            image_embeds_all[neg.image_for_text[chosen]],
            e.image_embeds[swap_rows],
        ]
    )  # (2T+B+S, N, H)
    kinds = torch.cat(
        [
            torch.full((n_chosen,), 0, dtype=torch.long, device=device),
            torch.full((n_image + n_chosen,), 1, dtype=torch.long, device=device),
            torch.full((n_swap,), 2, dtype=torch.long, device=device),
        ]
    )
    return itm_enc, itm_images, kinds, chosen
