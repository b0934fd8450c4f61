"""Fine-tune BLIP on the catalog's train split: ITC + ITM with hard negatives, then evaluate.

    python -m pipelines.finetune --config configs/finetune_demo.yaml [key=value ...] [--model PATH]

Reads ``finetune.catalog`` (what ``pipelines.make_catalog`` writes): the products of split
``train`` only (any other product in a batch is an error), each product's image with its titles
from ``pairs.parquet`` (English, 汉字, pinyin: positives of one image, de-duplicated after the
model's own text normalisation). Every ``finetune.eval_every`` steps the model is evaluated on the
``val`` split (``blip_ops.evaluate``, ITC→ITM at ``finetune.eval_k_test``); the best mean recall is
kept in ``out_dir/best``, the latest state in ``out_dir/last`` (a later run resumes from it). The
``test`` split is never opened here: only the final evaluation reads it.

Batches (``finetune.batching``): ``random`` train products, or ``family``: whole near-duplicate
families plus a ``random_share`` of single products, so in-batch hard negatives are
one-attribute twins. ``finetune.swap_negatives`` adds each product's own title with one attribute
word swapped as an extra ITM negative. Fresh parts and pretrained encoders may learn at their own
rates (``finetune.lr`` / ``lr_pretrained``; the temperature at ``lr_temp``).

``finetune.workers == 1``: this process. ``> 1``: Ray Train ``TorchTrainer`` (gloo on CPU, NCCL
with ``gpus_per_worker > 0``), the catalog read with Ray Data and split into one shard per worker;
``cpus_per_worker`` may be fractional (on 2 cores, 0.5 leaves Ray Data a CPU; a pool holding every CPU hangs).
The train step calls the model's submodules directly, so gradients are averaged by an explicit
all-reduce (``blip_ops.train_loop.sync_gradients``), not by a DDP wrapper.

``finetune.mined_negatives`` (the Parquet of ``pipelines.mine_negatives``, single process only):
each batch is ``batch_size - finetune.mined_per_batch`` anchors (every train product once per
epoch) plus, for each anchor in turn, one of its mined neighbours not already in the batch, then
random train products to fill; every mined pair inside the batch is upweighted in the ITM negative
sampling by ``finetune.mined_weight``. Mined ids that are not train products of the catalog are
refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.config import AppConfig, add_config_arguments, cli_config, dump_config

if TYPE_CHECKING:
    from blip_ops.train_loop import TrainSettings

logger = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
TITLE_COLUMNS = ("title_en", "title_zh", "title_pinyin")


class TrainSplitError(ValueError):
    """A product outside the train split reached a training batch."""


# --------------------------------------------------------------------------- data


ATTRIBUTE_COLUMNS = ("kind", "color", "pattern", "material", "brand")
_LANG_OF = {"title_en": "en", "title_zh": "zh", "title_pinyin": "pinyin"}


def read_pairs(catalog: str | Path) -> dict[str, dict]:
    """{product_id: {"titles": {lang: title}, "family_id", attributes...}} for the train split.

    Attributes (kind, colour, pattern, material, brand) come along when pairs.parquet has them;
    they drive the attribute-swapped negatives.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(Path(catalog) / "pairs.parquet")
    names = set(table.column_names)
    pairs: dict[str, dict] = {}
    for row in table.to_pylist():
        if row["split"] != TRAIN_SPLIT:
            continue
        entry = {"titles": {_LANG_OF[c]: row[c] for c in TITLE_COLUMNS if row.get(c)}}
        entry["family_id"] = row.get("family_id")
        entry.update({a: row[a] for a in ATTRIBUTE_COLUMNS if a in names and row.get(a)})
        pairs[row["product_id"]] = entry
    if not pairs:
        raise ValueError(f"{catalog}/pairs.parquet has no titles for split {TRAIN_SPLIT!r}")
    return pairs


_PUNCT_RE = re.compile(r"[^\w.&]+")


def title_key(title: str, normalize: Callable[[str], str] | None = None) -> str:
    """What two titles must share to be one positive: the model's text rule (``normalize``),
    then punctuation and spacing dropped (【热销】 and "re xiao" read the same to a pinyin model)."""
    text = normalize(title) if normalize is not None else title
    return " ".join(_PUNCT_RE.sub(" ", text).split())


