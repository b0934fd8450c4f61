"""Hard negatives mined from the published index, and fine-tuning with them.

One real index (the session's ``search_index``: the 120-product demo catalog through the real index
job into LanceDB) is mined once per module; the fine-tune runs on the same catalog's train split.
"""

from __future__ import annotations

import logging
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from blip_ops import load_model
from blip_ops.losses import TEMP_INIT, make_temperature
from blip_ops.train_loop import TRAINER_STATE
from blip_ops.training import retrieval_train_step
from pipelines.config import ConfigError, load_config
from pipelines.indexing import tables
from pipelines.mine_negatives import main
from pipelines.training.batches import build_batch
from pipelines.training.data import read_titles, read_train_products
from pipelines.training.mined import NEGATIVES_DIR, load_mined_neighbours, read_negatives
from pipelines.training.mining import MiningInputError, mine, train_rows
from pipelines.training.recipe import train_settings
from pipelines.training.runners import run_single
from pipelines.training.samplers import MinedSampler
from pipelines.training.splits import TrainSplitError
from tests.conftest import DEMO_TITLE_COLUMNS, demo_config, index_config

PER_PRODUCT = 5

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def mined(search_index, tiny_model_dir, tmp_path_factory):
    """(summary, negatives file, index config) of one mining run over the session's index."""
    _, root = search_index
    out = tmp_path_factory.mktemp("mined") / "negatives.parquet"
    cfg = index_config(
        root / "catalog" / "products", root / "db", tiny_model_dir,
        f"mine.per_product={PER_PRODUCT}", "mine.chunk_rows=16", f"mine.out={out}",
    )  # fmt: skip
    summary = mine(cfg)
    return summary, out, cfg


def _published(cfg) -> pa.Table:
    """product_id, split and embedding of every row of the published version, read directly."""
    table = tables.open_published(tables.connect(cfg.index.uri))[0]
    return table.to_arrow().select(["product_id", "split", "image_embedding", "model_id"])


# ---- mining --------------------------------------------------------------------------------------
def test_every_train_product_gets_train_neighbours_never_itself(mined, search_index):
    summary, out, cfg = mined
    published = _published(cfg).to_pylist()
    split = {r["product_id"]: r["split"] for r in published}
    train = {p for p, s in split.items() if s == "train"}
    assert train and len(train) < len(split), "the demo index must hold test products too"
    catalog_test = {
        r["product_id"]
        for r in pq.read_table(search_index[1] / "catalog" / "pairs.parquet").to_pylist()
        if r["split"] == "test"
    }
    got = pq.read_table(out).to_pylist()
    assert sorted(r["product_id"] for r in got) == sorted(train)  # each once, all of them
    for r in got:
        negs = r["negative_ids"]
        assert len(negs) == len(r["similarities"]) == PER_PRODUCT
        assert r["product_id"] not in negs and len(set(negs)) == len(negs)
        assert set(negs) <= train and not set(negs) & catalog_test
    assert summary["train_products"] == len(train) and summary["neighbours"] == 5 * len(train)


