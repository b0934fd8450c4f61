"""The inputs of one evaluation: a pool of images, the texts that query it, and which is whose."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


class EvalInputError(ValueError):
    """The evaluation inputs are missing or malformed; the message says which and why."""


class LazyImages(Sequence):
    """Images decoded on access (``loaders[i]()`` gives the bytes), so only tokens stay in memory."""

    def __init__(
        self,
        ids: list[str],
        loaders: list[Callable[[], bytes]],
        *,
        target_size: int | None,
        max_bytes: int | None = None,
    ):
        self.ids = ids
        self.loaders = loaders
        self.target_size = target_size  # JPEG draft decoding towards this size; None = full size
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.loaders)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from blip_ops.decode import ImageDecodeError, decode_image

        try:
            data = self.loaders[i]()
            return decode_image(data, target_size=self.target_size, max_bytes=self.max_bytes)
        except (OSError, ImageDecodeError) as err:
            reason = getattr(err, "reason", type(err).__name__)
            raise EvalInputError(
                f"image of {self.ids[i]!r} cannot be used ({reason}): {err}"
            ) from err


@dataclass
class EvalData:
    product_ids: list[str]  # (P,) image / product ids
    images: LazyImages  # (P,)
    texts: list[str]  # (T,)
    text_product: np.ndarray  # (T,) index into product_ids
    languages: list[str] | None  # (T,) language of each text, when known
    inputs: dict = field(default_factory=dict)  # what was read, for the JSON