def distinct_titles(
    pairs: dict[str, dict], normalize: Callable[[str], str] | None = None
) -> dict[str, list[str]]:
    """{product_id: its titles, de-duplicated by :func:`title_key`} (with the model's own text
    rule, a 汉字 title and its pinyin spelling are one text to a pinyin model: one positive)."""
    out = {}
    for pid, entry in pairs.items():
        seen: dict[str, str] = {}
        for title in entry["titles"].values():
            seen.setdefault(title_key(title, normalize), title)
        out[pid] = list(seen.values())
    return out


def read_titles(catalog: str | Path, normalize: Callable[[str], str] | None = None) -> dict[str, list[str]]:
    """{product_id: its distinct titles (English, 汉字, pinyin)} for the train split."""
    return distinct_titles(read_pairs(catalog), normalize)


def read_train_products(catalog: str | Path, cfg: AppConfig) -> list[dict]:
    """The train split's rows ``{product_id, image, split}``, sorted by product id."""
    import pyarrow.dataset as pads

    cols = cfg.source.columns
    products_dir = Path(catalog) / "products"
    if not products_dir.is_dir():
        raise ValueError(f"catalog {catalog} has no products/ folder")
    dataset = pads.dataset(products_dir, format="parquet")
    if "split" not in dataset.schema.names:
        raise ValueError(f"{products_dir}: no 'split' column, so no train/test separation")
    family = ["family_id"] if "family_id" in dataset.schema.names else []
    table = dataset.to_table(
        columns=[cols.product_id, cols.image, "split", *family],
        filter=pads.field("split") == TRAIN_SPLIT,
    )
    rows = [
        {
            "product_id": r[cols.product_id], "image": r[cols.image], "split": r["split"],
            "family_id": r.get("family_id") or r[cols.product_id],
        }
        for r in table.to_pylist()
    ]  # fmt: skip
    check_train_only(rows)
    if len(rows) < 2:
        raise ValueError(f"catalog {catalog}: {len(rows)} train products; need at least 2")
    return sorted(rows, key=lambda r: r["product_id"])


def check_train_only(rows: Sequence[dict]) -> None:
    bad = [r["product_id"] for r in rows if r.get("split") != TRAIN_SPLIT]
    if bad:
        raise TrainSplitError(
            f"{len(bad)} products outside split {TRAIN_SPLIT!r} in a training batch, e.g. {bad[:5]}"
        )


def build_batch(
    model, rows: Sequence[dict], titles: dict[str, list[str]], pixels=None, swaps=None, step=0
):
    """A RetrievalBatch: each row's image (decoded + preprocessed) and all its titles.

    ``pixels`` (optional) maps product id → a preprocessed (3, S, S) tensor (a decode cache).
    ``swaps`` (optional): a :class:`SwapNegatives`; each product gains one of its titles with an
    attribute word swapped, as an extra ITM negative of its own image.
    """
    import torch

    from blip_ops.decode import decode_image
    from blip_ops.training import RetrievalBatch

    check_train_only(rows)
    ids = [str(r["product_id"]) for r in rows]
    if pixels is not None and all(i in pixels for i in ids):
        pix = torch.stack([pixels[i] for i in ids])
    else:
        size = model.image_settings.size
        images = [decode_image(bytes(r["image"]), target_size=size) for r in rows]
        pix = model.preprocess(images)  # (B, 3, S, S)
    texts, text_ids = [], []
    for pid in ids:
        own = titles.get(pid)
        if not own:
            raise ValueError(f"product {pid!r} has no titles in pairs.parquet")
        texts.extend(own)
        text_ids.extend([pid] * len(own))
    batch = RetrievalBatch(pix, ids, texts, text_ids)
    if swaps is not None:
        batch.swap_texts, batch.swap_images = swaps.for_batch(ids, step)
    return batch


def catalog_splits(catalog: str | Path, cfg: AppConfig) -> dict[str, str]:
    """{product_id: split} of every product of the catalog (no images read)."""
    import pyarrow.dataset as pads

    pid = cfg.source.columns.product_id
    table = pads.dataset(Path(catalog) / "products", format="parquet").to_table(
        columns=[pid, "split"]
    )
    return {
        str(p): str(s)
        for p, s in zip(
            table.column(pid).to_pylist(), table.column("split").to_pylist(), strict=True
        )
    }


