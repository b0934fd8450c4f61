"""BLIP's momentum distillation: EMA copy, feature queue, distilled ITC, and fit with resume."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from blip_ops import load_model
from blip_ops.losses import first_candidate_negatives, itc_loss, itc_loss_with_momentum
from blip_ops.momentum import FeatureQueue, MomentumDistiller, alpha_at
from blip_ops.train_loop import TRAINER_STATE, TrainSettings, fit
from pipelines.training.batches import build_batch
from pipelines.training.data import read_titles, read_train_products
from tests.conftest import demo_config


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision_model = torch.nn.Linear(3, 4)
        self.vision_proj = torch.nn.Linear(4, 2)
        self.text_encoder = torch.nn.Linear(3, 4)
        self.text_proj = torch.nn.Linear(4, 2)
        self.itm_head = torch.nn.Linear(4, 2)  # not copied


def test_ema_update_math():
    torch.manual_seed(0)
    net = _Tiny()
    dist = MomentumDistiller(net, m=0.9, queue_size=4)
    assert "itm_head" not in dist.parts
    assert not any(p.requires_grad for p in dist.parts.parameters())
    old = {k: v.clone() for k, v in dist.parts.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    dist.update(net)
    for key, value in dist.parts.state_dict().items():
        part, name = key.split(".", 1)
        new = getattr(net, part).state_dict()[name]
        torch.testing.assert_close(value, 0.9 * old[key] + 0.1 * new, rtol=0, atol=1e-6)
    # m = 1 never moves; m = 0 copies.
    frozen = {k: v.clone() for k, v in dist.parts.state_dict().items()}
    dist.m = 1.0
    dist.update(net)
    for k, v in dist.parts.state_dict().items():
        assert torch.equal(v, frozen[k])
    dist.m = 0.0
    dist.update(net)
    assert torch.equal(dist.parts["text_proj"].weight, net.text_proj.weight)


def test_queue_is_fifo_bounded_and_keeps_ids_aligned():
    q = FeatureQueue(5)
    assert len(q) == 0 and q.feats is None

    def rows(ids):
        ids = torch.tensor(ids)
        return ids.float().view(-1, 1).repeat(1, 3), ids

    q.push(*rows([0, 1, 2]))
    assert q.ids.tolist() == [0, 1, 2]
    q.push(*rows([3, 4, 5, 6]))
    assert len(q) == 5 and q.ids.tolist() == [2, 3, 4, 5, 6]  # oldest dropped first
    assert q.feats[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]  # features follow their ids
    q.push(*rows(list(range(10, 18))))  # more than the whole queue at once
    assert q.ids.tolist() == [13, 14, 15, 16, 17] and q.feats[:, 0].tolist() == [13, 14, 15, 16, 17]
    restored = FeatureQueue(5)
    restored.load_state_dict(q.state_dict(), "cpu")
    assert torch.equal(restored.feats, q.feats) and torch.equal(restored.ids, q.ids)
    with pytest.raises(ValueError):
        q.push(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_alpha_ramp():
    assert alpha_at(0, 0.4, 10) == 0.0
    assert alpha_at(5, 0.4, 10) == pytest.approx(0.2)
    assert alpha_at(10, 0.4, 10) == alpha_at(50, 0.4, 10) == pytest.approx(0.4)
    assert alpha_at(0, 0.4, 0) == pytest.approx(0.4)


def _features(b=4, t=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, d, generator=g)
    txt = torch.randn(t, d, generator=g)
    image_ids = torch.arange(b)
    text_ids = torch.tensor([0, 0, 1, 2, 2, 3, 3])[:t]
    return img, txt, image_ids, text_ids


def test_alpha_zero_empty_queue_equals_plain_itc():
    img, txt, image_ids, text_ids = _features()
    plain = itc_loss(img, txt, 0.07, image_ids, text_ids)
    for queue in (None, torch.zeros(0, 8)):
        ids = None if queue is None else torch.zeros(0, dtype=torch.long)
        mom = itc_loss_with_momentum(
            img, txt, 0.07, image_ids, text_ids, image_feat_m=img, text_feat_m=txt,
            image_queue=queue, image_queue_ids=ids, text_queue=queue, text_queue_ids=ids,
            alpha=0.0,
        )  # fmt: skip
        torch.testing.assert_close(mom.loss, plain.loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(mom.sim_i2t, plain.sim_i2t, rtol=0, atol=1e-6)
        assert torch.equal(mom.positives_i2t, plain.positives)


def test_queue_entries_of_the_same_product_are_positives():
    img, txt, image_ids, text_ids = _features()
    g = torch.Generator().manual_seed(1)
    text_queue = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text_queue_ids = torch.tensor([1, 9, 0, 9, 1])
    image_queue = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    image_queue_ids = torch.tensor([3, 9, 2])
    common = dict(
        image_feat_m=img + 0.1, text_feat_m=txt - 0.1, image_queue=image_queue,
        image_queue_ids=image_queue_ids, text_queue=text_queue, text_queue_ids=text_queue_ids,
    )  # fmt: skip
    hard = itc_loss_with_momentum(img, txt, 0.07, image_ids, text_ids, alpha=0.0, **common)
    assert hard.targets_i2t.shape == (4, 7 + 5) and hard.targets_t2i.shape == (7, 4 + 3)
    # Image 1's positives: its batch title (column 2) and queue titles 0 and 4 (columns 7, 11).
    assert hard.positives_i2t[1].nonzero().view(-1).tolist() == [2, 7, 11]
    torch.testing.assert_close(hard.targets_i2t[1, [2, 7, 11]], torch.full((3,), 1 / 3))
    assert float(hard.targets_i2t[1].sum()) == pytest.approx(1.0)
    assert hard.positives_i2t[0].nonzero().view(-1).tolist() == [0, 1, 9]
    assert hard.positives_t2i[5].nonzero().view(-1).tolist() == [3, 4]  # title of product 3
    # With alpha 0 nothing of another product gets target mass: a queue positive is never a
    # negative, and queue entries of other products are pure negatives.
    assert bool((hard.targets_i2t[~hard.positives_i2t] == 0).all())
    assert bool((hard.targets_t2i[~hard.positives_t2i] == 0).all())
    soft = itc_loss_with_momentum(img, txt, 0.07, image_ids, text_ids, alpha=0.4, **common)
    assert torch.allclose(soft.targets_i2t.sum(dim=1), torch.ones(4))
    pos = soft.positives_i2t
    counts = pos.sum(dim=1, keepdim=True).float().expand_as(pos)
    assert bool((soft.targets_i2t[pos] >= 0.6 / counts[pos] - 1e-6).all())
    assert torch.isfinite(soft.loss)
    img.requires_grad_(True)
    loss = itc_loss_with_momentum(img, txt, 0.07, image_ids, text_ids, alpha=0.4, **common).loss
    loss.backward()
    assert img.grad is not None and bool(img.grad.abs().sum() > 0)


# ---- fit with momentum -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("mom") / "catalog"
    make_catalog(str(root), 24, seed=0, workers=1)
    return root


def _run(tiny_model_dir, batches, out_dir, stop_at=None):
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    settings = TrainSettings(
        steps=3, lr=1e-3, weight_decay=0.0, warmup_steps=0, alpha_warmup_steps=2,
        negatives="random", seed=0, out_dir=out_dir, momentum=True, momentum_m=0.9,
        queue_size=8, alpha=0.4,
    )  # fmt: skip
    return fit(
        model, lambda step: batches[step], settings, log=None, stop_at=stop_at,
        negative_sampler=first_candidate_negatives,
    )


def test_fit_with_momentum_checkpoints_and_resumes_the_queue(tiny_model_dir, catalog, tmp_path):
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    rows = read_train_products(catalog, demo_config())
    titles = read_titles(catalog, cfg=demo_config())
    assert len(rows) >= 9
    batches = [build_batch(model, rows[3 * s : 3 * s + 3], titles) for s in range(3)]

    full = _run(tiny_model_dir, batches, tmp_path / "full")
    assert full["steps"] == 3 and len(full["losses"]) == 3
    assert all(torch.isfinite(torch.tensor(full["losses"])))
    assert full["last"]["alpha"] == pytest.approx(0.4) and full["last"]["queue"] == 8
    state = torch.load(tmp_path / "full" / "last" / TRAINER_STATE, weights_only=False)
    assert state["step"] == 3 and state["settings"]["momentum"] is True
    mom = state["momentum"]
    assert mom["image_queue"]["ids"].numel() == 8  # 3 steps x 3 images, bounded at 8
    assert mom["text_queue"]["ids"].numel() == 8
    assert load_model(tmp_path / "full" / "last", device="cpu").model_id == full["model_id"]

    first = _run(tiny_model_dir, batches, tmp_path / "split", stop_at=2)
    assert first["steps"] == 2
    second = _run(tiny_model_dir, batches, tmp_path / "split")
    assert second["start_step"] == 2 and second["steps"] == 3
    assert second["losses"] == pytest.approx(full["losses"][2:], abs=1e-5)
    resumed = torch.load(tmp_path / "split" / "last" / TRAINER_STATE, weights_only=False)
    rmom = resumed["momentum"]
    for name in ("image_queue", "text_queue"):
        assert torch.equal(rmom[name]["ids"], mom[name]["ids"])
        torch.testing.assert_close(rmom[name]["feats"], mom[name]["feats"], rtol=0, atol=1e-5)
    for key, value in mom["parts"].items():
        torch.testing.assert_close(rmom["parts"][key], value, rtol=0, atol=1e-5)


def test_samples_per_second_leave_evaluation_out(tiny_model_dir, catalog):
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    rows = read_train_products(catalog, demo_config())[:3]
    batch = build_batch(model, rows, read_titles(catalog, cfg=demo_config()))

    def slow_eval(_model):
        time.sleep(0.6)
        return {"mean": 0.0}

    started = time.perf_counter()
    settings = TrainSettings(steps=2, eval_every=1)
    out = fit(model, lambda step: batch, settings, eval_fn=slow_eval, log=None)
    wall = time.perf_counter() - started
    assert out["eval_seconds"] >= 1.2  # evaluations at steps 1 and 2
    assert out["seconds"] <= wall - 1.2
