"""Small random BLIP retrieval checkpoints, made offline in seconds: for tests, CI, the demo and
training from scratch on a CPU; and the one factory of random BLIP models, the published
BLIP-base / BLIP-large architectures included (the benchmarks time them: speed does not depend on
the weights, and none can be downloaded here).

    python -m blip_ops.tiny_model --out DIR [--seed S] [--preset tiny|small]
        [--vocab-corpus TITLES.txt|.parquet [--vocab-size N]]

Presets:
- ``tiny`` (default): 32-d towers and wide init, for tests and the demo's mechanics (see the traps).
- ``small``: 128-d towers with 4 layers each and BERT's own init (std 0.02), the one to *train*
  from scratch here. The tiny preset's wide init makes random inputs distinguishable, which is
  what tests need, but it is a poor start for optimisation.

``--vocab-corpus`` adds the corpus's most frequent words (after :func:`blip_ops.text.normalize_text`,
so Chinese arrives as pinyin) to the vocabulary, the way a tokenizer is fitted to its training text;
without it, out-of-vocabulary words cost one token per character and a 35-token title is cut early.
A ``.parquet`` corpus contributes every string column whose name starts with ``title`` (only the
``train`` rows when it has a ``split`` column, as ``pipelines.make_catalog``'s ``pairs.parquet`` does).

No weights can be downloaded here, so every test that needs "a BLIP" builds the tiny one. Two traps:
- A random BLIP with default init embeds every input almost identically (cosine 0.9999999), so a
  ranking test would pass vacuously. Larger init ranges (vision 0.3, text 0.5) make inputs
  distinguishable (0.3 here: at 0.1 two of eight test images still met at cosine 0.985);
  ``tests/test_hf_blip.py`` checks that they are.
- ``BertTokenizerFast(vocab_file=...)`` in transformers 5.24 silently loads a 5-token vocabulary.
  We build a ``BertTokenizer`` from a vocab dict and ``save_pretrained`` it; tests check the size.

:func:`synthetic_titles` and :data:`ITM_QUERY` are the catalog-like inputs the benchmarks feed
these models (``benchmarks/model_throughput.py``, ``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from blip_ops.family import CLIP_MEAN, CLIP_STD, ImageSettings
from blip_ops.text import TextSettings, normalize_text

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


def build_vocab(extra_words: Iterable[str] = ()) -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(vocab)
    for w in (*_WORDS, *extra_words):
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    return vocab


def read_corpus(path: str | Path) -> list[str]:
    """Texts of a vocabulary corpus: lines of a text file, or a Parquet file's ``title*`` columns."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.compute  # noqa: F401  (pa.compute)
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "split" in table.column_names:  # held-out titles never shape the vocabulary
            table = table.filter(pa.compute.equal(table.column("split"), "train"))
        columns = [
            f.name
            for f in table.schema
            if f.name.startswith("title") and pa.types.is_string(f.type)
        ]
        if not columns:
            raise ValueError(
                f"{path}: no string column named title*; columns: {table.column_names}"
            )
        return [t for c in columns for t in table.column(c).to_pylist() if t]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus_words(texts: Iterable[str], size: int, min_count: int = 2) -> list[str]:
    """The ``size`` most frequent words of ``texts`` (seen ``min_count`` times or more), split the
    way the tokenizer splits (normalised, lowercased, punctuation apart), most frequent first."""
    if size < 0:
        raise ValueError(f"vocabulary size must be >= 0, got {size}")
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_WORD_RE.findall(normalize_text(text)))
    frequent = [(w, n) for w, n in counts.items() if n >= min_count and len(w) > 1]
    frequent.sort(key=lambda wn: (-wn[1], wn[0]))  # ties by word: deterministic
    return [w for w, _ in frequent[:size]]


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


# BERT's basic split: runs of letters/digits, every punctuation character on its own
_WORD_RE = re.compile(r"[^\W_]+|[^\w\s]|_")


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    vision_init: float
    text_init: float
    embed_dim: int


PRESETS = {
    # see module docstring: default init embeds all random inputs alike, so tests widen it
    "tiny": Preset(hidden=32, layers=2, heads=4, vision_init=0.3, text_init=0.5, embed_dim=32),
    "small": Preset(hidden=128, layers=4, heads=4, vision_init=0.02, text_init=0.02, embed_dim=128),
}