def load_mined_neighbours(cfg: AppConfig, rows: Sequence[dict], model_id: str) -> dict:
    """The mined neighbours of ``finetune.mined_negatives`` restricted to the train ``rows``:
    ``{"neighbours": {product_id: [neighbour ids]}, ...stats}``.

    Refuses (TrainSplitError) a file mined from another split or naming any product that the
    catalog has outside the train split; ids the catalog lacks (indexed but since removed) are
    dropped with a warning; a model_id other than ``model_id`` is warned about.
    """
    from pipelines.mine_negatives import TRAIN_SPLIT as MINED_SPLIT
    from pipelines.mine_negatives import read_negatives
    from pipelines.storage import S3Settings

    path = cfg.finetune.mined_negatives
    mined = read_negatives(path, S3Settings.from_config(cfg.s3))
    if mined.metadata.get("split", MINED_SPLIT) != TRAIN_SPLIT:
        raise TrainSplitError(
            f"mined negatives {path} come from split {mined.metadata['split']!r}, not "
            f"{TRAIN_SPLIT!r}"
        )
    if mined.model_id != model_id:
        logger.warning(
            "mined negatives %s were mined in the embedding space of model %s, but fine-tuning "
            "starts from %s: the neighbours are another model's (still usable as negatives; "
            "index with this model and mine again for its own hard negatives)",
            path, mined.model_id, model_id,
        )  # fmt: skip
    train = {str(r["product_id"]) for r in rows}
    splits = catalog_splits(cfg.finetune.catalog, cfg)
    named = set(mined.neighbours) | {n for ns in mined.neighbours.values() for n in ns}
    outside = sorted(i for i in named if i not in train and i in splits)
    if outside:
        raise TrainSplitError(
            f"mined negatives {path} name {len(outside)} products outside split {TRAIN_SPLIT!r} "
            f"of catalog {cfg.finetune.catalog}, e.g. {outside[:5]} (split "
            f"{splits[outside[0]]!r}); mine again from an index of this catalog"
        )
    unknown = sorted(named - set(splits))
    if unknown:
        logger.warning(
            "mined negatives %s name %d products the catalog lacks (e.g. %s): dropped",
            path, len(unknown), unknown[:5],
        )  # fmt: skip
    neighbours = {
        a: [n for n in ns if n in train and n != a]
        for a, ns in mined.neighbours.items()
        if a in train
    }
    neighbours = {a: ns for a, ns in neighbours.items() if ns}
    if not neighbours:
        raise ValueError(
            f"mined negatives {path} hold no pair of train products of catalog "
            f"{cfg.finetune.catalog}"
        )
    if len(neighbours) < len(train):
        logger.warning(
            "%d of %d train products have no mined neighbours in %s (not indexed when it was "
            "mined?): they are anchors without mined negatives",
            len(train) - len(neighbours), len(train), path,
        )  # fmt: skip
    return {
        "neighbours": neighbours,
        "path": path,
        "model_id": mined.model_id,
        "table_version": mined.metadata.get("table_version"),
        "anchors_with_neighbours": len(neighbours),
        "dropped_unknown": len(unknown),
    }


class EpochSampler:
    """Batches of ``batch_size`` products, a fresh seeded permutation per epoch (drop last).

    ``batch(step)`` depends on the step only, so a resumed run sees what an uninterrupted one would.
    """

    def __init__(self, rows: list[dict], batch_size: int, seed: int):
        if batch_size > len(rows):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(rows)} train products")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.per_epoch = len(rows) // batch_size

    def indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return order[k * self.batch_size : (k + 1) * self.batch_size]

    def rows_for(self, step: int) -> list[dict]:
        return [self.rows[i] for i in self.indices(step)]


