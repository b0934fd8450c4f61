"""Which train products share a batch: a seeded function of the step, so a resumed run sees
exactly the batches an uninterrupted one would.

- :class:`EpochSampler`: a fresh permutation per epoch (``finetune.batching=random``);
- :class:`FamilySampler`: whole near-duplicate families plus random singles (``family``), so
  in-batch hard negatives are one-attribute twins;
- :class:`MinedSampler`: anchors and one mined neighbour each (``finetune.mined_negatives``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipelines.config import AppConfig


def _check_size(rows: list[dict], batch_size: int) -> None:
    if batch_size > len(rows):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(rows)} train products")


class EpochSampler:
    """Batches of ``batch_size`` products, a fresh seeded permutation per epoch (drop last).

    ``batch(step)`` depends on the step only, so a resumed run sees what an uninterrupted one would.
    """

    def __init__(self, rows: list[dict], batch_size: int, seed: int):
        _check_size(rows, batch_size)
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
        _check_size(rows, batch_size)
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
        _check_size(rows, batch_size)
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


def batch_sampler(
    cfg: AppConfig, rows: list[dict], model_id: str
) -> tuple[EpochSampler | FamilySampler | MinedSampler, dict | None]:
    """(sampler, mined summary or None) for ``finetune.batching`` / ``mined_negatives``."""
    from pipelines.training.mined import load_mined_neighbours

    f = cfg.finetune
    if f.mined_negatives is not None:
        mined = load_mined_neighbours(cfg, rows, model_id)
        neighbours = mined.pop("neighbours")
        return MinedSampler(rows, neighbours, f.batch_size, f.mined_slots, f.seed), mined
    if f.batching == "family":
        return FamilySampler(rows, f.batch_size, f.random_share, f.seed), None
    return EpochSampler(rows, f.batch_size, f.seed), None
