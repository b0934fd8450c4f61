"""ITC / ITM losses, hard-negative sampling, cross-rank gathering and the train step."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

from blip_ops.losses import (
    TEMP_MAX,
    TEMP_MIN,
    gather_features,
    itc_loss,
    itm_loss,
    make_temperature,
    product_id_tensor,
    sample_hard_negatives,
)
from blip_ops.training import RetrievalBatch, retrieval_train_step
from tests.conftest import draw_product, encode_image_bytes


def _ids(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


# ---- ITC ------------------------------------------------------------------------------------------
def _reference_itc(images, texts, image_ids, text_ids, temp):
    """InfoNCE with soft same-product targets, written out with floats and math only."""

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    def unit(v):
        n = math.sqrt(dot(v, v))
        return [x / n for x in v]

    images, texts = [unit(v) for v in images], [unit(v) for v in texts]

    def direction(rows, cols, row_ids, col_ids):
        total = 0.0
        for r, rid in zip(rows, row_ids, strict=True):
            logits = [dot(r, c) / temp for c in cols]
            log_z = math.log(sum(math.exp(x) for x in logits))
            pos = [j for j, cid in enumerate(col_ids) if cid == rid]
            total += -sum((logits[j] - log_z) / len(pos) for j in pos)
        return total / len(rows)

    return (
        direction(images, texts, image_ids, text_ids)
        + direction(texts, images, text_ids, image_ids)
    ) / 2


# Two products: product 7 has an image and two titles (say English and pinyin), product 9 one each.
IMAGES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
TEXTS = [[0.9, 0.1, 0.2], [0.3, 0.5, 0.4], [0.1, 0.8, -0.3]]
IMAGE_IDS, TEXT_IDS = [7, 9], [7, 7, 9]


def test_itc_loss_equals_hand_computed_reference():
    temp = 0.1
    out = itc_loss(
        torch.tensor(IMAGES), torch.tensor(TEXTS), temp, _ids(*IMAGE_IDS), _ids(*TEXT_IDS)
    )
    expected = _reference_itc(IMAGES, TEXTS, IMAGE_IDS, TEXT_IDS, temp)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.sim_i2t.shape == (2, 3) and out.sim_t2i.shape == (3, 2)
    # The similarities are plain cosines (no temperature): image 0 vs text 0.
    t0 = TEXTS[0]
    assert out.sim_i2t[0, 0].item() == pytest.approx(t0[0] / math.sqrt(sum(x * x for x in t0)))
    assert out.positives.tolist() == [[True, True, False], [False, False, True]]


def test_itc_reference_is_not_the_one_positive_loss():
    """Treating the second title of product 7 as a negative gives a different number: the
    reference above really tests the soft same-product targets."""
    hard = _reference_itc(IMAGES, TEXTS, IMAGE_IDS, [7, 8, 9], 0.1)  # hypothetical relabel
    soft = _reference_itc(IMAGES, TEXTS, IMAGE_IDS, TEXT_IDS, 0.1)
    assert abs(hard - soft) > 0.1


def test_same_product_titles_are_positives_never_negatives():
    """Moving product 7's second title toward product 7's image lowers the loss."""
    temp = 0.1
    base = itc_loss(
        torch.tensor(IMAGES), torch.tensor(TEXTS), temp, _ids(*IMAGE_IDS), _ids(*TEXT_IDS)
    )
    moved = [row[:] for row in TEXTS]
    moved[1] = [0.9, 0.3, 0.2]  # from (0.3, 0.5, 0.4) toward image 0 = (1, 0, 0)
    closer = itc_loss(
        torch.tensor(IMAGES), torch.tensor(moved), temp, _ids(*IMAGE_IDS), _ids(*TEXT_IDS)
    )
    assert closer.loss < base.loss
    # And the gradient on that title points toward its image.
    text = torch.tensor(TEXTS, requires_grad=True)
    itc_loss(torch.tensor(IMAGES), text, temp, _ids(*IMAGE_IDS), _ids(*TEXT_IDS)).loss.backward()
    toward_image = torch.tensor(IMAGES[0]) - text.detach()[1]
    assert torch.dot(-text.grad[1], toward_image) > 0


def test_temperature_is_learnable_and_clamped_like_blip():
    temp = make_temperature()
    assert isinstance(temp, torch.nn.Parameter) and temp.item() == pytest.approx(0.07)
    out = itc_loss(
        torch.tensor(IMAGES), torch.tensor(TEXTS), temp, _ids(*IMAGE_IDS), _ids(*TEXT_IDS)
    )
    out.loss.backward()
    assert temp.grad is not None and torch.isfinite(temp.grad)
    with torch.no_grad():
        temp.fill_(5.0)
    itc_loss(torch.tensor(IMAGES), torch.tensor(TEXTS), temp, _ids(*IMAGE_IDS), _ids(*TEXT_IDS))
    assert temp.item() == pytest.approx(TEMP_MAX)
    with torch.no_grad():
        temp.fill_(1e-6)
    itc_loss(torch.tensor(IMAGES), torch.tensor(TEXTS), temp, _ids(*IMAGE_IDS), _ids(*TEXT_IDS))
    assert temp.item() == pytest.approx(TEMP_MIN)


def test_itc_rejects_a_title_without_its_image():
    with pytest.raises(ValueError, match="no positive"):
        itc_loss(torch.tensor(IMAGES), torch.tensor(TEXTS), 0.1, _ids(*IMAGE_IDS), _ids(7, 7, 5))


def test_string_product_ids_map_to_stable_codes():
    a = product_id_tensor(["sku-1", "sku-2", "sku-1"])
    assert a[0] == a[2] and a[0] != a[1] and a.dtype == torch.long
    assert torch.equal(a, product_id_tensor(["sku-1", "sku-2", "sku-1"]))
    assert product_id_tensor([3, 4]).tolist() == [3, 4]


# ---- negatives ------------------------------------------------------------------------------------
def _random_batch(n_products: int, titles_per_product: int, seed: int = 0, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    image_ids = torch.arange(n_products) * 10 + 3
    text_ids = image_ids.repeat_interleave(titles_per_product)
    img = torch.nn.functional.normalize(torch.randn(n_products, dim, generator=g), dim=-1)
    # Titles close to their image, so the same-product entries are the most similar by far:
    # exactly what masking must override.
    txt = img.repeat_interleave(titles_per_product, 0) + 0.3 * torch.randn(
        n_products * titles_per_product, dim, generator=g
    )
    txt = torch.nn.functional.normalize(txt, dim=-1)
    sim_i2t = img @ txt.t()
    return sim_i2t, sim_i2t.t(), image_ids, text_ids


@pytest.mark.parametrize("mode", ["hard", "random"])
def test_same_product_pairs_are_never_sampled(mode):
    sim_i2t, sim_t2i, image_ids, text_ids = _random_batch(6, 3)
    for seed in range(200):
        neg = sample_hard_negatives(
            sim_i2t, sim_t2i, image_ids, text_ids, 0.07,
            generator=torch.Generator().manual_seed(seed), mode=mode,
        )  # fmt: skip
        assert neg.text_for_image.shape == (6,) and neg.image_for_text.shape == (18,)
        assert (text_ids[neg.text_for_image] != image_ids).all()
        assert (image_ids[neg.image_for_text] != text_ids).all()


def test_masking_survives_a_dominant_positive_at_the_lowest_temperature():
    """sim / 0.001 puts the positive 1000 nats above the rest: softmax-then-mask would leave an
    all-zero row; masking the logits first keeps the best negative."""
    sim = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 1.0, 0.1]])  # images 0, 1 vs texts of 0, 1, 2
    ids_img, ids_txt = _ids(0, 1), _ids(0, 1, 2)
    neg = sample_hard_negatives(
        sim, sim.t(), ids_img, ids_txt, TEMP_MIN, generator=torch.Generator().manual_seed(0)
    )
    assert neg.text_for_image.tolist() == [2, 2]


def test_hard_mode_prefers_similar_candidates_random_mode_does_not():
    # Image 0 faces one near-duplicate (text 1, another product) and eight unrelated titles.
    sim = torch.full((2, 10), -0.2)
    sim[0, 0], sim[0, 1] = 0.9, 0.8
    sim[1, 2] = 0.9
    image_ids, text_ids = _ids(0, 1), _ids(0, 5, 1, 2, 3, 4, 6, 7, 8, 9)
    sim_t2i = torch.zeros(10, 2)
    draws = {"hard": [], "random": []}
    for mode in draws:
        g = torch.Generator().manual_seed(1)
        for _ in range(200):
            neg = sample_hard_negatives(sim, sim_t2i, image_ids, text_ids, 0.07, g, mode=mode)
            draws[mode].append(int(neg.text_for_image[0]))
    assert draws["hard"].count(1) > 190  # exp(1.0 / 0.07) ≈ 1.6e6 times the others
    assert 5 < draws["random"].count(1) < 60  # 1 in 9


def test_extra_negatives_are_upweighted_but_never_override_the_mask():
    sim_i2t, sim_t2i, image_ids, text_ids = _random_batch(4, 2)
    extra_i2t = torch.zeros_like(sim_i2t)
    extra_i2t[0, 7] = 1000.0  # a mined negative for image 0 (product 4's second title)
    extra_i2t[1, 2] = 1000.0  # image 1's own title: must stay masked
    g = torch.Generator().manual_seed(0)
    picks0, picks1 = [], []
    for _ in range(100):
        neg = sample_hard_negatives(
            sim_i2t, sim_t2i, image_ids, text_ids, 0.07, g, extra_negatives=(extra_i2t, None)
        )
        picks0.append(int(neg.text_for_image[0]))
        picks1.append(int(neg.text_for_image[1]))
    assert picks0.count(7) > 95
    assert 2 not in picks1 and 3 not in picks1
    # A bool matrix works too.
    neg = sample_hard_negatives(
        sim_i2t, sim_t2i, image_ids, text_ids, 0.07, g, extra_negatives=(None, sim_t2i > 2)
    )
    assert (image_ids[neg.image_for_text] != text_ids).all()


def test_seeded_sampling_is_deterministic_and_seeds_differ():
    sim_i2t, sim_t2i, image_ids, text_ids = _random_batch(32, 3, seed=4)
    kw = {"mode": "hard"}

    def draw(seed):
        return sample_hard_negatives(
            sim_i2t, sim_t2i, image_ids, text_ids, 0.5, torch.Generator().manual_seed(seed), **kw
        )

    a, b, c = draw(11), draw(11), draw(12)
    assert torch.equal(a.text_for_image, b.text_for_image)
    assert torch.equal(a.image_for_text, b.image_for_text)
    assert not (
        torch.equal(a.text_for_image, c.text_for_image)
        and torch.equal(a.image_for_text, c.image_for_text)
    )


def test_sampler_is_vectorised(monkeypatch):
    """512 images × 1536 titles: one multinomial call per direction, no loop over the batch."""
    sim_i2t, sim_t2i, image_ids, text_ids = _random_batch(512, 3, seed=2, dim=32)
    calls = []
    real = torch.multinomial

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", counting)
    neg = sample_hard_negatives(
        sim_i2t, sim_t2i, image_ids, text_ids, 0.07, torch.Generator().manual_seed(0)
    )
    assert calls == [(512, 1536), (1536, 512)]
    assert neg.text_for_image.shape == (512,) and neg.image_for_text.shape == (1536,)
    assert (text_ids[neg.text_for_image] != image_ids).all()
    assert (image_ids[neg.image_for_text] != text_ids).all()


def test_a_batch_of_one_product_has_no_negatives():
    sim = torch.ones(1, 3)
    with pytest.raises(ValueError, match="at least 2 products"):
        sample_hard_negatives(sim, sim.t(), _ids(4), _ids(4, 4, 4), 0.07)


def test_sampling_pool_may_span_other_ranks():
    """Rows local, columns gathered from all ranks: masking uses the gathered ids."""
    sim_i2t, sim_t2i, image_ids, text_ids = _random_batch(6, 2)
    local_img, local_txt = slice(0, 3), slice(0, 6)  # this rank: products 0-2
    for seed in range(20):
        neg = sample_hard_negatives(
            sim_i2t[local_img], sim_t2i[local_txt], image_ids[local_img], text_ids[local_txt],
            0.07, torch.Generator().manual_seed(seed),
            all_image_ids=image_ids, all_text_ids=text_ids,
        )  # fmt: skip
        assert (text_ids[neg.text_for_image] != image_ids[local_img]).all()
        assert (image_ids[neg.image_for_text] != text_ids[local_txt]).all()


# ---- ITM ------------------------------------------------------------------------------------------
def test_itm_loss_equals_hand_computed_reference():
    logits = [[2.0, 1.0], [0.0, 3.0], [1.0, -1.0]]
    labels = [1, 0, 0]  # one positive pair, two negatives
    expected = (
        sum(
            -(row[y] - math.log(math.exp(row[0]) + math.exp(row[1])))
            for row, y in zip(logits, labels, strict=True)
        )
        / 3
    )
    got = itm_loss(torch.tensor(logits), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ---- gathering ------------------------------------------------------------------------------------
def test_gather_features_is_identity_without_distributed():
    assert not torch.distributed.is_initialized()
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_features(x) is x


def _gather_worker(rank: int, world: int, init_file: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        # Shards of different lengths: rank 0 holds 2 rows, rank 1 holds 3.
        full = torch.arange(15, dtype=torch.float32).view(5, 3)
        rows = [slice(0, 2), slice(2, 5)][rank]
        x = full[rows].clone().requires_grad_(True)
        g = gather_features(x)
        assert torch.equal(g.detach(), full)
        weights = torch.linspace(-1, 1, 15).view(5, 3)
        (g * weights).sum().backward()
        # Every rank computes the same loss; the shard's grad is summed over ranks (BLIP's rule,
        # so DDP's averaging gives the full-batch gradient).
        assert torch.allclose(x.grad, world * weights[rows])

        # ITC over the gathered batch equals ITC on the union, up to that same factor.
        feats = torch.nn.functional.normalize(
            torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=-1
        )
        ids = _ids(0, 1, 2, 3, 4)
        mine = feats[rows].clone().requires_grad_(True)
        out = itc_loss(gather_features(mine), gather_features(feats[rows]), 0.1, ids, ids)
        out.loss.backward()
        union = feats.clone().requires_grad_(True)
        ref = itc_loss(union, feats, 0.1, ids, ids)
        ref.loss.backward()
        assert torch.allclose(out.loss, ref.loss)
        assert torch.allclose(mine.grad, world * union.grad[rows], atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_gather_features_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


# ---- the train step on the tiny model -------------------------------------------------------------
TITLES = {  # product -> titles (English, 汉字, pinyin where there is one)
    "p-sofa": ["grey linen sofa", "灰色 布艺 沙发", "hui se bu yi sha fa"],
    "p-car": ["kids ride on car", "儿童 扭扭车"],
    "p-lamp": ["white desk lamp"],
    "p-bag": ["red leather bag women", "hong se pi bao"],
}


@pytest.fixture
def fresh_tiny_model():
    """A tiny BLIP of its own: training must not touch the session's shared ``tiny_model``."""
    from blip_ops.tiny_model import make_tiny_model

    model = make_tiny_model(seed=0)
    model.model.train()
    return model