class FamilySampler:
    """Batches built from whole near-duplicate families (P x K), with a share of random products.

    Each epoch (a fresh seeded permutation) every train product is visited exactly once: a
    ``1 - random_share`` share of the products, whole families at a time, are packed into each
    batch's family slots (a family never split when it fits); the other products, drawn at random
    as singles, fill the rest, so ITM sees one-attribute twins and easy negatives in every batch.
    ``rows_for(step)`` depends on the step only (resume-exact); the last batch of an epoch may be
    shorter.
    """

    def __init__(self, rows: list[dict], batch_size: int, random_share: float, seed: int):
        if batch_size > len(rows):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(rows)} train products")
        if not 0.0 <= random_share <= 1.0:
            raise ValueError(f"random_share must be in [0, 1], got {random_share}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.random_share = random_share
        families: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            families.setdefault(str(r.get("family_id") or r["product_id"]), []).append(i)
        self.families = [families[k] for k in sorted(families)]
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches (row indices) of ``epoch``."""
        if epoch not in self._epochs:
            self._epochs = {epoch: self._plan(epoch)}  # one epoch cached: steps run in order
        return self._epochs[epoch]

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        grouped, singles, target = [], [], (1.0 - self.random_share) * len(self.rows)
        for f in rng.permutation(len(self.families)).tolist():
            family = [int(i) for i in rng.permutation(self.families[f])]
            if sum(len(g) for g in grouped) < target:
                grouped.append(family)
            else:
                singles.extend(family)
        singles = [singles[i] for i in rng.permutation(len(singles))]
        family_slots = max(1, round((1.0 - self.random_share) * self.batch_size))
        batches: list[list[int]] = []
        while grouped or singles:
            batch: list[int] = []
            while grouped and len(batch) + len(grouped[0]) <= family_slots:
                batch.extend(grouped.pop(0))
            while singles and len(batch) < self.batch_size:
                batch.append(singles.pop())
            while grouped and len(batch) < self.batch_size:  # singles ran out: split a family
                room = self.batch_size - len(batch)
                batch.extend(grouped[0][:room])
                grouped[0] = grouped[0][room:]
                if not grouped[0]:
                    grouped.pop(0)
            batches.append(batch)
        if len(batches) > 1 and len(batches[-1]) < 2:  # a batch of one has no negative
            batches[-2].extend(batches.pop())
        return batches

    def indices(self, step: int) -> list[int]:
        epoch = 0
        while step >= len(self.epoch(epoch)):
            step -= len(self.epoch(epoch))
            epoch += 1
        return self.epoch(epoch)[step]

    def rows_for(self, step: int) -> list[dict]:
        return [self.rows[i] for i in self.indices(step)]


class SwapNegatives:
    """Attribute-swapped own titles as extra ITM negatives (one per product per step, seeded).

    Uses the products' attributes from pairs.parquet; products without them, or whose titles name
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


class MinedSampler:
    """Batches of ``batch_size`` products built around anchors and their mined neighbours.

    Each epoch is a fresh seeded permutation of the train products cut into runs of
    ``batch_size - mined_slots`` anchors (the last run may be shorter: every product is an anchor
    exactly once per epoch). Each anchor in turn whose neighbours are all outside the batch brings
    one of them (seeded choice) while mined slots remain; the slots left over are filled with
    random other train products. ``batch(step)`` depends on the step only (resume-exact).
    """

    def __init__(
        self,
        rows: list[dict],
        neighbours: dict[str, list[str]],
        batch_size: int,
        mined_slots: int,
        seed: int,
    ):
        if batch_size > len(rows):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(rows)} train products")
        if not 1 <= mined_slots <= batch_size // 2:
            raise ValueError(
                f"mined_slots must be in [1, batch_size // 2 = {batch_size // 2}], "
                f"got {mined_slots}"
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.anchors = batch_size - mined_slots
        index = {str(r["product_id"]): i for i, r in enumerate(rows)}
        self.neighbours = [
            [index[n] for n in neighbours.get(str(r["product_id"]), ()) if n in index] for r in rows
        ]  # row -> its neighbours' rows, nearest first
        self.per_epoch = -(-len(rows) // self.anchors)

    def plan(self, step: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Row indices of the batch of ``step`` (anchors first) and its mined pairs as
        (anchor position, neighbour position) in that list."""
        epoch, k = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        chosen = order[k * self.anchors : (k + 1) * self.anchors].tolist()
        inside = set(chosen)
        rng = np.random.default_rng([self.seed, epoch, k])
        for a in list(chosen):
            if len(chosen) >= self.batch_size:
                break
            cands = self.neighbours[a]
            if not cands or any(c in inside for c in cands):
                continue  # none mined, or one already in the batch
            pick = cands[int(rng.integers(len(cands)))]
            chosen.append(pick)
            inside.add(pick)
        if len(chosen) < self.batch_size:
            for i in rng.permutation(len(self.rows)).tolist():
                if i not in inside:
                    chosen.append(i)
                    inside.add(i)
                    if len(chosen) == self.batch_size:
                        break
        position = {r: p for p, r in enumerate(chosen)}
        pairs = [
            (p, position[n])
            for p, r in enumerate(chosen)
            for n in self.neighbours[r]
            if n in position
        ]
        return chosen, pairs

    def rows_for(self, step: int) -> list[dict]:
        return [self.rows[i] for i in self.plan(step)[0]]


def decode_cache(model, rows: Sequence[dict], cache_dir: str | Path | None = None) -> dict:
    """product id → what the train step takes for each row's image, computed once: the
    preprocessed pixels, or for a model with a frozen image backbone (the compact family) its
    feature maps (``model.vision_inputs``), so no step runs the frozen part again. The demo
    catalog fits in memory (compact: 250 KB per product).

    ``cache_dir``: keep them on disk too, keyed by the model and the exact image bytes, so runs
    that fine-tune the same base model on the same catalog (a settings comparison) decode and
    run the frozen CNN once between them.
    """
    import torch

    file = _feature_cache_file(model, rows, cache_dir) if cache_dir is not None else None
    if file is not None and file.is_file():
        logger.info("image features from %s", file)
        return torch.load(file, weights_only=True)
    out = _compute_vision_inputs(model, rows)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.rename(file)
    return out


def _feature_cache_file(model, rows: Sequence[dict], cache_dir: str | Path) -> Path:
    import hashlib

    digest = hashlib.blake2b(digest_size=12)
    for r in rows:
        digest.update(str(r["product_id"]).encode() + b"\0")
        digest.update(hashlib.blake2b(bytes(r["image"]), digest_size=16).digest())
    return Path(cache_dir) / f"{model.model_id}-{digest.hexdigest()}.pt"


def _compute_vision_inputs(model, rows: Sequence[dict]) -> dict:
    from blip_ops.decode import decode_image

    size = model.image_settings.size
    out = {}
    for start in range(0, len(rows), 64):
        part = rows[start : start + 64]
        pix = model.preprocess([decode_image(bytes(r["image"]), target_size=size) for r in part])
        pix = model.vision_inputs(pix)
        out.update({str(r["product_id"]): p for r, p in zip(part, pix, strict=True)})
    return out


# --------------------------------------------------------------------------- evaluation


def require_split(cfg: AppConfig, split: str) -> None:
    """Fail before training when the catalog has no ``split`` products to evaluate."""
    splits = catalog_splits(cfg.finetune.catalog, cfg)
    if split not in set(splits.values()):
        raise ValueError(
            f"catalog {cfg.finetune.catalog} has no {split!r} products (splits: "
            f"{sorted(set(splits.values()))}): checkpoints are chosen on the {split} split, so "
            "generate a larger catalog or give it a split column with that value"
        )


def make_eval_fn(cfg: AppConfig, catalog: str | Path, k_test: int) -> Callable:
    """eval_fn for ``fit``: the ``finetune.eval_split`` (val) products → metrics with ``mean``.

    It picks the best checkpoint, so it never reads the test split (the config allows only val).
    The re-rank uses the service's rule and ``serve.itm_weight``.
    """
    from blip_ops.evaluate import evaluate_model
    from pipelines.evaluate import load_catalog

    f = cfg.finetune
    if f.eval_split == "test":  # the config refuses it; a guard for callers building configs
        raise TrainSplitError("fitting may not evaluate the test split")
    data = None

    def eval_fn(model) -> dict:
        nonlocal data
        if data is None:
            data = load_catalog(
                str(catalog), f.eval_split, cfg, target_size=model.image_settings.size,
                texts=f.eval_texts,
            )  # fmt: skip
        k = min(k_test, len(data.product_ids), len(data.texts))
        metrics = evaluate_model(
            model, data.images, data.texts, data.text_product, languages=data.languages,
            k_test=(k,), batch_size=cfg.encode.batch_size, itm_weight=cfg.serve.itm_weight,
        )  # fmt: skip
        itm = metrics["itm"][str(k)]
        return {
            "mean": itm["mean"], "itc_mean": metrics["itc"]["mean"], "k_test": k,
            "split": f.eval_split,
        }  # fmt: skip

    return eval_fn


# --------------------------------------------------------------------------- runners


def train_settings(cfg: AppConfig) -> TrainSettings:
    """The training-loop settings of ``finetune.*``."""
    from blip_ops.train_loop import TrainSettings

    f = cfg.finetune
    return TrainSettings(
        steps=f.steps, lr=f.lr, lr_pretrained=f.lr_pretrained, lr_temp=f.lr_temp,
        weight_decay=f.weight_decay, warmup_steps=f.warmup_steps, grad_clip=f.grad_clip,
        negatives=f.negatives, seed=f.seed, eval_every=f.eval_every, out_dir=f.out_dir,
        resume=f.resume, mixed_precision=f.mixed_precision, log_every=f.log_every,
        momentum=f.momentum, momentum_m=f.momentum_m, queue_size=f.queue_size, alpha=f.alpha,
        mined_weight=f.mined_weight, itm_titles=f.itm_titles, itm_balanced=f.itm_balanced,
        easy_steps=f.easy_steps, freeze_word_embeddings=f.freeze_word_embeddings,
    )  # fmt: skip


def load_for_training(cfg: AppConfig, device: str):
    from blip_ops import load_model
    from pipelines.runtime.inputs import ensure_model

    # float32 weights: mixed precision is autocast, never bf16 master weights.
    return load_model(
        ensure_model(cfg.model.name_or_path), device=device, dtype="float32", attention=cfg.model.attention
    )


def batch_sampler(cfg: AppConfig, rows: list[dict], model_id: str):
    """(sampler, mined summary or None) for ``finetune.batching`` / ``mined_negatives``."""
    f = cfg.finetune
    if f.mined_negatives is not None:
        mined = load_mined_neighbours(cfg, rows, model_id)
        neighbours = mined.pop("neighbours")
        return MinedSampler(rows, neighbours, f.batch_size, f.mined_slots, f.seed), mined
    if f.batching == "family":
        return FamilySampler(rows, f.batch_size, f.random_share, f.seed), None
    return EpochSampler(rows, f.batch_size, f.seed), None


def run_single(
    cfg: AppConfig,
    *,
    evaluate: bool = True,
    settings: TrainSettings | None = None,
    stop_at: int | None = None,
) -> dict:
    """Fine-tune in this process; ``settings`` (default: from ``cfg``) and ``stop_at`` as
    :func:`blip_ops.train_loop.fit` takes them."""
    from blip_ops.train_loop import fit

    f = cfg.finetune
    rows = read_train_products(f.catalog, cfg)
    model = load_for_training(cfg, cfg.model.device)
    pairs = read_pairs(f.catalog)
    titles = distinct_titles(pairs, model.normalize_text)
    initial_id = model.model_id
    pixels = decode_cache(model, rows, f.feature_cache)
    sampler, mined = batch_sampler(cfg, rows, initial_id)
    swaps = SwapNegatives(pairs, f.seed) if f.swap_negatives else None
    if swaps is not None and not swaps.usable:
        logger.warning("finetune.swap_negatives: pairs.parquet has no attribute columns: off")
        swaps = None

    def next_batch(step: int):
        if isinstance(sampler, MinedSampler):
            chosen, pairs_in_batch = sampler.plan(step)
            batch = build_batch(model, [rows[i] for i in chosen], titles, pixels, swaps, step)
            batch.mined_pairs = pairs_in_batch
            return batch
        return build_batch(model, sampler.rows_for(step), titles, pixels, swaps, step)

    eval_fn = make_eval_fn(cfg, f.catalog, f.eval_k_test) if evaluate else None
    if evaluate:
        require_split(cfg, f.eval_split)
    summary = fit(
        model, next_batch, settings or train_settings(cfg), eval_fn=eval_fn,
        config_yaml=dump_config(cfg), stop_at=stop_at,
    )  # fmt: skip
    summary.update(
        initial_model_id=initial_id, workers=1, train_products=len(rows), mined=mined,
        batching=f.batching, swap_negatives=swaps is not None,
    )  # fmt: skip
    return summary


def _train_worker(config: dict) -> None:
    """Ray Train's per-worker loop: this worker's shard of the train split, one rank of ``fit``."""
    import ray.train
    import torch

    from blip_ops.train_loop import fit
    from pipelines.config import AppConfig

    cfg = AppConfig.model_validate(config["cfg"])
    f = cfg.finetune
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if f.gpus_per_worker > 0:
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    else:
        device = "cpu"
        torch.set_num_threads(max(1, int(f.cpus_per_worker)))
    model = load_for_training(cfg, device)
    titles = config["titles"]
    per_worker = f.batch_size // world
    shard = ray.train.get_dataset_shard("train")
    seen: list[list[str]] = []

    def batches() -> Iterator[list[dict]]:
        epoch = 0
        while True:
            got = 0
            shuffle = {} if config.get("no_shuffle") else {
                "local_shuffle_buffer_size": per_worker * 4,
                "local_shuffle_seed": f.seed * 1000 + epoch * world + rank,
            }  # fmt: skip
            for b in shard.iter_batches(
                batch_size=per_worker, batch_format="numpy", drop_last=True, **shuffle
            ):
                got += 1
                yield [
                    {"product_id": str(p), "image": i, "split": str(s)}
                    for p, i, s in zip(b["product_id"], b["image"], b["split"], strict=True)
                ]
            if got == 0:
                raise ValueError(
                    f"rank {rank}: shard holds fewer than {per_worker} products (batch_size "
                    f"{f.batch_size} over {world} workers)"
                )
            epoch += 1

    stream = batches()
    consumed = 0

    def next_batch(step: int):
        # A resumed run starts at its checkpoint's step: skip the batches the first run trained
        # on (read, not decoded), so the data position continues instead of restarting epoch 0.
        nonlocal consumed
        while consumed < step:
            next(stream)
            consumed += 1
        rows = next(stream)
        consumed += 1
        if len(seen) < 4:
            seen.append([r["product_id"] for r in rows])
        return build_batch(model, rows, titles)

    eval_fn = (
        make_eval_fn(cfg, f.catalog, f.eval_k_test)
        if rank == 0 and config.get("evaluate", True)
        else None
    )
    from blip_ops.losses import first_candidate_negatives, sample_hard_negatives

    settings = train_settings(cfg).replace(**config.get("fit_overrides", {}))
    sampler = (
        first_candidate_negatives if config.get("first_candidate_negatives")
        else sample_hard_negatives
    )  # fmt: skip
    summary = fit(
        model, next_batch, settings, eval_fn=eval_fn, config_yaml=dump_config(cfg),
        log=print if rank == 0 else None, negative_sampler=sampler,
    )  # fmt: skip
    shards = Path(f.out_dir) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    (shards / f"rank-{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    summary.update(rank=rank, world=world)
    # Ray Train 2.60 (Train V2) attaches metrics to checkpoints only: the driver reads this file.
    (shards / f"summary-rank-{rank}.json").write_text(
        json.dumps(summary, default=str), encoding="utf-8"
    )
    ray.train.report({"steps": summary["steps"], "rank": rank})


def train_dataset(cfg: AppConfig, *, shuffle: bool = True):
    """The train split as a Ray Data dataset (``product_id``, ``image``, ``split``).

    With ``shuffle`` the block order is randomised again for every epoch (Ray Data reseeds from
    ``finetune.seed`` and the execution index), and each worker shuffles rows locally on top.
    """
    import ray
    from ray.data.expressions import col

    cols = cfg.source.columns
    products_dir = str(Path(cfg.finetune.catalog) / "products")
    ds = ray.data.read_parquet(products_dir).select_columns([cols.product_id, cols.image, "split"])
    if (cols.product_id, cols.image) != ("product_id", "image"):
        ds = ds.rename_columns({cols.product_id: "product_id", cols.image: "image"})
    ds = ds.filter(expr=col("split") == TRAIN_SPLIT)
    if shuffle:
        seed = ray.data.RandomSeedConfig(seed=cfg.finetune.seed, reseed_after_execution=True)
        ds = ds.randomize_block_order(seed=seed)
    return ds


def _normalizer(cfg: AppConfig) -> Callable[[str], str]:
    """The checkpoint's own text rule, read without loading its weights."""
    from blip_ops.family import read_catalog_config
    from blip_ops.text import TextSettings, normalize_text
    from pipelines.runtime.inputs import ensure_model

    path = Path(ensure_model(cfg.model.name_or_path))
    text = read_catalog_config(path).get("text") if path.is_dir() else None
    settings = TextSettings.from_dict(text)
    return lambda t: normalize_text(t, settings)


def run_ray(
    cfg: AppConfig,
    *,
    evaluate: bool = True,
    fit_overrides: dict | None = None,
    first_negatives: bool = False,
    shuffle: bool = True,
) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.runtime.cluster import init_ray

    f = cfg.finetune
    if f.mined_negatives is not None:
        raise ValueError(
            "finetune.mined_negatives works in a single process only (finetune.workers=1): Ray "
            "Train shards the data per worker, so a batch cannot be built around each anchor's "
            "mined neighbours"
        )
    if f.batching != "random" or f.swap_negatives:
        raise ValueError(
            "finetune.batching=family and finetune.swap_negatives work in a single process only "
            "(finetune.workers=1): Ray Train shards the data per worker, so a batch cannot be "
            "built from whole families"
        )
    if f.batch_size % f.workers or f.batch_size // f.workers < 2:
        raise ValueError(
            f"finetune.batch_size ({f.batch_size}) must split into >= 2 products per worker over "
            f"{f.workers} workers"
        )
    init_ray(cfg)
    use_gpu = f.gpus_per_worker > 0
    resources = {"CPU": f.cpus_per_worker, **({"GPU": f.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "titles": read_titles(f.catalog, _normalizer(cfg)),
            "evaluate": evaluate,
            "fit_overrides": fit_overrides or {},
            "first_candidate_negatives": first_negatives,
            "no_shuffle": not shuffle,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=f.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        datasets={"train": train_dataset(cfg, shuffle=shuffle)},
        run_config=RunConfig(
            name=f"finetune-{int(time.time())}",
            storage_path=str(Path(f.out_dir).absolute() / "ray_train"),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary_file = Path(f.out_dir) / "shards" / "summary-rank-0.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    summary["workers"] = f.workers
    return summary


def run_finetune(cfg: AppConfig) -> dict:
    if cfg.finetune.workers == 1:
        return run_single(cfg)
    return run_ray(cfg)


def print_summary(summary: dict, cfg: AppConfig) -> None:
    f = cfg.finetune
    rate = summary.get("samples_per_s")
    best = summary.get("best_mean_recall")
    print("\nfine-tuning summary")
    print(f"  model        {cfg.model.name_or_path}")
    print(f"  catalog      {f.catalog} (train split only; checkpoints chosen on {f.eval_split} {f.eval_texts})")
    print(f"  batching     {f.batching}" + (f" ({f.random_share:.0%} random)" if f.batching == "family" else "")
          + (", attribute-swapped title negatives" if summary.get("swap_negatives") else ""))
    acc = summary.get("itm_accuracy_recent") or {}
    if acc.get("pos") is not None:
        swap = f", swapped titles {acc['swap']:.2f}" if acc.get("swap") is not None else ""
        print(f"  ITM accuracy positives {acc['pos']:.2f}, negatives {acc['neg']:.2f}{swap} "
              "(last 20 steps)")
    print(f"  workers      {summary.get('workers')} (negatives: {f.negatives})")
    mined = summary.get("mined")
    if mined:
        share = (summary.get("last") or {}).get("mined_share")
        print(
            f"  mined        {mined['path']} (model {mined['model_id']}, table version "
            f"{mined['table_version']}): {mined['anchors_with_neighbours']} anchors with "
            f"neighbours, {f.mined_slots} of {f.batch_size} slots, weight {f.mined_weight}"
            + (f", last step {share:.0%} of ITM negatives mined" if share is not None else "")
        )
    print(
        f"  steps        {summary['steps']} (this run from {summary.get('start_step', 0)}), "
        f"{summary.get('samples')} products, {summary.get('seconds')}s"
    )
    print(f"  samples/s    {rate:.1f}" if rate else "  samples/s    -")
    print(
        f"  best recall  {best:.4f} (mean R@1/5/10 both ways, ITC→ITM k_test={f.eval_k_test})"
        if best is not None
        else "  best recall  -"
    )
    for h in summary.get("history", []):
        print(f"    step {h['step']:>6}: mean recall {h['mean']}")
    print(f"  best         {summary.get('best_dir')}")
    print(f"  last         {summary.get('last_dir')} ({summary.get('model_id')})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.finetune", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("model",))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    try:
        summary = run_finetune(cfg)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.finetune.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print_summary(summary, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
