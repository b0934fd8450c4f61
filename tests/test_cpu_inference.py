"""CPU inference settings: dynamic int8 text side (``model.cpu_quantize``, blip_ops/quantize.py)
and torch threads per Ray worker (pipelines/runtime/threads.py)."""

from __future__ import annotations

import copy
import io
import logging
import subprocess
import sys
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from blip_ops import load_model
from blip_ops.quantize import (
    apply_cpu_quantize,
    cpu_quantize_applies,
    quantization_of,
    quantize_text_side,
)
from pipelines.runtime.threads import configure_torch_threads, ray_reserved_cpus, threads_for

# Tolerances of the int8 text side against float32 on the demo catalog's 12 titles (fresh compact
# model: pretrained MiniLM text tower, fresh heads). Observed: embedding cosine >= 0.98, title-image
# cosines within 0.014 (their spread: 0.04), ITM logits within 0.022; the bounds leave 2-3x room.
MIN_EMBEDDING_COSINE = 0.95  # each title's int8 ITC embedding against its float one
SIM_ATOL = 0.05  # title-image cosines
ITM_ATOL = 0.05  # ITM positive-class logits


@pytest.fixture(scope="module")
def demo_catalog(tmp_path_factory):
    """Four products of the demo catalog: their images and their titles in three languages."""
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("cpu_inference") / "catalog"
    make_catalog(str(root), 4, seed=0, workers=1)
    rows = pq.read_table(root / "products").to_pylist()
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
    titles = [r[c] for r in rows for c in ("title_en", "title_zh", "title_pinyin")]
    return images, titles


@pytest.fixture(scope="module")
def compact_pair():
    """(float32, int8 text side) of one fresh compact model (pretrained MiniLM + CNN)."""
    from blip_ops.compact_model import CompactBlipModel

    ref = CompactBlipModel.build(seed=0)
    quant = copy.deepcopy(ref)
    quantize_text_side(quant)
    return ref, quant


def test_quantized_scores_close_to_float(compact_pair, demo_catalog):
    ref, quant = compact_pair
    images, titles = demo_catalog
    enc = ref.encode_images(images, return_tokens=True)
    # The vision tower stays float: the index's image embeddings are what the int8 model sees.
    assert torch.equal(quant.encode_images(images).embeddings, enc.embeddings)
    text_f, text_q = ref.encode_texts(titles), quant.encode_texts(titles)
    assert (text_f * text_q).sum(-1).min() >= MIN_EMBEDDING_COSINE
    sims_f, sims_q = text_f @ enc.embeddings.T, text_q @ enc.embeddings.T
    assert (sims_f - sims_q).abs().max() <= SIM_ATOL
    for title in titles[::3]:
        itm_f, itm_q = ref.itm_scores(title, enc.tokens), quant.itm_scores(title, enc.tokens)
        assert (itm_f - itm_q).abs().max() <= ITM_ATOL
    assert not torch.equal(text_f, text_q)  # it did quantise


def test_only_the_text_side_is_quantized(compact_pair):
    ref, quant = compact_pair
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    net = quant.model
    assert quantization_of(quant) == "dynamic-int8" and quantization_of(ref) == "none"
    float_left = {n for n, m in net.text_encoder.named_modules() if type(m) is nn.Linear}
    layers = len(net.text_encoder.encoder.layer)
    # Only the feed-forward down-projections stay float (their GELU inputs quantise badly).
    assert float_left == {f"encoder.layer.{i}.output.dense" for i in range(layers)}
    assert isinstance(net.text_proj, dynamic) and isinstance(net.itm_head, dynamic)
    layer = net.text_encoder.encoder.layer[0]
    for linear in (
        layer.crossattention.self.key, layer.crossattention.output.dense,
        layer.attention.self.query, layer.attention.output.dense, layer.intermediate.dense,
    ):  # fmt: skip
        assert isinstance(linear, dynamic)
    for part in (net.vision_model, net.vision_proj):
        assert not any(isinstance(m, dynamic) for m in part.modules())
    assert type(net.vision_proj) is nn.Linear
    assert quant.dtype == torch.float32  # activations stay float: cached tokens need no change
    assert quantize_text_side(quant) == 0  # a second call leaves it as it is