def _batch(model) -> RetrievalBatch:
    products = list(TITLES)
    images = [
        Image.open(io.BytesIO(encode_image_bytes(draw_product(i)))).convert("RGB")
        for i in range(len(products))
    ]
    texts = [t for p in products for t in TITLES[p]]
    text_ids = [p for p in products for _ in TITLES[p]]
    return RetrievalBatch(model.preprocess(images), products, texts, text_ids)


def test_train_step_returns_finite_losses_and_trains(fresh_tiny_model):
    model = fresh_tiny_model
    batch = _batch(model)
    temp = make_temperature()
    out = retrieval_train_step(model, batch, temp, generator=torch.Generator().manual_seed(0))
    assert out["n_images"] == 4 and out["n_texts"] == 8
    # ITM pairs: 8 positives + a negative title per image (4) + a negative image per title (8).
    assert out["n_itm_pairs"] == 8 + 4 + 8
    for key in ("loss", "itc", "itm"):
        assert torch.isfinite(out[key]), key
    assert out["loss"].requires_grad
    assert torch.allclose(out["loss"].detach(), out["itc"] + out["itm"])
    # Negatives come from other products.
    ids = product_id_tensor(batch.image_ids)
    tids = product_id_tensor(batch.text_ids)
    assert (tids[out["negatives"].text_for_image] != ids).all()
    assert (ids[out["negatives"].image_for_text] != tids).all()

    out["loss"].backward()
    net = model.model
    for name in ("vision_proj.weight", "text_proj.weight", "itm_head.weight"):
        grad = net.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert net.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert net.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert temp.grad is not None and torch.isfinite(temp.grad)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