def tiny_config(vocab_size: int, image_size: int = 64, preset: str = "tiny"):
    from transformers import BlipConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    return BlipConfig(
        vision_config={
            "hidden_size": p.hidden,
            "intermediate_size": 2 * p.hidden,
            "num_hidden_layers": p.layers,
            "num_attention_heads": p.heads,
            "image_size": image_size,
            "patch_size": 8,  # 64 px / 8 = 8x8 patches + CLS = 65 image tokens
            "initializer_range": p.vision_init,
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": p.hidden,
            "intermediate_size": 2 * p.hidden,
            "num_hidden_layers": p.layers,
            "num_attention_heads": p.heads,
            "max_position_embeddings": 64,
            "encoder_hidden_size": p.hidden,
            "initializer_range": p.text_init,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "bos_token_id": 5,
        },
        image_text_hidden_size=p.embed_dim,
    )


# The published architectures, random weights: blip-itm-base-coco / blip-itm-large-coco shapes.
PUBLISHED = ("blip-base", "blip-large")
ARCHITECTURES = (*PRESETS, *PUBLISHED)
_PATCH = {"tiny": 8, "small": 8, "blip-base": 16, "blip-large": 16}
_DEFAULT_SIZE = {"tiny": 64, "small": 64, "blip-base": 384, "blip-large": 384}


def published_config(name: str, image_size: int = 384):
    """The BlipConfig of a published architecture (``blip-base`` or ``blip-large``)."""
    from transformers import BlipConfig

    if name == "blip-base":  # BlipConfig() defaults = blip-itm-base-coco: ViT-B/16, 768 hidden, 256-d
        return BlipConfig(vision_config={"image_size": image_size})
    if name != "blip-large":
        raise ValueError(f"unknown published architecture {name!r}; expected one of {PUBLISHED}")
    # blip-itm-large-coco: ViT-L/16 vision tower, BERT-base text encoder cross-attending to 1024-d tokens
    return BlipConfig(
        vision_config={
            "image_size": image_size,
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
        },
        text_config={"encoder_hidden_size": 1024},
    )


def check_image_size(name: str, image_size: int) -> None:
    """A ViT's input side must be a whole number of patches."""
    patch = _PATCH[name]
    if image_size <= 0 or image_size % patch:
        raise ValueError(
            f"image size must be a positive multiple of {name}'s patch size {patch}, got {image_size}"
        )


def random_network(
    name: str = "tiny",
    *,
    seed: int = 0,
    image_size: int | None = None,
    extra_words: Iterable[str] = (),
    device: str | torch.device = "cpu",
):
    """(transformers ``BlipForImageTextRetrieval`` in eval mode, tokenizer, ImageSettings) of a
    seeded random BLIP, before :class:`~blip_ops.hf_blip.HFBlipModel` wraps it.

    ``name`` is a preset (``tiny``, ``small``: built on the CPU in fp32, so a seed gives the same
    weights and model id on every machine) or a published architecture (``blip-base``,
    ``blip-large``: built on ``device``, where the random init of 224M / 470M parameters is
    seconds on a CPU and instant on a GPU). ``image_size`` None takes the default (64 / 384 px).
    """
    from transformers import BlipForImageTextRetrieval

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {ARCHITECTURES}")
    size = _DEFAULT_SIZE[name] if image_size is None else image_size
    check_image_size(name, size)
    image_settings = ImageSettings(size=size, mean=CLIP_MEAN, std=CLIP_STD)
    if name in PRESETS:
        tokenizer = build_tokenizer(build_vocab(extra_words))
        torch.manual_seed(seed)
        net = BlipForImageTextRetrieval(tiny_config(len(tokenizer), size, name))
        return net.eval(), tokenizer, image_settings
    config = published_config(name, size)
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            net = BlipForImageTextRetrieval(config)
    except RuntimeError as err:  # pragma: no cover - depends on the device
        logger.warning("building %s on %s failed (%s); building on CPU", name, device, err)
        net = BlipForImageTextRetrieval(config)
    return net.eval(), build_tokenizer(build_vocab(extra_words)), image_settings


def make_random_model(
    name: str = "tiny",
    *,
    seed: int = 0,
    image_size: int | None = None,
    extra_words: Iterable[str] = (),
    device: str = "cpu",
    dtype: str = "float32",
    attention: str = "sdpa",
):
    """A seeded random :class:`~blip_ops.hf_blip.HFBlipModel` of ``name`` (see
    :func:`random_network`), moved to ``device``/``dtype`` with ``attention``."""
    from blip_ops.hf_blip import HFBlipModel

    net, tokenizer, image_settings = random_network(
        name, seed=seed, image_size=image_size, extra_words=extra_words, device=device
    )
    return HFBlipModel(
        net, tokenizer, image_settings, TextSettings(), device=device, dtype=dtype, attention=attention
    )


