"""blip_ops: the BLIP model library of blip-catalog-search (no Ray).

The core (loading, preprocessing, encoders, ITM, re-ranking, losses, train step) imports
only torch, transformers, PIL and numpy, so it runs on a GPU machine that has nothing else.
"""

from blip_ops.decode import ImageDecodeError, decode_batch, decode_image
from blip_ops.family import ImageEncoding, ImageSettings, RetrievalModel
from blip_ops.loading import load_model
from blip_ops.losses import (
    gather_features,
    itc_loss,
    itm_loss,
    make_temperature,
    sample_hard_negatives,
)
from blip_ops.rerank import RerankResult, combine_scores, rerank
from blip_ops.text import TextSettings, normalize_text
from blip_ops.training import RetrievalBatch, retrieval_train_step

__all__ = [
    "ImageDecodeError",
    "ImageEncoding",
    "ImageSettings",
    "RerankResult",
    "RetrievalBatch",
    "RetrievalModel",
    "TextSettings",
    "combine_scores",
    "decode_batch",
    "decode_image",
    "gather_features",
    "itc_loss",
    "itm_loss",
    "load_model",
    "make_temperature",
    "normalize_text",
    "rerank",
    "retrieval_train_step",
    "sample_hard_negatives",
]
