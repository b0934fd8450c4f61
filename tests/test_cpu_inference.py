"""CPU inference settings: dynamic int8 text side (``model.cpu_quantize``), bfloat16 matrix
products (``model.cpu_bf16``; both blip_ops/quantize.py) and torch threads per Ray worker
(pipelines/runtime/threads.py)."""

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

from blip_ops import load_model, quantize
from blip_ops.quantize import (
    Bf16Linear,
    apply_cpu_quantize,
    apply_cpu_settings,
    bf16_text_side,
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
# The bfloat16 text side against float32, same inputs. Observed: embedding cosine >= 0.99997,
# title-image cosines within 0.0006, ITM logits within 0.0011; 10-20x room.
BF16_MIN_EMBEDDING_COSINE = 0.999
BF16_SIM_ATOL = 0.01
BF16_ITM_ATOL = 0.02


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


@pytest.fixture(scope="module")
def compact_bf16(compact_pair):
    """The float model of ``compact_pair`` with a bfloat16 text side."""
    model = copy.deepcopy(compact_pair[0])
    bf16_text_side(model)
    return model


def test_bf16_scores_close_to_float(compact_pair, compact_bf16, demo_catalog):
    ref, bf16 = compact_pair[0], compact_bf16
    images, titles = demo_catalog
    enc = ref.encode_images(images, return_tokens=True)
    assert torch.equal(bf16.encode_images(images).embeddings, enc.embeddings)
    text_f, text_b = ref.encode_texts(titles), bf16.encode_texts(titles)
    assert text_b.dtype == torch.float32
    assert (text_f * text_b).sum(-1).min() >= BF16_MIN_EMBEDDING_COSINE
    assert (text_f @ enc.embeddings.T - text_b @ enc.embeddings.T).abs().max() <= BF16_SIM_ATOL
    for title in titles[::3]:
        itm_f, itm_b = ref.itm_scores(title, enc.tokens), bf16.itm_scores(title, enc.tokens)
        assert itm_b.dtype == torch.float32
        assert (itm_f - itm_b).abs().max() <= BF16_ITM_ATOL
    assert not torch.equal(text_f, text_b)  # it did multiply in bfloat16


def test_only_the_text_side_multiplies_in_bf16(compact_bf16):
    net = compact_bf16.model
    assert quantization_of(compact_bf16) == "bf16-matmul"
    assert not any(type(m) is nn.Linear for m in net.text_encoder.modules())
    swapped = [m for m in net.text_encoder.modules() if isinstance(m, Bf16Linear)]
    assert len(swapped) == 10 * len(net.text_encoder.encoder.layer)  # self 4, cross 4, FFN 2
    assert all(m.weight.dtype == torch.bfloat16 for m in swapped)
    assert isinstance(net.text_proj, Bf16Linear) and isinstance(net.itm_head, Bf16Linear)
    assert type(net.vision_proj) is nn.Linear and not any(
        isinstance(m, Bf16Linear) for m in net.vision_model.modules()
    )
    assert compact_bf16.dtype == torch.float32
    assert bf16_text_side(compact_bf16) == 0  # a second call leaves it as it is


def _plain_model(device: str = "cpu", dtype=torch.float32):
    net = nn.Module()
    net.text_encoder = nn.Sequential(nn.Linear(4, 4))
    net.vision_proj = nn.Linear(4, 4)
    return SimpleNamespace(device=torch.device(device), dtype=dtype, model_id="m-2", model=net)


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-matmul"), (False, "none")])
def test_cpu_bf16_auto_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: native)
    model = _plain_model()
    assert apply_cpu_settings(model, quantize=False, bf16="auto") == expected
    assert isinstance(model.model.text_encoder[0], Bf16Linear) is native
    assert type(model.model.vision_proj) is nn.Linear


def test_cpu_bf16_true_applies_without_native_units_and_false_never(monkeypatch):
    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: False)
    assert apply_cpu_settings(_plain_model(), quantize=False, bf16=True) == "bf16-matmul"
    assert apply_cpu_settings(_plain_model(), quantize=False, bf16=False) == "none"
    with pytest.raises(ValueError, match="cpu_bf16 must be true, false or 'auto', got 'yes'"):
        apply_cpu_settings(_plain_model(), quantize=False, bf16="yes")


def test_cpu_bf16_is_ignored_on_cuda_and_under_int8(caplog):
    with caplog.at_level(logging.INFO, logger="blip_ops.quantize"):
        cuda = _plain_model("cuda:0", torch.bfloat16)
        assert apply_cpu_settings(cuda, quantize=False, bf16=True) == "none"
        assert "cpu_bf16 ignored for m-2" in caplog.text and "cuda:0" in caplog.text
        both = _plain_model()
        assert apply_cpu_settings(both, quantize=True, bf16=True) == "dynamic-int8"
    assert "cpu_quantize makes the text side int8" in caplog.text
    assert type(cuda.model.text_encoder[0]) is nn.Linear


def test_cpu_has_native_bf16_reads_the_cpu_probes(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert quantize.cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert quantize.cpu_has_native_bf16() is torch.backends.mkldnn.is_available()


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
    bf16 = load_model(tiny_model_dir, device="cpu", dtype="float32", cpu_bf16=True)
    assert quantization_of(quant) == "dynamic-int8" and quantization_of(ref) == "none"
    assert quantization_of(bf16) == "bf16-matmul" and bf16.model_id == ref.model_id
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


def test_config_has_cpu_bf16_auto_by_default():
    from pipelines.config import load_config

    assert load_config(None, []).model.cpu_bf16 == "auto"
    assert load_config(None, ["model.cpu_bf16=false"]).model.cpu_bf16 is False
    args = load_config(None, ["model.cpu_bf16=true"]).model.query_load_args()
    assert args["cpu_bf16"] is True and args["cpu_quantize"] is False