def test_neighbours_equal_a_brute_force_cosine_top_n(mined):
    _, out, cfg = mined
    rows = [r for r in _published(cfg).to_pylist() if r["split"] == "train"]
    ids = [r["product_id"] for r in rows]
    emb = np.array([r["image_embedding"] for r in rows], np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = {r["product_id"]: r for r in pq.read_table(out).to_pylist()}
    for i, pid in enumerate(ids):
        sims = emb @ emb[i]
        ranked = sorted((j for j in range(len(ids)) if j != i), key=lambda j: -sims[j])
        expected = [ids[j] for j in ranked[:PER_PRODUCT]]
        assert got[pid]["negative_ids"] == expected, pid
        assert got[pid]["similarities"] == pytest.approx([sims[j] for j in ranked[:5]], abs=1e-5)
        assert got[pid]["similarities"] == sorted(got[pid]["similarities"], reverse=True)


def test_file_metadata_names_the_published_version(mined):
    summary, out, cfg = mined
    run = tables.published_run(tables.connect(cfg.index.uri))
    meta = read_negatives(str(out)).metadata
    assert meta["model_id"] == run["model_id"] == summary["model_id"]
    assert meta["products_table"] == run["products_table"]
    assert int(meta["table_version"]) == run["products_version"]
    assert meta["split"] == "train" and meta["per_product"] == str(PER_PRODUCT)
    assert datetime.fromisoformat(meta["created_at"]).tzinfo is not None
    assert out.with_name("negatives.config.resolved.yaml").is_file()


def test_cli_writes_the_default_file_and_a_summary(mined, tmp_path, capsys):
    _, _, cfg = mined
    before = tables.table_names(tables.connect(cfg.index.uri))
    assert main(["--index-uri", cfg.index.uri, "--per-product", "3", "mine.chunk_rows=7"]) == 0
    shown = capsys.readouterr().out
    run = tables.published_run(tables.connect(cfg.index.uri))
    default = (
        f"{cfg.index.uri}/{NEGATIVES_DIR}/negatives-{run['model_id']}-"
        f"v{run['products_version']}.parquet"
    )
    assert f"out          {default}" in shown and "per product  3" in shown
    negs = read_negatives(default)
    assert {len(n) for n in negs.neighbours.values()} == {3}
    # Top 3 of a chunked search are the first 3 of the top 5.
    five = read_negatives(str(mined[1])).neighbours
    assert all(negs.neighbours[p] == five[p][:3] for p in five)
    assert tables.table_names(tables.connect(cfg.index.uri)) == before  # the index is untouched


def test_cli_refuses_an_index_with_nothing_published(tmp_path, capsys):
    empty = tmp_path / "db"
    empty.mkdir()
    assert main(["--index-uri", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no published index at") and "index_catalog" in err
    assert not (empty / NEGATIVES_DIR).exists()
    assert main(["--index-uri", str(empty), "--per-product", "0"]) == 2
    assert "mine.per_product" in capsys.readouterr().err


def test_a_table_without_split_or_train_rows_is_refused():
    vec = pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32(), 2))
    with pytest.raises(MiningInputError, match="no 'split' column"):
        train_rows(pa.table({"product_id": ["a", "b"], "image_embedding": vec}))
    ids, emb = train_rows(
        pa.table({"product_id": ["a", "b"], "split": ["test", "train"], "image_embedding": vec})
    )
    assert ids == ["b"] and emb.tolist() == [[0.0, 1.0]]


# ---- fine-tuning with mined negatives ------------------------------------------------------------
def _weights(path) -> dict:
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval.from_pretrained(path, dtype=torch.float32).state_dict()


def _ft_cfg(model_dir, root, out_dir, mined_file, *extra):
    return load_config(
        None,
        [
            f"model.name_or_path={model_dir}", "model.device=cpu", DEMO_TITLE_COLUMNS,
            f"finetune.catalog={root / 'catalog'}", f"finetune.out_dir={out_dir}",
            f"finetune.mined_negatives={mined_file}", "finetune.batch_size=8",
            "finetune.eval_every=0", "finetune.log_every=1", *extra,
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def train_setup(mined, search_index, tiny_model_dir, tmp_path_factory):
    _, root = search_index
    cfg = _ft_cfg(tiny_model_dir, root, tmp_path_factory.mktemp("ft"), mined[1])
    rows = read_train_products(root / "catalog", cfg)
    model_id = load_model(tiny_model_dir, device="cpu", dtype="float32").model_id
    return cfg, rows, load_mined_neighbours(cfg, rows, model_id)


def test_batches_hold_each_anchors_mined_neighbour(train_setup):
    cfg, rows, mined = train_setup
    neighbours = mined["neighbours"]
    assert mined["anchors_with_neighbours"] == len(rows)
    sampler = MinedSampler(rows, neighbours, 8, 4, seed=0)
    assert sampler.per_epoch == -(-len(rows) // 4)
    ids = [r["product_id"] for r in rows]
    for epoch in range(2):
        anchors_seen = []
        for step in range(epoch * sampler.per_epoch, (epoch + 1) * sampler.per_epoch):
            chosen, pairs = sampler.plan(step)
            assert (chosen, pairs) == sampler.plan(step)  # the step alone decides
            batch_ids = [ids[i] for i in chosen]
            assert len(batch_ids) == 8 == len(set(batch_ids))
            n_anchors = min(4, len(rows) - (step % sampler.per_epoch) * 4)
            anchors = batch_ids[:n_anchors]
            anchors_seen += anchors
            for a in anchors:  # every anchor meets at least one of its mined neighbours
                assert set(neighbours[a]) & set(batch_ids), (step, a)
            expected = {
                (p, batch_ids.index(n))
                for p, pid in enumerate(batch_ids)
                for n in neighbours.get(pid, [])
                if n in batch_ids
            }
            assert set(pairs) == expected and len(pairs) == len(expected)
        assert sorted(anchors_seen) == sorted(ids)  # each product an anchor once per epoch
    assert sampler.plan(0) != MinedSampler(rows, neighbours, 8, 4, seed=1).plan(0)


def test_mined_weights_reach_the_itm_negative_sampling(train_setup, tiny_model):
    cfg, rows, mined = train_setup
    sampler = MinedSampler(rows, mined["neighbours"], 8, 4, seed=0)
    chosen, pairs = sampler.plan(0)
    batch = build_batch(tiny_model, [rows[i] for i in chosen], read_titles(cfg.finetune.catalog, cfg=demo_config()))
    batch.mined_pairs = pairs
    i2t, t2i = batch.mined_negatives(2.0)
    assert i2t.shape == (8, len(batch.texts)) and t2i.shape == (len(batch.texts), 8)
    rows_i = i2t.sum(dim=1)
    assert torch.allclose(rows_i[rows_i > 0], torch.tensor(2.0))
    temp = make_temperature(TEMP_INIT)
    mined_titles = {
        a: {t for t, tid in enumerate(batch.text_ids) for (a2, n) in pairs
            if a2 == a and tid == batch.image_ids[n]}
        for a, _ in pairs
    }  # fmt: skip
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        out = retrieval_train_step(
            tiny_model, batch, temp, generator=g, extra_negatives=batch.mined_negatives(1e6)
        )
        assert out["mined_share"] == 1.0
        for a, titles in mined_titles.items():
            assert int(out["negatives"].text_for_image[a]) in titles
        for t, tid in enumerate(batch.text_ids):  # each anchor title's negative: a neighbour image
            anchor = batch.image_ids.index(tid)
            to = {n for a2, n in pairs if a2 == anchor}
            if to:
                assert int(out["negatives"].image_for_text[t]) in to
    plain = retrieval_train_step(tiny_model, batch, temp, generator=torch.Generator())
    assert plain["mined_share"] is None


def test_finetune_with_mined_negatives_runs_checkpoints_and_resumes(
    mined, search_index, tiny_model_dir, tmp_path
):
    _, root = search_index
    common = ["finetune.steps=3", "finetune.mined_weight=1000000.0", "finetune.warmup_steps=1"]
    full = run_single(
        _ft_cfg(tiny_model_dir, root, tmp_path / "full", mined[1], *common), evaluate=False
    )
    assert full["steps"] == 3 and len(full["losses"]) == 3
    assert full["last"]["mined_share"] == 1.0  # the huge weight: every mined row got a mined one
    assert full["mined"]["model_id"] == full["initial_model_id"]
    assert (tmp_path / "full" / "last" / TRAINER_STATE).is_file()
    state = torch.load(tmp_path / "full" / "last" / TRAINER_STATE, weights_only=False)
    assert state["step"] == 3 and state["settings"]["mined_weight"] == 1e6
    assert load_model(tmp_path / "full" / "last", device="cpu").model_id == full["model_id"]

    # Resume: 2 steps, stop, then step 3 from last/ equals the uninterrupted run (same batches,
    # same mined pairs, same negatives). Plain SGD: the CPU kernels here are not always
    # bit-reproducible (~1e-7 between two identical runs), and AdamW's first steps blow such
    # noise up on near-zero gradients, which would hide what this compares.
    sgd = {"optimizer": "sgd", "lr": 0.05}
    ref_cfg = _ft_cfg(tiny_model_dir, root, tmp_path / "ref", mined[1], *common)
    ref = run_single(ref_cfg, evaluate=False, settings=train_settings(ref_cfg).replace(**sgd))
    cfg = _ft_cfg(tiny_model_dir, root, tmp_path / "split", mined[1], *common)
    first = run_single(
        cfg, evaluate=False, settings=train_settings(cfg).replace(**sgd), stop_at=2
    )
    assert first["steps"] == 2
    second = run_single(cfg, evaluate=False, settings=train_settings(cfg).replace(**sgd))
    assert second["start_step"] == 2
    assert first["losses"] + second["losses"] == pytest.approx(ref["losses"], abs=1e-6)
    a, b = _weights(tmp_path / "ref" / "last"), _weights(tmp_path / "split" / "last")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_mined_files_outside_train_or_from_another_model_are_refused_or_warned(
    train_setup, search_index, tmp_path, caplog
):
    cfg, rows, _ = train_setup
    good = pq.read_table(cfg.finetune.mined_negatives)
    test_id = next(
        r["product_id"]
        for r in pq.read_table(search_index[1] / "catalog" / "pairs.parquet").to_pylist()
        if r["split"] == "test"
    )
    negs = good.column("negative_ids").to_pylist()
    negs[0] = [test_id, *negs[0][1:]]
    bad = good.set_column(1, "negative_ids", pa.array(negs, pa.list_(pa.string())))
    pq.write_table(bad.replace_schema_metadata(good.schema.metadata), tmp_path / "bad.parquet")
    bad_cfg = cfg.model_copy(
        update={"finetune": cfg.finetune.model_copy(
            update={"mined_negatives": str(tmp_path / "bad.parquet")})}
    )  # fmt: skip
    with pytest.raises(TrainSplitError, match=test_id):
        load_mined_neighbours(bad_cfg, rows, good.schema.metadata[b"model_id"].decode())

    meta = {**good.schema.metadata, b"model_id": b"hf_blip-0000000000000000"}
    pq.write_table(good.replace_schema_metadata(meta), tmp_path / "other.parquet")
    other_cfg = cfg.model_copy(
        update={"finetune": cfg.finetune.model_copy(
            update={"mined_negatives": str(tmp_path / "other.parquet")})}
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pipelines.training.mined"):
        got = load_mined_neighbours(other_cfg, rows, good.schema.metadata[b"model_id"].decode())
    assert got["anchors_with_neighbours"] == len(rows)
    assert "hf_blip-0000000000000000" in caplog.text and "embedding space" in caplog.text

    # Ray Train (workers > 1) is refused at load time, naming the keys.
    with pytest.raises(ConfigError, match="single process only"):
        load_config(
            None, [f"finetune.mined_negatives={tmp_path / 'other.parquet'}", "finetune.workers=2"]
        )
    with pytest.raises(ConfigError, match="mined_per_batch"):
        load_config(
            None,
            [f"finetune.mined_negatives={tmp_path / 'x.parquet'}", "finetune.mined_per_batch=9"],
        )