def test_fusion_layers_keep_their_feed_forward_down_projections_float():
    from blip_ops.compact_network import CompactBlipConfig, CompactBlipForRetrieval
    from blip_ops.quantize import feed_forward_down_projections

    with torch.device("meta"):  # the layout only: no weights
        net = CompactBlipForRetrieval(CompactBlipConfig(fusion_layers=2))
    names = feed_forward_down_projections(net, ["text_encoder", "fusion", "text_proj"])
    text = [f"text_encoder.encoder.layer.{i}.output.dense" for i in range(6)]
    assert names == [*text, "fusion.0.output.dense", "fusion.1.output.dense"]


def test_model_id_unchanged_by_quantisation(tiny_model_dir):
    ref = load_model(tiny_model_dir, device="cpu", dtype="float32")
    quant = load_model(tiny_model_dir, device="cpu", dtype="float32", cpu_quantize=True)
    assert quantization_of(quant) == "dynamic-int8" and quantization_of(ref) == "none"
    assert quant.model_id == ref.model_id
    assert isinstance(quant.model.itm_head, torch.ao.nn.quantized.dynamic.Linear)
    assert type(quant.model.text_encoder.encoder.layer[0].output.dense) is nn.Linear


@pytest.mark.parametrize(
    ("device", "dtype", "applies"),
    [
        ("cpu", torch.float32, True),
        ("cuda", torch.float32, False),
        ("cuda:1", torch.bfloat16, False),
        ("cpu", torch.bfloat16, False),
    ],
)
def test_cpu_quantize_applies_on_cpu_float32_only(device, dtype, applies):
    ok, why_not = cpu_quantize_applies(device, dtype)
    assert ok is applies
    assert (why_not == "") is applies


def test_cpu_quantize_is_ignored_on_cuda(caplog):
    net = nn.Sequential(nn.Linear(4, 4))
    model = SimpleNamespace(
        device=torch.device("cuda:0"), dtype=torch.bfloat16, model_id="m-1", model=net
    )
    with caplog.at_level(logging.INFO, logger="blip_ops.quantize"):
        assert apply_cpu_quantize(model, True) is False
    assert "cpu_quantize ignored for m-1" in caplog.text and "cuda:0" in caplog.text
    assert type(net[0]) is nn.Linear and quantization_of(model) == "none"
    assert apply_cpu_quantize(model, False) is False
    with pytest.raises(ValueError, match="runs on a CPU; the model is on cuda:0"):
        quantize_text_side(model)


def test_configure_torch_threads_sets_intra_op_threads():
    before = torch.get_num_threads()
    try:
        assert configure_torch_threads(0.5) == 1 and torch.get_num_threads() == 1
        assert configure_torch_threads(2.9) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_configure_torch_threads_sets_one_interop_thread_in_a_fresh_process():
    code = (
        "import torch; from pipelines.runtime.threads import configure_torch_threads as c; "
        "n = c(3); print(n, torch.get_num_threads(), torch.get_num_interop_threads())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["3", "3", "1"]


@pytest.mark.parametrize(
    ("num_cpus", "error"),
    [(-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     (True, TypeError), ("2", TypeError), (None, TypeError)],
)  # fmt: skip
def test_threads_for_rejects_what_is_not_a_cpu_count(num_cpus, error):
    with pytest.raises(error, match=r"num_cpus must be .*, got"):
        threads_for(num_cpus)


def test_threads_for_rounds_down_to_at_least_one():
    assert [threads_for(n) for n in (0, 0.25, 1, 1.5, 4)] == [1, 1, 1, 1, 4]


def test_ray_reserved_cpus_outside_ray_is_the_default():
    assert ray_reserved_cpus(default=3.0) == 3.0


def test_config_has_cpu_quantize_off_by_default():
    from pipelines.config import load_config

    assert load_config(None, []).model.cpu_quantize is False
    assert load_config(None, ["model.cpu_quantize=true"]).model.cpu_quantize is True
