"""A tiny random BLIP retrieval checkpoint, made offline in seconds, for tests, CI and the demo.

    python -m blip_ops.tiny_model --out DIR [--seed S]

No weights can be downloaded here, so every test that needs "a BLIP" builds this one. Two traps:
- A random BLIP with default init embeds every input almost identically (cosine 0.9999999), so a
  ranking test would pass vacuously. Larger init ranges (vision 0.3, text 0.5) make inputs
  distinguishable (0.3 here: at 0.1 two of eight test images still met at cosine 0.985);
  ``tests/test_hf_blip.py`` checks that they are.
- ``BertTokenizerFast(vocab_file=...)`` in transformers 5.24 silently loads a 5-token vocabulary.
  We build a ``BertTokenizer`` from a vocab dict and ``save_pretrained`` it; tests check the size.
"""

from __future__ import annotations

import argparse
import json
import logging
import string
import sys
import time
from pathlib import Path

import torch

from blip_ops.family import CLIP_MEAN, CLIP_STD, ImageSettings
from blip_ops.text import TextSettings

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
# Whole words worth a token of their own: catalog nouns, attributes, marketing words and common
# pinyin syllables. Anything else falls back to single characters (+ "##" continuations), so
# Latin-script text never becomes [UNK].
_WORDS = """
sofa chair table lamp bag shoe shoes dress shirt jacket watch phone case bottle cup mug kettle
stroller scooter toy car bike helmet backpack wallet hat cap sock lamp desk bed pillow blanket
red blue green black white yellow pink purple orange grey gray brown gold silver beige navy
cotton leather wool linen silk plastic metal wood wooden steel glass ceramic bamboo velvet denim
striped dotted plaid floral plain solid check pattern
new hot sale free shipping official genuine original premium luxury light simple modern style
kids children baby men women girls boys unisex home office outdoor travel summer winter
large small mini big size set pack pcs with for and the of in to
er tong hua xing che fang ce fan niu ren jian yue xian dai qing she bao xie yi fu nan nv hai zi
hong lan lv hei bai huang fen zi se pi mian ma zhen si su liao mu jin shu bo li tao ci
""".split()


def build_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(vocab)
    for w in _WORDS:
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    return vocab


def build_tokenizer(vocab: list[str] | None = None):
    from transformers import BertTokenizer

    vocab = vocab or build_vocab()
    tok = BertTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        do_lower_case=True,
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
        model_max_length=512,
    )
    if len(tok) != len(vocab):  # the 5-token-vocab trap: fail loudly, never silently
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {len(vocab)}")
    return tok


def tiny_config(vocab_size: int, image_size: int = 64):
    from transformers import BlipConfig

    hidden = 32
    return BlipConfig(
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,  # 64 px / 8 = 8x8 patches + CLS = 65 image tokens
            "initializer_range": 0.3,  # see module docstring: default init embeds all images alike
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "encoder_hidden_size": hidden,
            "initializer_range": 0.5,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "bos_token_id": 5,
        },
        image_text_hidden_size=32,
    )


def make_tiny_model(seed: int = 0, image_size: int = 64):
    """Build (but do not save) a seeded tiny :class:`~blip_ops.hf_blip.HFBlipModel` on CPU."""
    from transformers import BlipForImageTextRetrieval

    from blip_ops.hf_blip import HFBlipModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(tiny_config(len(tokenizer), image_size)).eval()
    image_settings = ImageSettings(
        size=image_size, mean=CLIP_MEAN, std=CLIP_STD
    )
    return HFBlipModel(model, tokenizer, image_settings, TextSettings(), device="cpu", dtype="float32")


def write_tiny_model(out: str | Path, seed: int = 0) -> Path:
    started = time.perf_counter()
    model = make_tiny_model(seed)
    path = model.save(out)
    (path / "tiny_model.json").write_text(json.dumps({"seed": seed, "model_id": model.model_id}, indent=2))
    logger.info("tiny model %s written to %s in %.1fs", model.model_id, path, time.perf_counter() - started)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip_ops.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same model_id)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    path = write_tiny_model(args.out, args.seed)
    model_id = json.loads((path / "tiny_model.json").read_text())["model_id"]
    print(f"tiny BLIP checkpoint: {path}\nmodel_id: {model_id}\ntook: {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
