"""BLIP's momentum distillation for ITC: an EMA copy of the encoders and a feature queue.

As the original BLIP does it (salesforce/BLIP ``models/blip_retrieval.py``), optional here and off by default:

- :class:`MomentumDistiller` holds an exponential-moving-average copy of the parts ITC needs
  (``vision_model``, ``vision_proj``, ``text_encoder``, ``text_proj``) with momentum ``m``
  (BLIP: 0.995). :meth:`~MomentumDistiller.update` is BLIP's ``_momentum_update``
  (``param_m = m * param_m + (1 - m) * param``, parameters only, no grad);
  :meth:`~MomentumDistiller.features` gives the momentum image/text features of a batch.
- Two FIFO queues (:class:`FeatureQueue`): momentum image features with their product ids and
  momentum text features with theirs (a batch holds B images but T >= B titles, so the two differ
  in length). BLIP's queue holds 57,600 entries and starts from random features with id -100;
  here it starts empty (so the first step is exactly in-batch ITC) and keeps the newest
  ``queue_size`` entries.
- :func:`alpha_at`: the distillation weight ramped linearly from 0 to ``alpha`` over the first
  steps (BLIP: over the first epoch, ``alpha * min(1, i / len(loader))``).

The copy runs in eval mode (no dropout in the teacher; BLIP leaves its copy in train mode).
The loss itself is :func:`blip_ops.losses.itc_loss_with_momentum`. Imports only torch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from blip_ops.family import pool_text
from blip_ops.losses import gather_features

PARTS = ("vision_model", "vision_proj", "text_encoder", "text_proj")
MOMENTUM = 0.995  # BLIP's momentum
QUEUE_SIZE = 4096  # BLIP: 57,600; smaller by default here (small catalogs, small batches)


def alpha_at(step: int, alpha: float, ramp_steps: int) -> float:
    """The distillation weight at 0-based ``step``: ``alpha * min(1, step / ramp_steps)``."""
    if ramp_steps <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, step / ramp_steps)


def _net(model: Any) -> torch.nn.Module:
    # An HFBlipModel wraps the transformers module in ``.model``; accept either.
    return model if hasattr(model, "vision_model") else model.model


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`blip_ops.losses.gather_features` without grad (identity on one process)."""
    with torch.no_grad():
        return gather_features(tensor.detach())


class FeatureQueue:
    """A bounded FIFO of (feature, product id) rows, oldest first; keeps the newest ``size``."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.size = int(size)
        self.feats: torch.Tensor | None = None  # (Q, D) float32, L2-normalised
        self.ids: torch.Tensor | None = None  # (Q,) int64 product codes

    def __len__(self) -> int:
        return 0 if self.ids is None else int(self.ids.numel())

    @torch.no_grad()
    def push(self, feats: torch.Tensor, ids: torch.Tensor) -> None:
        if feats.ndim != 2 or ids.shape != (feats.shape[0],):
            raise ValueError(
                f"queue: expected features (N, D) and ids (N,), got {tuple(feats.shape)} and "
                f"{tuple(ids.shape)}"
            )
        feats = feats.detach().float()
        ids = ids.detach().long().to(feats.device)
        if self.feats is not None:
            if self.feats.shape[1] != feats.shape[1]:
                raise ValueError(f"queue holds dim {self.feats.shape[1]}, got {feats.shape[1]}")
            feats = torch.cat([self.feats.to(feats.device), feats])
            ids = torch.cat([self.ids.to(feats.device), ids])
        keep = max(0, feats.shape[0] - self.size)
        self.feats, self.ids = feats[keep:].clone(), ids[keep:].clone()

    def state_dict(self) -> dict:
        return {
            "size": self.size,
            "feats": None if self.feats is None else self.feats.cpu(),
            "ids": None if self.ids is None else self.ids.cpu(),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str) -> None:
        self.feats = None if state["feats"] is None else state["feats"].to(device)
        self.ids = None if state["ids"] is None else state["ids"].to(device)
        if len(self) > self.size:  # resumed with a smaller queue: keep the newest
            self.feats, self.ids = self.feats[-self.size :], self.ids[-self.size :]
            if self.size == 0:
                self.feats = self.ids = None


class MomentumDistiller:
    """The EMA copy of ITC's encoders plus the image and text feature queues."""

    def __init__(
        self,
        model: Any,
        *,
        m: float = MOMENTUM,
        queue_size: int = QUEUE_SIZE,
        parts: Sequence[str] = PARTS,
    ) -> None:
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {m}")
        net = _net(model)
        self.m = float(m)
        self.parts = torch.nn.ModuleDict({p: copy.deepcopy(getattr(net, p)) for p in parts})
        self.parts.requires_grad_(False)
        self.parts.eval()
        self.image_queue = FeatureQueue(queue_size)
        self.text_queue = FeatureQueue(queue_size)

    @property
    def queue_size(self) -> int:
        return self.image_queue.size

    @torch.no_grad()
    def update(self, model: Any) -> None:
        """One EMA step: ``param_m = m * param_m + (1 - m) * param`` for every copied parameter."""
        net = _net(model)
        mine, theirs = [], []
        for name, part in self.parts.items():
            src = dict(getattr(net, name).named_parameters())
            for pname, p_m in part.named_parameters():
                mine.append(p_m)
                theirs.append(src[pname].detach().to(p_m.dtype))
        torch._foreach_mul_(mine, self.m)
        torch._foreach_add_(mine, theirs, alpha=1.0 - self.m)

    @torch.no_grad()
    def features(
        self,
        pixel_values: torch.Tensor,
        tokens: Mapping[str, torch.Tensor],
        text_pooling: str = "cls",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum features of a batch: (B, D) image and (T, D) text, L2-normalised float32.

        ``pixel_values`` as the train step feeds the vision tower; ``tokens`` the tokenizer's
        ``input_ids`` / ``attention_mask``; ``text_pooling`` the online model's.
        """
        p = self.parts
        image_cls = p["vision_model"](pixel_values=pixel_values).last_hidden_state[:, 0, :]
        image_feat = F.normalize(p["vision_proj"](image_cls).float(), dim=-1)
        hidden = p["text_encoder"](**tokens).last_hidden_state  # (T, L, H)
        text_pooled = pool_text(hidden, tokens["attention_mask"], text_pooling)  # (T, H)
        text_feat = F.normalize(p["text_proj"](text_pooled).float(), dim=-1)
        return image_feat, text_feat

    @torch.no_grad()
    def enqueue(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        image_ids: torch.Tensor,
        text_ids: torch.Tensor,
        *,
        gather: bool = True,
    ) -> None:
        """Append this step's momentum features (all ranks' when ``gather`` and distributed)."""
        if gather:
            image_feat, text_feat = gather_no_grad(image_feat), gather_no_grad(text_feat)
            image_ids, text_ids = gather_no_grad(image_ids), gather_no_grad(text_ids)
        self.image_queue.push(image_feat, image_ids)
        self.text_queue.push(text_feat, text_ids)

    def state_dict(self) -> dict:
        return {
            "m": self.m,
            "parts": {k: v.detach().cpu() for k, v in self.parts.state_dict().items()},
            "image_queue": self.image_queue.state_dict(),
            "text_queue": self.text_queue.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.parts.load_state_dict(state["parts"])
        device = next(self.parts.parameters()).device
        self.image_queue.load_state_dict(state["image_queue"], device)
        self.text_queue.load_state_dict(state["text_queue"], device)
