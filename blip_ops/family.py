"""The model-family interface: what indexing, serving and evaluation may ask of a model.

A *family* is a way of building a retrieval model (HF BLIP; the compact offline model of
:mod:`blip_ops.compact_model`). Callers only use :class:`RetrievalModel`; they never branch on the
family. A checkpoint directory names its family in ``blip_catalog.json`` (absent: HF BLIP, so hub
checkpoints load as they are).
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from blip_ops.text import TextSettings, normalize_text

logger = logging.getLogger(__name__)

CATALOG_CONFIG = "blip_catalog.json"  # our per-checkpoint settings: family + text rule
# The OpenAI CLIP normalisation every BLIP checkpoint uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSettings:
    """Preprocessing a checkpoint expects (read from its ``preprocessor_config.json``)."""

    size: int  # square side in pixels the vision tower takes (384 for BLIP-base/large)
    mean: tuple[float, float, float]  # per-channel normalisation, after scaling to [0, 1]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC  # PIL filter; BLIP uses bicubic

    @classmethod
    def from_preprocessor_config(cls, cfg: dict[str, Any]) -> ImageSettings:
        size = cfg.get("size", 384)
        if isinstance(size, dict):
            height = size.get("height", size.get("shortest_edge"))
            width = size.get("width", height)
            if height != width:
                raise ValueError(f"only square model inputs are supported, got size {size}")
            size = height
        return cls(
            size=int(size),
            mean=tuple(float(x) for x in cfg.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(float(x) for x in cfg.get("image_std", (0.5, 0.5, 0.5))),
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
        )


def resize_tensor(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (3, H, W) image tensor (``decode_batch``'s GPU path) → (3, height, width) uint8, resized
    where it lies with antialiased bicubic interpolation; already that size and uint8: as is."""
    if tuple(image.shape[1:]) == (height, width) and image.dtype == torch.uint8:
        return image
    resized = torch.nn.functional.interpolate(
        image.unsqueeze(0).float(),
        size=(height, width),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )  # (1, 3, height, width) on the tensor's device
    return resized[0].clamp_(0, 255).round_().to(torch.uint8)


@dataclass
class ImageEncoding:
    """Output of :meth:`RetrievalModel.encode_images`."""

    embeddings: torch.Tensor  # (B, D) float32, L2-normalised ITC embeddings, on CPU
    tokens: torch.Tensor | None = (
        None  # (B, N, H) image tokens for ITM, model dtype, on the model device
    )


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(T, L, H) text encoder states → (T, H): [CLS] (BLIP) or the mean over real tokens (how
    sentence-transformers models such as all-MiniLM-L6-v2 were trained)."""
    if pooling == "cls":
        return hidden[:, 0, :]
    if pooling != "mean":
        raise ValueError(f"text pooling must be 'cls' or 'mean', got {pooling!r}")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (T, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class RetrievalModel(ABC):
    """One loaded checkpoint: preprocessing, ITC encoders and the ITM head."""

    family: str = ""
    model_id: str  # family + digest of config and weights (not of the path)
    image_settings: ImageSettings
    text_settings: TextSettings
    device: torch.device
    dtype: torch.dtype

    @property
    @abstractmethod
    def embedding_dim(self) -> int:
        """Size D of the ITC embeddings."""

    def normalize_text(self, text: str) -> str:
        return normalize_text(text, self.text_settings)

    def resize(
        self, images: Sequence[Image.Image | torch.Tensor]
    ) -> list[Image.Image | torch.Tensor]:
        """Each decoded image at the model's square input size, as :meth:`preprocess` sees it.

        RGB PIL images are resized by PIL with the checkpoint's filter (as transformers' BLIP
        processor does); an image already at the size and in RGB is returned as it is. (3, H, W)
        uint8 tensors from ``decode_batch``'s GPU path become (3, S, S) uint8 tensors where they lie
        (antialiased bicubic), so GPU-decoded images never round-trip to the host. Callers that
        also store the model-resolution image (the index job) resize once and pass the result to
        :meth:`preprocess`, which then does no second resize.
        """
        s = self.image_settings
        out: list[Image.Image | torch.Tensor] = []
        for i, im in enumerate(images):
            if isinstance(im, Image.Image):
                if im.size != (s.size, s.size) or im.mode != "RGB":
                    im = im.convert("RGB").resize((s.size, s.size), s.resample)
                out.append(im)
                continue
            if not isinstance(im, torch.Tensor) or im.ndim != 3 or im.shape[0] != 3:
                raise TypeError(
                    f"image {i}: expected an RGB PIL image or a (3, H, W) tensor, got {im!r:.80}"
                )
            out.append(resize_tensor(im, s.size, s.size))
        return out

    def preprocess(
        self, images: Sequence[Image.Image | torch.Tensor], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Decoded images → (B, 3, S, S) float32 pixel values on ``device`` (default CPU).

        Items are RGB PIL images or (3, H, W) uint8 tensors, resized by :meth:`resize`.
        """
        s = self.image_settings
        out_device = torch.device(device) if device is not None else torch.device("cpu")
        out = torch.empty(len(images), 3, s.size, s.size, device=out_device)  # (B, 3, S, S)
        resized = self.resize(images)
        pil = [i for i, im in enumerate(resized) if isinstance(im, Image.Image)]
        if pil:
            # PIL's resize is the one per-image step; the arithmetic is batched.
            arr = np.stack([np.asarray(resized[i], dtype=np.uint8) for i in pil])  # (P, S, S, 3)
            out[pil] = torch.from_numpy(arr).to(out_device).permute(0, 3, 1, 2).float()
        for i, im in enumerate(resized):
            if not isinstance(im, Image.Image):
                out[i] = im.to(out_device).float()
        mean = torch.tensor(s.mean, device=out_device).view(1, 3, 1, 1)
        std = torch.tensor(s.std, device=out_device).view(1, 3, 1, 1)
        return out.div_(255.0).sub_(mean).div_(std)

    @abstractmethod
    def encode_images(
        self, images: torch.Tensor | Sequence[Image.Image], *, return_tokens: bool = False
    ) -> ImageEncoding:
        """Pixel values (B, 3, S, S) or PIL images → ITC embeddings (+ ITM image tokens)."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw titles/queries (normalised here) → (B, D) float32 L2-normalised ITC embeddings."""

    @abstractmethod
    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the encoders see it (normalised, truncated, special tokens
        included): a batch of texts is padded to its longest."""

    @abstractmethod
    def itm_scores(self, texts: str | Sequence[str], image_tokens: torch.Tensor) -> torch.Tensor:
        """ITM positive-class logits, (k,) float32 on CPU.

        ``texts`` is one query scored against all k images (``image_tokens`` (k, N, H)) or k texts
        paired one-to-one with them.
        """

    @abstractmethod
    def save(self, out_dir: str | Path) -> Path:
        """Write a checkpoint that :func:`load_model` reads back with the same model_id."""


def read_catalog_config(path: Path) -> dict[str, Any]:
    file = path / CATALOG_CONFIG
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return dev


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def weights_digest(
    config_dict: dict[str, Any], state_dict: dict[str, torch.Tensor], extra: str = ""
) -> str:
    """Digest of a model's config and weights, independent of path, device and run dtype."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    h.update(extra.encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
