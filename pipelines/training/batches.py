"""A training batch: products' images with all their titles, plus attribute-swapped negatives."""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.training.splits import check_train_only


class SwapNegatives:
    """Attribute-swapped own titles as extra ITM negatives (one per product per step, seeded).

    Uses the products' attribute columns; products without them, or whose titles name
    none of them, get none.
    """

    def __init__(self, pairs: dict[str, dict], seed: int):
        from pipelines.catalog.swap import SWAPPABLE

        self.pairs, self.seed = pairs, seed
        self.usable = any(any(a in e for a in SWAPPABLE) for e in pairs.values())

    def for_batch(self, product_ids: Sequence[str], step: int) -> tuple[list[str], list[int]]:
        """(swapped titles, index of the image each one is a negative of) for ``step``'s batch."""
        import random

        from pipelines.catalog.swap import swapped_titles

        rng = random.Random(f"{self.seed}:swap:{step}")
        texts, images = [], []
        for i, pid in enumerate(product_ids):
            entry = self.pairs.get(pid)
            if entry is None:
                continue
            options = swapped_titles(entry["titles"], entry, rng)
            if options:
                texts.append(options[rng.randrange(len(options))][2])
                images.append(i)
        return texts, images


def build_batch(
    model,
    rows: Sequence[dict],
    titles: dict[str, list[str]],
    pixels: dict | None = None,
    swaps: SwapNegatives | None = None,
    step: int = 0,
):
    """A RetrievalBatch: each row's image (decoded + preprocessed) and all its titles.

    ``pixels`` (optional) maps product id → a preprocessed (3, S, S) tensor (a decode cache).
    ``swaps`` (optional): a :class:`SwapNegatives`; each product gains one of its titles with an
    attribute word swapped, as an extra ITM negative of its own image.
    """
    from blip_ops.training import RetrievalBatch

    check_train_only(rows)
    ids = [str(r["product_id"]) for r in rows]
    pix = _pixels(model, rows, ids, pixels)
    texts, text_ids = [], []
    for pid in ids:
        own = titles.get(pid)
        if not own:
            raise ValueError(f"product {pid!r} has no titles (source.title_columns)")
        texts.extend(own)
        text_ids.extend([pid] * len(own))
    batch = RetrievalBatch(pix, ids, texts, text_ids)
    if swaps is not None:
        batch.swap_texts, batch.swap_images = swaps.for_batch(ids, step)
    return batch


def _pixels(model, rows: Sequence[dict], ids: list[str], cache: dict | None):
    """(B, 3, S, S) pixels of ``rows``: from the decode cache when it holds them all."""
    import torch

    from blip_ops.decode import decode_image

    if cache is not None and all(i in cache for i in ids):
        return torch.stack([cache[i] for i in ids])
    size = model.image_settings.size
    return model.preprocess([decode_image(bytes(r["image"]), target_size=size) for r in rows])
