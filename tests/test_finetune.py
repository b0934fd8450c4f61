"""Fine-tuning: the loop (checkpoints, resume), the train-only rule, and Ray Train's gradient sync."""

from __future__ import annotations

import pytest
import torch

from blip_ops import load_model
from blip_ops.losses import first_candidate_negatives
from blip_ops.train_loop import TRAINER_STATE, TrainSettings, fit
from blip_ops.training import RetrievalBatch
from pipelines.config import load_config
from pipelines.training.batches import build_batch
from pipelines.training.data import read_titles, read_train_products
from pipelines.training.distributed import run_ray
from pipelines.training.runners import run_single
from pipelines.training.samplers import EpochSampler
from pipelines.training.splits import TrainSplitError, check_train_only
from tests.conftest import DEMO_TITLE_COLUMNS, demo_config


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("ft") / "catalog"
    make_catalog(str(root), 24, seed=1, workers=1)  # 19 train, 2 val, 3 test products
    return root


def _cfg(model_dir, catalog, out_dir, *extra):
    return load_config(
        None,
        [
            f"model.name_or_path={model_dir}", "model.device=cpu", DEMO_TITLE_COLUMNS,
            f"finetune.catalog={catalog}", f"finetune.out_dir={out_dir}",
            "finetune.batch_size=4", "finetune.eval_k_test=4", "finetune.log_every=1",
            *extra,
        ],
    )  # fmt: skip


def _s3_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _weights(path):
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval.from_pretrained(path, dtype=torch.float32).state_dict()


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


# ---- the loop -------------------------------------------------------------------------------------
def test_loss_decreases_on_a_fixed_batch(tiny_model_dir, catalog):
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    rows = read_train_products(catalog, demo_config())[:4]
    batch = build_batch(model, rows, read_titles(catalog, cfg=demo_config()))
    settings = TrainSettings(
        steps=8, lr=1e-3, weight_decay=0.0, warmup_steps=0, grad_clip=1.0, negatives="random"
    )
    out = fit(model, lambda step: batch, settings, log=None)
    losses = out["losses"]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_checkpoints_load_and_resume_equals_an_uninterrupted_run(tiny_model_dir, catalog, tmp_path):
    common = ["finetune.steps=4", "finetune.eval_every=2", "finetune.negatives=random",
              "finetune.warmup_steps=1", "finetune.lr=0.001"]  # fmt: skip
    full = run_single(_cfg(tiny_model_dir, catalog, tmp_path / "full", *common))
    assert full["steps"] == 4 and full["start_step"] == 0
    assert [h["step"] for h in full["history"]] == [2, 4]
    for name in ("best", "last"):
        saved = load_model(tmp_path / "full" / name, device="cpu", dtype="float32")
        assert saved.model_id.startswith("hf_blip-")
    last = load_model(tmp_path / "full" / "last", device="cpu", dtype="float32")
    assert last.model_id == full["model_id"] != full["initial_model_id"]
    assert (tmp_path / "full" / "last" / "finetune.config.resolved.yaml").is_file()
    state = torch.load(tmp_path / "full" / "last" / TRAINER_STATE, weights_only=False)
    assert state["step"] == 4 and state["optimizer"]["state"]

    # 2 steps, stop; then a second run resumes from last/ and does steps 3 and 4.
    cfg = _cfg(tiny_model_dir, catalog, tmp_path / "split", *common)
    first = run_single(cfg, stop_at=2)
    assert first["steps"] == 2
    assert torch.load(tmp_path / "split" / "last" / TRAINER_STATE, weights_only=False)["step"] == 2
    second = run_single(cfg)
    assert second["start_step"] == 2 and second["steps"] == 4
    assert second["losses"] == pytest.approx(full["losses"][2:], abs=1e-6)
    _assert_same_weights(
        _weights(tmp_path / "split" / "last"), _weights(tmp_path / "full" / "last"), 1e-6
    )
    resumed = torch.load(tmp_path / "split" / "last" / TRAINER_STATE, weights_only=False)
    assert resumed["temperature"] == pytest.approx(state["temperature"], abs=1e-7)
    for key, a in state["optimizer"]["state"].items():
        b = resumed["optimizer"]["state"][key]
        assert torch.allclose(a["exp_avg"], b["exp_avg"], atol=1e-6)
    assert second["model_id"] == full["model_id"]


# ---- train split only -----------------------------------------------------------------------------
def test_batches_hold_train_products_only(tiny_model_dir, catalog):
    import pyarrow.parquet as pq

    pairs = pq.read_table(catalog / "pairs.parquet").to_pylist()
    test_ids = {p["product_id"] for p in pairs if p["split"] == "test"}
    assert test_ids, "the catalog must have test products for this test to mean anything"
    rows = read_train_products(catalog, demo_config())
    sampler = EpochSampler(rows, 4, seed=0)
    seen = set()
    for step in range(sampler.per_epoch * 3):
        ids = {r["product_id"] for r in sampler.rows_for(step)}
        assert not ids & test_ids
        seen |= ids
    assert seen == {r["product_id"] for r in rows}
    assert not set(read_titles(catalog, cfg=demo_config())) & test_ids
    # A test row that slipped in is refused, not trained on.
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    with pytest.raises(TrainSplitError):
        check_train_only([*rows[:2], {"product_id": "x", "split": "test"}])
    with pytest.raises(TrainSplitError):
        build_batch(model, [{**rows[0], "split": "test"}, rows[1]], read_titles(catalog, cfg=demo_config()))


