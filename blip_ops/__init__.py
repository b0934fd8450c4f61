"""blip_ops: the BLIP model library of blip-catalog-search (no Ray).

The core (loading, preprocessing, encoders, ITM, re-ranking, bench) imports only torch,
transformers, PIL and numpy, so it runs on a GPU machine that has nothing else.
"""

from blip_ops.decode import ImageDecodeError, decode_batch, decode_image
from blip_ops.family import ImageEncoding, ImageSettings, RetrievalModel, load_model
from blip_ops.rerank import RerankResult, combine_scores, rerank
from blip_ops.text import TextSettings, normalize_text

__all__ = [
    "ImageDecodeError",
    "ImageEncoding",
    "ImageSettings",
    "RerankResult",
    "RetrievalModel",
    "TextSettings",
    "combine_scores",
    "decode_batch",
    "decode_image",
    "load_model",
    "normalize_text",
    "rerank",
]
