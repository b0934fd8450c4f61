"""The training recipe: family batches, per-part learning rates, normalised titles, swapped-title
negatives, and fitting that never opens the test split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from blip_ops import load_model
from blip_ops.losses import make_temperature
from blip_ops.train_loop import TrainSettings, param_groups
from blip_ops.training import retrieval_train_step
from pipelines.config import ConfigError, load_config
from pipelines.training.batches import SwapNegatives, build_batch
from pipelines.training.data import distinct_titles, read_pairs, read_train_products, title_key
from pipelines.training.runners import run_single
from pipelines.training.samplers import FamilySampler
from tests.conftest import DEMO_TITLE_COLUMNS, demo_config


def _rows(families: dict[str, int]) -> list[dict]:
    rows = []
    for fam, size in families.items():
        rows += [{"product_id": f"{fam}-{i}", "family_id": fam, "split": "train"} for i in range(size)]
    return rows


# ---- family batches ---------------------------------------------------------------------------
@pytest.mark.parametrize("random_share", [0.0, 0.25, 0.5])
def test_family_sampler_visits_every_product_once_per_epoch(random_share):
    rng = np.random.default_rng(0)
    rows = _rows({f"f{i:03d}": int(rng.integers(1, 5)) for i in range(60)})
    sampler = FamilySampler(rows, batch_size=16, random_share=random_share, seed=3)
    for epoch in range(3):
        batches = sampler.epoch(epoch)
        seen = Counter(i for b in batches for i in b)
        assert sorted(seen) == list(range(len(rows))) and set(seen.values()) == {1}
        assert all(2 <= len(b) <= 16 for b in batches[:-1])
    # steps run across epochs: the step after the last of epoch 0 is the first of epoch 1
    n0 = len(sampler.epoch(0))
    assert sampler.indices(n0) == sampler.epoch(1)[0]
    assert sampler.indices(n0 - 1) == sampler.epoch(0)[-1]


def test_family_sampler_keeps_siblings_together_and_mixes_in_random_products():
    rows = _rows({f"f{i:03d}": 3 for i in range(40)})  # every product has two siblings
    family_of = [r["family_id"] for r in rows]

    def sibling_share(share: float) -> float:
        sampler = FamilySampler(rows, batch_size=12, random_share=share, seed=0)
        with_sibling = total = 0
        for b in sampler.epoch(0):
            fams = Counter(family_of[i] for i in b)
            with_sibling += sum(1 for i in b if fams[family_of[i]] > 1)
            total += len(b)
        return with_sibling / total

    grouped, half, random_only = sibling_share(0.0), sibling_share(0.5), sibling_share(1.0)
    assert grouped == 1.0  # whole families of 3 packed into batches of 12
    assert 0.4 <= half <= 0.75  # about half the products arrive with their family
    assert random_only < 0.35  # random batches rarely hold a sibling
    plain = FamilySampler(rows, 12, 0.5, seed=0)
    # every batch holds some whole families and some singles
    first = Counter(family_of[i] for i in plain.epoch(0)[0])
    assert 3 in first.values() and 1 in first.values()


def test_family_sampler_is_seeded():
    rows = _rows({f"f{i:03d}": 2 for i in range(30)})
    a = FamilySampler(rows, 8, 0.5, seed=1)
    b = FamilySampler(rows, 8, 0.5, seed=1)
    c = FamilySampler(rows, 8, 0.5, seed=2)
    assert [a.indices(s) for s in range(12)] == [b.indices(s) for s in range(12)]
    assert [a.indices(s) for s in range(12)] != [c.indices(s) for s in range(12)]
    with pytest.raises(ValueError, match="exceeds"):
        FamilySampler(rows[:4], 8, 0.5, seed=0)


# ---- per-part learning rates ------------------------------------------------------------------
class _Roles:
    """A model whose parameters are split into pretrained and fresh parts by name."""

    def __init__(self):
        self.model = torch.nn.ModuleDict(
            {
                "text_encoder": torch.nn.Linear(4, 4),
                "itm_head": torch.nn.Linear(4, 2),
                "norm": torch.nn.LayerNorm(4),
            }
        )

    def parameter_roles(self):
        return {
            n: "pretrained" if n.startswith("text_encoder.") else "fresh"
            for n, _ in self.model.named_parameters()
        }


def test_param_groups_give_each_part_its_rate_and_the_temperature_no_decay():
    model, temp = _Roles(), make_temperature()
    settings = TrainSettings(steps=1, lr=1e-3, lr_pretrained=3e-5, lr_temp=5e-4, weight_decay=0.05)
    groups = {g["name"]: g for g in param_groups(model, temp, settings)}
    assert set(groups) == {
        "fresh", "fresh_no_decay", "pretrained", "pretrained_no_decay", "temperature"
    }  # fmt: skip
    m = model.model
    assert groups["pretrained"]["params"] == [m["text_encoder"].weight]
    assert groups["pretrained_no_decay"]["params"] == [m["text_encoder"].bias]
    assert groups["fresh"]["params"] == [m["itm_head"].weight]
    assert {id(p) for p in groups["fresh_no_decay"]["params"]} == {
        id(m["itm_head"].bias), id(m["norm"].weight), id(m["norm"].bias)
    }  # fmt: skip
    assert groups["temperature"]["params"] == [temp]
    assert groups["pretrained"]["lr"] == 3e-5 and groups["pretrained_no_decay"]["lr"] == 3e-5
    assert groups["fresh"]["lr"] == 1e-3 and groups["temperature"]["lr"] == 5e-4
    assert groups["fresh"]["weight_decay"] == 0.05 and groups["pretrained"]["weight_decay"] == 0.05
    assert groups["temperature"]["weight_decay"] == 0.0 == groups["fresh_no_decay"]["weight_decay"]
    # One rate when lr_pretrained / lr_temp are not set.
    same = param_groups(model, temp, TrainSettings(steps=1, lr=2e-4))
    assert {g["lr"] for g in same} == {2e-4}


def test_compact_family_names_its_fresh_and_pretrained_parts():
    from blip_ops.compact_model import CompactBlipModel

    roles = CompactBlipModel.parameter_roles.__get__(_compact_shell())()
    assert roles["text_encoder.encoder.layer.0.attention.self.query.weight"] == "pretrained"
    assert roles["text_encoder.encoder.layer.0.crossattention.self.query.weight"] == "fresh"
    assert roles["itm_head.weight"] == roles["vision_proj.weight"] == "fresh"
    assert roles["vision_model.fc1.weight"] == "fresh"
    cnn = [role for name, role in roles.items() if name.startswith("vision_model.cnn.")]
    assert cnn and set(cnn) == {"pretrained"}


def _compact_shell():
    """A CompactBlipModel-shaped object holding a randomly initialised network (no packages)."""
    from blip_ops.compact_model import CompactBlipConfig, CompactBlipForRetrieval

    class Shell:
        model = CompactBlipForRetrieval(CompactBlipConfig())

    return Shell()


def test_lr_pretrained_moves_pretrained_weights_less(tiny_model_dir, catalog_for_recipe):
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    model.parameter_roles = lambda: {
        n: ("pretrained" if n.startswith("text_encoder.") else "fresh")
        for n, _ in model.model.named_parameters()
    }
    rows = read_train_products(catalog_for_recipe, demo_config())[:4]
    titles = distinct_titles(read_pairs(catalog_for_recipe, demo_config()), model.normalize_text)
    batch = build_batch(model, rows, titles)
    from blip_ops.train_loop import fit

    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    settings = TrainSettings(steps=1, lr=1e-2, lr_pretrained=1e-6, optimizer="sgd", grad_clip=0.0)
    fit(model, lambda step: batch, settings, log=None)
    after = model.model.state_dict()

    def moved(prefix: str) -> float:
        return max((after[k] - before[k]).abs().max().item() for k in before if k.startswith(prefix))

    assert moved("itm_head.") > 1e3 * max(moved("text_encoder.embeddings."), 1e-12)


def test_frozen_word_embeddings_stay_put_and_leave_the_optimiser(tiny_model_dir, catalog_for_recipe):
    from blip_ops.train_loop import fit, word_embeddings

    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    rows = read_train_products(catalog_for_recipe, demo_config())[:4]
    titles = distinct_titles(read_pairs(catalog_for_recipe, demo_config()), model.normalize_text)
    batch = build_batch(model, rows, titles)
    table = word_embeddings(model).weight
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    settings = TrainSettings(steps=2, lr=1e-2, freeze_word_embeddings=True, grad_clip=0.0)
    fit(model, lambda step: batch, settings, log=None)
    after = model.model.state_dict()
    key = "text_encoder.embeddings.word_embeddings.weight"
    assert torch.equal(after[key], before[key])
    assert not table.requires_grad and table.grad is None
    assert not torch.equal(after["itm_head.weight"], before["itm_head.weight"])
    assert not torch.equal(
        after["text_encoder.embeddings.position_embeddings.weight"],
        before["text_encoder.embeddings.position_embeddings.weight"],
    )  # only the word table is fixed
    assert id(table) not in {id(p) for g in param_groups(model, make_temperature(), settings)
                             for p in g["params"]}  # fmt: skip
    cfg = demo_config("finetune.freeze_word_embeddings=true")
    from pipelines.training.recipe import train_settings

    assert train_settings(cfg).freeze_word_embeddings is True


def test_word_embeddings_of_a_model_without_a_table_is_a_clear_error():
    from blip_ops.train_loop import word_embeddings

    class NoTable:
        class model:  # noqa: N801  (shaped like HFBlipModel.model)
            text_encoder = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="Linear has no embeddings.word_embeddings"):
        word_embeddings(NoTable())


# ---- titles and swapped negatives ---------------------------------------------------------------
def test_titles_are_deduplicated_after_normalisation(catalog_for_recipe, tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu")
    pairs = read_pairs(catalog_for_recipe, demo_config())
    raw = distinct_titles(pairs)
    norm = distinct_titles(pairs, model.normalize_text)
    assert all(len(t) == 3 for t in raw.values())
    # a pinyin model reads the 汉字 title and its pinyin spelling as one text
    assert model.text_settings.to_pinyin
    assert all(len(t) == 2 for t in norm.values())
    for pid, titles in norm.items():
        assert len({title_key(t, model.normalize_text) for t in titles}) == len(titles)
        assert pairs[pid]["titles"]["en"] in titles


def test_title_key_drops_decorative_punctuation_only():
    assert title_key("【 re xiao 】 hong se  sofa") == title_key("re xiao hong se sofa")
    assert title_key("M&D sofa 1.5m") != title_key("MD sofa 15m")
    assert title_key("red sofa") != title_key("blue sofa")


def test_swapped_titles_join_the_itm_pairs_as_negatives(catalog_for_recipe, tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    pairs = read_pairs(catalog_for_recipe, demo_config())
    rows = read_train_products(catalog_for_recipe, demo_config())[:6]
    titles = distinct_titles(pairs, model.normalize_text)
    swaps = SwapNegatives(pairs, seed=0)
    assert swaps.usable
    batch = build_batch(model, rows, titles, swaps=swaps, step=0)
    assert batch.swap_texts and len(batch.swap_texts) == len(batch.swap_images)
    for text, i in zip(batch.swap_texts, batch.swap_images, strict=True):
        own = pairs[rows[i]["product_id"]]["titles"].values()
        assert text not in own
    again = build_batch(model, rows, titles, swaps=SwapNegatives(pairs, seed=0), step=0)
    assert again.swap_texts == batch.swap_texts  # seeded by step
    temp = make_temperature()
    out = retrieval_train_step(model, batch, temp, itm_titles="one", generator=torch.Generator())
    n_img, n_swap = len(rows), len(batch.swap_texts)
    assert out["n_itm_pairs"] == 3 * n_img + n_swap
    assert out["itm_accuracy_swap"] is not None
    plain = retrieval_train_step(model, build_batch(model, rows, titles), temp, itm_titles="one")
    assert plain["n_itm_pairs"] == 3 * n_img and plain["itm_accuracy_swap"] is None


# ---- splits -------------------------------------------------------------------------------------
def test_fitting_never_opens_a_test_product(catalog_for_recipe, tiny_model_dir, tmp_path, monkeypatch):
    """Every image decoded and every text tokenised while fitting (batches and the periodic
    evaluation) is checked against the catalog's splits: no test product may appear."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    import blip_ops.decode as decode
    from blip_ops.hf_blip import HFBlipModel

    products = pads.dataset(catalog_for_recipe / "products").to_table().to_pylist()
    split_of_image = {bytes(r["image"]): r["split"] for r in products}
    pairs = pq.read_table(catalog_for_recipe / "pairs.parquet").to_pylist()
    queries = pq.read_table(catalog_for_recipe / "queries.parquet").to_pylist()
    test_texts = {r[c] for r in pairs if r["split"] == "test" for c in ("title_en", "title_zh", "title_pinyin")}
    test_texts |= {q["query"] for q in queries if q["split"] == "test"}
    val_texts = {r["title_en"] for r in pairs if r["split"] == "val"}
    assert test_texts and val_texts

    decoded, tokenised = [], []
    real_decode, real_tokenize = decode.decode_image, HFBlipModel._tokenize

    def spy_decode(data, *a, **kw):
        decoded.append(split_of_image.get(bytes(data), "unknown"))
        return real_decode(data, *a, **kw)

    def spy_tokenize(self, texts):
        tokenised.extend(texts)
        return real_tokenize(self, texts)

    monkeypatch.setattr(decode, "decode_image", spy_decode)
    monkeypatch.setattr(HFBlipModel, "_tokenize", spy_tokenize)
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.device=cpu", DEMO_TITLE_COLUMNS,
        f"finetune.catalog={catalog_for_recipe}", f"finetune.out_dir={tmp_path / 'ft'}",
        "finetune.steps=2", "finetune.eval_every=1", "finetune.batch_size=4",
        "finetune.batching=family", "finetune.swap_negatives=true",
    ])  # fmt: skip
    summary = run_single(cfg)
    assert [h["step"] for h in summary["history"]] == [1, 2]
    assert Counter(decoded).keys() <= {"train", "val"} and "val" in decoded and "train" in decoded
    assert not test_texts & set(tokenised)
    assert val_texts & set(tokenised)  # the evaluation did read val


def test_the_config_refuses_a_test_split_evaluation():
    with pytest.raises(ConfigError, match="eval_split"):
        load_config(None, ["finetune.eval_split=test"])


@pytest.fixture(scope="module")
def catalog_for_recipe(tmp_path_factory):
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("recipe") / "catalog"
    make_catalog(str(root), 60, seed=1, workers=1)
    return root


def test_train_step_benchmark_times_both_arms(tiny_model_dir, catalog_for_recipe, capsys):
    import json
    from pathlib import Path

    from benchmarks.bench_train_step import main

    repo = Path(__file__).resolve().parents[1]
    assert main([
        "--steps", "1", "--repeats", "1", "--config", str(repo / "configs" / "finetune_demo.yaml"),
        f"model.name_or_path={tiny_model_dir}", f"finetune.catalog={catalog_for_recipe}",
        "finetune.batch_size=4", "finetune.batching=family", "finetune.feature_cache=null",
    ]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rates = out["samples_per_s"]
    assert set(rates) == {"trained", "frozen"}
    assert all(len(v) == 1 and v[0] > 0 for v in rates.values())
