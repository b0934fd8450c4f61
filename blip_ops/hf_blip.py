"""The HF BLIP family: ``BlipForImageTextRetrieval`` checkpoints (hub or directory).

transformers' ``forward`` runs the vision tower on every call, which makes re-ranking k candidates
for one query cost k vision passes per request. Here the vision, text and ITM paths are separate
calls, equal to ``forward`` within 1e-5 (tests/test_hf_blip.py), so image tokens can be computed
once and reused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from blip_ops.attention import set_attention
from blip_ops.family import (
    CATALOG_CONFIG,
    ImageEncoding,
    ImageSettings,
    RetrievalModel,
    pool_text,
    read_catalog_config,
    resolve_device,
    resolve_dtype,
    weights_digest,
)
from blip_ops.hub import resolve_model_ref
from blip_ops.text import TextSettings

logger = logging.getLogger(__name__)

FAMILY = "hf_blip"
# Config keys that describe how a model was saved or loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = (
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset",
    "architectures",  # added by save_pretrained; the family already names the architecture
    "freeze_cnn",  # compact family: a training setting, the same weights compute the same thing
)


def _stable_config(config) -> dict:
    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
        return d

    return strip(config.to_dict())


class HFBlipModel(RetrievalModel):
    family = FAMILY

    def __init__(
        self,
        model,  # transformers BlipForImageTextRetrieval, float32 on CPU as loaded
        tokenizer,
        image_settings: ImageSettings,
        text_settings: TextSettings | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "sdpa",
    ) -> None:
        self.text_settings = text_settings or TextSettings()
        # Digest before any device/dtype move so the id names the checkpoint, not this run.
        self.model_id = f"{self.family}-" + weights_digest(
            _stable_config(model.config), model.state_dict(), extra=self.text_settings.to_json()
        )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.attention = attention
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if set_attention(self.model, attention) == 0:
            raise ValueError(f"{type(model).__name__} has no BLIP attention modules: not a BLIP model")
        self.tokenizer = tokenizer
        self.image_settings = image_settings

    # ---- loading / saving -------------------------------------------------------------------
    @classmethod
    def load(cls, ref: str, *, device: str = "auto", dtype: str = "auto", attention: str = "sdpa") -> HFBlipModel:
        from transformers import AutoTokenizer, BlipForImageTextRetrieval
        from transformers.utils import cached_file

        resolved, local_only = resolve_model_ref(ref)
        model = BlipForImageTextRetrieval.from_pretrained(resolved, dtype=torch.float32, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(resolved, local_files_only=local_only)
        pre_file = cached_file(resolved, "preprocessor_config.json", local_files_only=local_only)
        image_settings = ImageSettings.from_preprocessor_config(json.loads(Path(pre_file).read_text()))
        path = Path(resolved)
        catalog = read_catalog_config(path) if path.is_dir() else {}
        text_settings = TextSettings.from_dict(catalog.get("text"))
        loaded = cls(model, tokenizer, image_settings, text_settings, device=device, dtype=dtype, attention=attention)
        logger.info("loaded %s (%s) on %s/%s as %s", ref, FAMILY, loaded.device, loaded.dtype, loaded.model_id)
        return loaded

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.to(dtype=torch.float32).save_pretrained(out)
        self.model.to(dtype=self.dtype)
        self.tokenizer.save_pretrained(out)
        s = self.image_settings
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(s), indent=2))
        (out / CATALOG_CONFIG).write_text(
            json.dumps({"family": FAMILY, "text": self.text_settings.to_dict()}, indent=2, sort_keys=True)
        )
        return out

    def current_model_id(self) -> str:
        """The model_id the current weights would have once saved and reloaded (after training)."""
        state = {
            k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
            for k, v in self.model.state_dict().items()
        }
        return f"{self.family}-" + weights_digest(
            _stable_config(self.model.config), state, extra=self.text_settings.to_json()
        )

    def load_weights(self, path: str | Path) -> None:
        """Load the weights of the checkpoint at ``path`` into this model in place (device and
        dtype kept), e.g. to resume training."""
        from transformers import BlipForImageTextRetrieval

        saved = BlipForImageTextRetrieval.from_pretrained(path, dtype=torch.float32)
        self.model.load_state_dict(saved.state_dict())

    # ---- encoders ----------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.image_text_hidden_size)

    def _pixels(self, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(images, device=self.device)
        s = self.image_settings.size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"expected pixel values of shape (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        return pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def vision_inputs(self, images) -> torch.Tensor:
        """What a training loop may cache per image and feed the train step in place of pixels:
        the pixels (B, 3, S, S), float32 on CPU, for HF BLIP (the compact family returns its frozen
        CNN's feature maps)."""
        return self._pixels(images).float().cpu()

    # ---- forward passes with gradients (the train step calls these; encode_* wrap them) --------
    text_pooling = "cls"  # ITC text embedding from [CLS], as BLIP and transformers do
    itm_pooling = "cls"  # what itm_head reads: [CLS], as transformers' BlipForImageTextRetrieval

    def image_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-ready vision inputs → (tokens (B, N, H), ITC embedding (B, D) float32)."""
        tokens = self.model.vision_model(pixel_values=pixels).last_hidden_state  # (B, N, H)
        return tokens, F.normalize(self.model.vision_proj(tokens[:, 0, :]).float(), dim=-1)

    def text_forward(self, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens → (hidden (T, L, H), ITC embedding (T, D) float32), pooled by ``text_pooling``."""
        hidden = self.model.text_encoder(**enc).last_hidden_state  # (T, L, H)
        pooled = pool_text(hidden, enc["attention_mask"], self.text_pooling)  # (T, H)
        return hidden, F.normalize(self.model.text_proj(pooled).float(), dim=-1)

    def itm_forward(self, enc: dict[str, torch.Tensor], image_tokens: torch.Tensor) -> torch.Tensor:
        """ITM logits (k, 2) of k (text, image tokens) pairs: the text encoder cross-attends to
        the image tokens and ``itm_head`` reads ``itm_pooling`` ([CLS] for HF checkpoints, as
        transformers' BlipForImageTextRetrieval does)."""
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=self.device)
        enc = self._itm_inputs(enc)
        hidden = self.model.text_encoder(
            **enc, encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask
        ).last_hidden_state  # (k, L, H)
        pooled = pool_text(hidden, enc["attention_mask"], self.itm_pooling)  # (k, H)
        return self.model.itm_head(pooled)  # (k, 2)

    def _itm_inputs(self, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``enc`` with its first token replaced by ``text_settings.itm_first_token`` when set."""
        token = self.text_settings.itm_first_token
        if token is None:
            return enc
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"itm_first_token {token!r} is not in this checkpoint's vocabulary "
                f"({len(self.tokenizer)} tokens)"
            )
        ids = enc["input_ids"].clone()
        ids[:, 0] = token_id
        return {**enc, "input_ids": ids}

    def parameter_roles(self) -> dict[str, str]:
        """``{parameter name: "pretrained" | "fresh"}`` for per-part learning rates. A hub BLIP
        checkpoint was pretrained whole."""
        return {name: "pretrained" for name, _ in self.model.named_parameters()}

    @torch.inference_mode()
    def encode_images(self, images, *, return_tokens: bool = False) -> ImageEncoding:
        tokens, emb = self.image_forward(self._pixels(images))  # (B, N, H), (B, D)
        return ImageEncoding(embeddings=emb.cpu(), tokens=tokens if return_tokens else None)

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # A batched re-rank repeats each query once per candidate (16 queries x 32 = 512 strings):
        # tokenise each distinct text once and repeat its rows. "longest" padding over the
        # distinct texts is the same length, so the tensors are the same.
        distinct = list(dict.fromkeys(texts))
        if len(distinct) < len(texts):
            enc = self._tokenize(distinct)
            pos = {t: i for i, t in enumerate(distinct)}
            rows = torch.tensor([pos[t] for t in texts], device=self.device)
            return {name: t[rows] for name, t in enc.items()}
        norm = [self.normalize_text(t) for t in texts]
        enc = self.tokenizer(
            norm,
            padding="longest",
            truncation=True,
            max_length=self.text_settings.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        enc = self.tokenizer(
            [self.normalize_text(t) for t in texts],
            truncation=True,
            max_length=self.text_settings.max_length,
        )
        return [len(ids) for ids in enc["input_ids"]]

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, got one str")
        if not texts:
            return torch.empty(0, self.embedding_dim)
        return self.text_forward(self._tokenize(texts))[1].cpu()  # (B, D)

    @torch.inference_mode()
    def itm_scores(self, texts, image_tokens: torch.Tensor) -> torch.Tensor:
        k = image_tokens.shape[0]
        if k == 0:
            return torch.empty(0)
        if isinstance(texts, str):
            enc = self._tokenize([texts])
            enc = {name: t.expand(k, -1) for name, t in enc.items()}  # one query vs k images, no copy
        else:
            if len(texts) != k:
                raise ValueError(f"got {len(texts)} texts for {k} images; pass one text or one per image")
            enc = self._tokenize(texts)
        tokens = image_tokens.to(device=self.device, dtype=self.dtype)
        return self.itm_forward(enc, tokens)[:, 1].float().cpu()  # positive-class logit


def preprocessor_config(s: ImageSettings) -> dict:
    """The HF ``preprocessor_config.json`` for these settings (what BlipProcessor reads)."""
    return {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "BlipProcessor",
        "do_resize": True,
        "size": {"height": s.size, "width": s.size},
        "resample": int(s.resample),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(s.mean),
        "image_std": list(s.std),
        "do_convert_rgb": True,
    }