def test_one_adamw_step_lowers_the_loss_on_its_batch(fresh_tiny_model):
    model = fresh_tiny_model
    batch = _batch(model)
    temp = make_temperature()
    opt = torch.optim.AdamW([*model.model.parameters(), temp], lr=1e-3, weight_decay=0.05)

    def loss(step: bool) -> float:
        # Random negatives with the same seed: the same pairs before and after the update.
        out = retrieval_train_step(
            model, batch, temp, negatives="random", generator=torch.Generator().manual_seed(3)
        )
        if step:
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        return float(out["loss"].detach())

    before = loss(step=True)
    after = loss(step=False)
    assert after < before


def test_train_step_hard_negatives_are_seeded(fresh_tiny_model):
    model = fresh_tiny_model
    model.model.eval()  # no dropout: the same features twice
    batch = _batch(model)
    temp = make_temperature()
    a = retrieval_train_step(model, batch, temp, generator=torch.Generator().manual_seed(5))
    b = retrieval_train_step(model, batch, temp, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["negatives"].text_for_image, b["negatives"].text_for_image)
    assert torch.equal(a["negatives"].image_for_text, b["negatives"].image_for_text)
    assert float(a["loss"].detach()) == pytest.approx(float(b["loss"].detach()))


def test_itm_with_one_title_per_image(fresh_tiny_model):
    """itm_titles="one": 3B ITM pairs, each image paired with one of its own titles (a seeded draw
    that covers every title over seeds); ITC still sees every title."""
    model = fresh_tiny_model
    model.model.eval()
    batch = _batch(model)
    temp = make_temperature()
    ids = product_id_tensor(batch.image_ids)
    tids = product_id_tensor(batch.text_ids)
    drawn = set()
    for seed in range(12):
        out = retrieval_train_step(
            model, batch, temp, generator=torch.Generator().manual_seed(seed), itm_titles="one"
        )
        assert out["n_itm_pairs"] == 3 * 4 and out["n_texts"] == 8
        rows = out["itm_text_rows"]
        assert torch.equal(tids[rows], ids)  # image b's ITM title is one of its own
        drawn |= set(rows.tolist())
        again = retrieval_train_step(
            model, batch, temp, generator=torch.Generator().manual_seed(seed), itm_titles="one"
        )
        assert torch.equal(again["itm_text_rows"], rows)
        assert float(again["itm"]) == pytest.approx(float(out["itm"]))
    assert drawn == set(range(8))  # every title is drawn for some seed
    full = retrieval_train_step(model, batch, temp, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full["itm_text_rows"], torch.arange(8))
    assert float(full["itc"]) == pytest.approx(float(out["itc"]))  # ITC: every title either way
    with pytest.raises(ValueError, match="itm_titles must be one of"):
        retrieval_train_step(model, batch, temp, itm_titles="two")


def test_train_step_rejects_bad_batches(fresh_tiny_model):
    model = fresh_tiny_model
    batch = _batch(model)
    temp = make_temperature()
    with pytest.raises(ValueError, match="negatives must be one of"):
        retrieval_train_step(model, batch, temp, negatives="semi-hard")
    one_product = RetrievalBatch(batch.pixel_values[:1], ["p"], ["a", "b"], ["p", "p"])
    with pytest.raises(ValueError, match="at least 2 products"):
        retrieval_train_step(model, one_product, temp)
    with pytest.raises(ValueError, match="2 texts for 3 text ids"):
        retrieval_train_step(
            model, {**vars(batch), "texts": ["a", "b"], "text_ids": [1, 2, 3]}, temp
        )


def test_losses_and_training_import_only_the_core_libraries():
    from tests.test_imports import ALLOWED_THIRD_PARTY, _new_top_level_modules

    extra = _new_top_level_modules(["blip_ops.losses", "blip_ops.training"]) - ALLOWED_THIRD_PARTY
    assert not extra, f"blip_ops.losses/training import {sorted(extra)} at module load"
