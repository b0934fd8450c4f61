"""Text normalisation: one function used at indexing, training, evaluation and query time.

Marketplace titles arrive in English, Chinese characters or pinyin, with full-width punctuation,
odd spacing and mixed case. BLIP's text encoder has an English (BERT uncased) vocabulary, so for
such checkpoints Chinese characters are spelled in toneless pinyin, the way the seed paper's titles
("er tong hua xing che ...") are written. The rule is a property of the checkpoint
(:class:`TextSettings`), so the same model always sees text prepared the same way.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

# CJK Unified Ideographs (+ extension A and compatibility ideographs): what pypinyin can spell.
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_SPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class TextSettings:
    """How a checkpoint wants its text prepared (stored in the checkpoint, see ``family.py``)."""

    max_length: int = 35  # tokens; BLIP's own retrieval setting
    lowercase: bool = True  # BERT-uncased vocabularies
    to_pinyin: bool = True  # spell Chinese characters in pinyin (English-vocabulary checkpoints)
    max_chars: int = 512  # bound the work spent on garbage input before tokenising
    # The token that replaces the first one ([CLS]) of ITM inputs: "[ENC]" for checkpoints trained
    # the way the original BLIP code trains ITM; None keeps the tokenizer's [CLS], as transformers'
    # BlipForImageTextRetrieval does.
    itm_first_token: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TextSettings:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown text settings {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["itm_first_token"] is None:  # unset: checkpoints written before it keep their id
            del out["itm_first_token"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _pinyin(run: str) -> str:
    try:
        from pypinyin import lazy_pinyin  # imported here: the model core must load without it
    except ImportError as err:  # pragma: no cover - only on machines without pypinyin
        raise RuntimeError(
            f"text {run!r} contains Chinese characters and this checkpoint spells them in pinyin, "
            "but pypinyin is not installed (pip install pypinyin)"
        ) from err
    return " ".join(lazy_pinyin(run))


def normalize_text(text: str, settings: TextSettings = TextSettings()) -> str:
    """Normalise one title or query: NFKC (full-width → ASCII), Chinese → pinyin, case, whitespace.

    Truncation to ``settings.max_length`` tokens happens in the tokenizer; ``max_chars`` only bounds
    the input before that.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str title or query, got {type(text).__name__}: {text!r:.80}")
    text = unicodedata.normalize("NFKC", text)[: settings.max_chars]
    if settings.to_pinyin and _CJK_RE.search(text):
        # Pad each run with spaces so "简约Sofa" becomes "jian yue Sofa", not "jian yueSofa".
        text = _CJK_RE.sub(lambda m: f" {_pinyin(m.group(0))} ", text)
    if settings.lowercase:
        text = text.lower()
    return _SPACE_RE.sub(" ", text).strip()