def make_tiny_model(
    seed: int = 0, image_size: int = 64, preset: str = "tiny", extra_words: Iterable[str] = ()
):
    """Build (but do not save) a seeded random :class:`~blip_ops.hf_blip.HFBlipModel` on CPU."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return make_random_model(preset, seed=seed, image_size=image_size, extra_words=extra_words)


def write_tiny_model(
    out: str | Path, seed: int = 0, preset: str = "tiny", extra_words: Iterable[str] = ()
) -> Path:
    started = time.perf_counter()
    extra_words = list(extra_words)
    model = make_tiny_model(seed, preset=preset, extra_words=extra_words)
    path = model.save(out)
    info = {
        "seed": seed,
        "preset": preset,
        "vocab_size": len(model.tokenizer),
        "corpus_words": len(extra_words),
        "parameters": sum(p.numel() for p in model.model.parameters()),
        "model_id": model.model_id,
    }
    (path / "tiny_model.json").write_text(json.dumps(info, indent=2))
    logger.info(
        "tiny model %s written to %s in %.1fs", model.model_id, path, time.perf_counter() - started
    )
    return path


# ---- synthetic inputs ----------------------------------------------------------------------------
ITM_QUERY = "modern light luxury sofa grey linen"  # a typical short shopper query

_STYLE = ("simple", "modern", "light", "luxury", "nordic", "vintage", "premium", "new", "hot sale",
          "official", "genuine", "original", "minimalist")  # fmt: skip
_PINYIN = ("er tong", "hua xing che", "jian yue", "xian dai", "qing she", "fang ce fan", "niu niu che",
           "nan", "nv", "bao", "yi fu", "zhen si", "mian ma", "pi xie", "shu bao")  # fmt: skip
_NOUN = ("sofa", "chair", "table lamp", "backpack", "stroller", "scooter", "dress", "shirt", "jacket",
         "watch", "phone case", "kettle", "mug", "sneakers", "pillow", "blanket", "handbag", "desk")  # fmt: skip
_COLOUR = ("grey", "red", "navy blue", "black", "white", "beige", "pink", "green", "brown", "gold")
_MATERIAL = ("linen", "cotton", "leather", "wool", "silk", "steel", "wooden", "ceramic", "velvet")
_EXTRA = ("for kids", "for women", "for men", "3 pcs set", "xl", "free shipping", "home office",
          "1-3 sui", "summer", "winter", "")  # fmt: skip


def synthetic_titles(n: int, seed: int = 0) -> list[str]:
    """``n`` catalog-like titles in English and pinyin, e.g. 'simple modern light luxury sofa te04
    grey linen'. ASCII only, so normalisation never needs pypinyin."""
    rng = random.Random(seed)
    titles = []
    for _ in range(n):
        code = "".join(rng.choice("abcdefghkmnprstwxz") for _ in range(2)) + f"{rng.randrange(100):02d}"
        words = [
            *rng.sample(_STYLE, rng.randint(1, 3)),
            *([rng.choice(_PINYIN)] if rng.random() < 0.6 else []),
            rng.choice(_NOUN),
            code,
            rng.choice(_COLOUR),
            rng.choice(_MATERIAL),
            rng.choice(_EXTRA),
        ]
        titles.append(" ".join(w for w in words if w))
    return titles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip_ops.tiny_model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--seed", type=int, default=0, help="weights seed (same seed, same model_id)"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size and init")
    parser.add_argument(
        "--vocab-corpus", help="text file (one title per line) or Parquet (title* columns)"
    )
    parser.add_argument("--vocab-size", type=int, default=4000, help="most frequent corpus words")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    words: list[str] = []
    if args.vocab_corpus:
        try:
            words = corpus_words(read_corpus(args.vocab_corpus), args.vocab_size)
        except (OSError, ValueError) as err:
            print(f"error: --vocab-corpus {args.vocab_corpus}: {err}", file=sys.stderr)
            return 2
    path = write_tiny_model(args.out, args.seed, args.preset, words)
    info = json.loads((path / "tiny_model.json").read_text())
    print(
        f"{args.preset} BLIP checkpoint: {path}\nmodel_id: {info['model_id']}\n"
        f"vocabulary: {info['vocab_size']} tokens ({len(words)} from the corpus); "
        f"parameters: {info['parameters']:,}\ntook: {time.perf_counter() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
