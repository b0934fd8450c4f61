"""One bounded LRU of ITM image tokens, for the search service and for offline evaluation.

ITM re-scores a candidate against its image *tokens* (the vision tower's (N, H) output), which cost
a vision pass to compute. Both the search service (keyed by ``product_id:content_hash``, bounded by
a number of items) and evaluation (keyed by image index, bounded by bytes) keep the tokens they
computed here and compute only the misses, in one pass or in batches (:meth:`TokenCache.fetch`).

The index job can also store each product's tokens with its row (:func:`pack_tokens`, float16),
so the service reads them instead of running the vision tower (:class:`StoredTokens`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

STORED_DTYPE = np.dtype("<f2")  # little-endian float16: half the bytes of float32, ~3 digits


def stored_nbytes(shape: Sequence[int]) -> int:
    """Bytes one image's (N, H) tokens take stored as :data:`STORED_DTYPE`."""
    return int(np.prod(shape)) * STORED_DTYPE.itemsize


def token_shape(model) -> tuple[int, int]:
    """(N, H) of the image tokens ``model`` gives its ITM head: one vision pass over a blank
    image of its input size (every family and checkpoint alike, no config reading)."""
    from PIL import Image

    size = model.image_settings.size
    blank = Image.new("RGB", (size, size))
    tokens = model.encode_images(model.preprocess([blank]), return_tokens=True).tokens
    return int(tokens.shape[1]), int(tokens.shape[2])


def pack_tokens(tokens: torch.Tensor) -> list[bytes | None]:
    """(B, N, H) tokens -> one :data:`STORED_DTYPE` byte string per image, C order; None for an
    image whose tokens do not fit float16 (a value past +-65504 would be stored as inf)."""
    if tokens.ndim != 3:
        raise ValueError(f"expected (B, N, H) image tokens, got shape {tuple(tokens.shape)}")
    half = tokens.detach().to(device="cpu", dtype=torch.float16).numpy()
    finite = np.isfinite(half).all(axis=(1, 2))
    return [
        h.astype(STORED_DTYPE, copy=False).tobytes() if ok else None
        for h, ok in zip(half, finite, strict=True)
    ]


@dataclass(frozen=True)
class StoredTokens:
    """One image's tokens as the index stored them: :data:`STORED_DTYPE` bytes of shape (N, H)."""

    data: bytes
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"stored tokens need a (N, H) shape, got {self.shape!r}")
        if len(self.data) != stored_nbytes(self.shape):
            raise ValueError(
                f"stored tokens of shape {self.shape} take {stored_nbytes(self.shape)} bytes, "
                f"got {len(self.data)}"
            )

    def tensor(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, H) tokens as ``dtype`` on ``device`` (what the ITM head reads)."""
        half = np.frombuffer(self.data, dtype=STORED_DTYPE).reshape(self.shape)
        return torch.from_numpy(half.copy()).to(device=device, dtype=dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TokenCache:
    """Image tokens by key, least recently used dropped first beyond ``max_items`` entries or
    ``max_bytes`` bytes (either bound may be None: no bound; ``max_items`` <= 0 keeps nothing).

    Thread-safe: a model replica's batches and its load calls run on different threads.
    ``hits`` and ``misses`` count :meth:`get` lookups.
    """

    def __init__(self, max_items: int | None = None, *, max_bytes: int | None = None):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def has_room(self) -> bool:
        """Whether another entry could be kept without dropping one (bytes bound only)."""
        return self.max_bytes is None or self._bytes < self.max_bytes

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = _nbytes(value)
        if (self.max_items is not None and self.max_items <= 0) or (
            self.max_bytes is not None and size > self.max_bytes
        ):
            return  # could never be kept: do not empty the cache for it
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._items[key] = value
            self._bytes += size
            while self._over():
                _, dropped = self._items.popitem(last=False)
                self._bytes -= _nbytes(dropped)

    def _over(self) -> bool:
        return (self.max_items is not None and len(self._items) > self.max_items) or (
            self.max_bytes is not None and self._bytes > self.max_bytes
        )

    def fetch(
        self,
        keys: Sequence[Hashable],
        compute: Callable[[list], torch.Tensor],
        *,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """(k, N, H) tokens of ``keys`` in that order: cached ones, and for the rest
        ``compute(missing keys)`` -> (m, N, H), run once per missing key (``batch_size`` keys per
        call; None: all in one call), whose tokens are then kept. An empty ``keys`` gives an empty
        tensor."""
        found: dict[Hashable, torch.Tensor] = {}
        missing = []
        for key in dict.fromkeys(keys):
            tokens = self.get(key)
            if tokens is None:
                missing.append(key)
            else:
                found[key] = tokens
        step = batch_size or max(len(missing), 1)
        for start in range(0, len(missing), step):
            part = missing[start : start + step]
            tokens = compute(part)  # (b, N, H)
            if len(tokens) != len(part):
                raise ValueError(f"compute gave {len(tokens)} token sets for {len(part)} keys")
            for key, t in zip(part, tokens, strict=True):
                found[key] = t
                self.put(key, t)
        if not found:
            return torch.empty(0)
        return torch.stack([found[key] for key in keys])