# ---- Ray Train: 2 workers on different shards == one process on the union ------------------------
@pytest.mark.timeout(360)
def test_two_ray_workers_average_gradients_and_resume(
    tiny_model_dir, catalog, tmp_path, ray_local, s3_server, s3_bucket
):
    sgd = {"optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 0.0}
    out = tmp_path / "ray"
    storage = f"s3://{s3_bucket}/ray-train"
    cfg = _cfg(
        tiny_model_dir, catalog, out, "finetune.workers=2", "finetune.cpus_per_worker=0.5",
        "finetune.steps=1", "finetune.eval_every=0", "finetune.negatives=random",
        f"finetune.storage_path={storage}", f"s3.endpoint_url={s3_server}", "s3.allow_http=true",
        "s3.region=us-east-1",
    )  # fmt: skip
    summary = run_ray(cfg, evaluate=False, fit_overrides=sgd, first_negatives=True, shuffle=False)
    assert summary["steps"] == 1 and summary["workers"] == 2
    # The checkpoint went to the S3 storage path through ray.train.report; out/last is its copy.
    assert summary["checkpoint"].startswith(f"{s3_bucket}/ray-train/{summary['run_name']}/")
    assert summary["storage_path"] == storage
    stored = _s3_keys(s3_server, s3_bucket, "ray-train/")
    assert any(k.endswith("/trainer_state.pt") for k in stored), stored
    shard0, shard1 = (ranks[0] for ranks in summary["shards"])
    assert len(shard0) == len(shard1) == 2 and not set(shard0) & set(shard1), (shard0, shard1)
    distributed = _weights(out / "last")

    rows = {r["product_id"]: r for r in read_train_products(catalog, demo_config())}
    titles = read_titles(catalog, load_model(tiny_model_dir, device="cpu").normalize_text, demo_config())

    def one_step(ids) -> dict:
        model = load_model(tiny_model_dir, device="cpu", dtype="float32")
        batch = build_batch(model, [rows[i] for i in ids], titles)
        settings = TrainSettings(steps=1, negatives="random", **sgd)
        fit(model, lambda step: batch, settings, log=None, negative_sampler=first_candidate_negatives)
        return {k: v.detach().clone() for k, v in model.model.state_dict().items()}

    union = one_step(shard0 + shard1)  # rank order: what the gathered pool holds
    _assert_same_weights(distributed, union, 1e-5)
    # Without averaging, rank 0 would hold a step on its own shard: far from the union step.
    alone = one_step(shard0)
    worst = max((alone[k] - union[k]).abs().max().item() for k in union)
    assert worst > 1e-3

    # Resume on Ray Train: a second run of the same name with steps=2 continues from the latest
    # checkpoint in S3 (step 1, ray.train.get_checkpoint), its workers skip the batch they
    # already trained on, and rank 0 evaluates on the val split.
    import shutil

    shutil.copytree(out / "last", tmp_path / "reference" / "last")
    shutil.rmtree(out)  # nothing local: the resume reads the storage path
    resumed = run_ray(
        cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"steps": 2, "eval_every": 1})}),
        evaluate=True, fit_overrides=sgd, first_negatives=True, shuffle=False,
    )  # fmt: skip
    assert resumed["start_step"] == 1 and resumed["steps"] == 2
    assert [h["step"] for h in resumed["history"]] == [2]
    assert 0.0 <= resumed["history"][0]["mean"] <= 1.0
    next0, next1 = (ranks[0] for ranks in resumed["shards"])
    assert resumed["best_dir"] == str(out / "best") and (out / "best").is_dir()
    assert not set(next0) & set(next1)
    assert (next0, next1) != (shard0, shard1), "the resumed workers restarted the data stream"
    state = torch.load(out / "last" / TRAINER_STATE, weights_only=False)
    assert state["step"] == 2

    # The same second step in one process from the same checkpoint, on the union of the batches.
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    batch = build_batch(model, [rows[i] for i in next0 + next1], titles)
    settings = TrainSettings(steps=2, negatives="random", out_dir=tmp_path / "reference", **sgd)
    single = fit(
        model, lambda step: batch, settings, log=None, negative_sampler=first_candidate_negatives
    )
    assert single["start_step"] == 1
    _assert_same_weights(_weights(out / "last"), _weights(tmp_path / "reference" / "last"), 1e-5)


def test_retrieval_batch_from_build_batch_is_consistent(tiny_model, catalog):
    rows = read_train_products(catalog, demo_config())[:3]
    batch = build_batch(tiny_model, rows, read_titles(catalog, cfg=demo_config()))
    assert isinstance(batch, RetrievalBatch)
    assert batch.pixel_values.shape[0] == 3 and len(batch.texts) == len(batch.text_ids)
    assert set(batch.text_ids) == set(batch.image_ids)
