"""CPU inference settings of a loaded model's text side, for query serving on a CPU: dynamic int8
quantisation (``cpu_quantize``) or bfloat16 matrix products (``cpu_bf16``).

``torch.ao.quantization.quantize_dynamic`` stores each ``nn.Linear`` weight as int8 (one scale per
output channel) and quantises its input per call, so most matmuls of the text tower, of the
cross-attention that ITM runs and of the heads run in int8, while every activation stays float32
(``model.dtype`` is unchanged; cached image tokens need no conversion).

What is quantised: ``text_encoder`` (self-attention, cross-attention, feed-forward up-projection),
the compact family's ``fusion`` layers, ``text_proj`` and ``itm_head``. What stays float, and why:

- each layer's feed-forward down-projection (``output.dense``, 1536 -> 384 in MiniLM): its input is
  the GELU output, whose long tail one int8 scale per call rounds badly. Quantised, text→product
  ITC R@1 of the fine-tuned compact model fell 1.9 points on 4,140 train-split titles; kept float,
  0.4 (benchmarks/bench_cpu_settings.py has the val figures);
- the vision tower and ``vision_proj``. The index job writes the image embeddings and ITM tokens
  that queries are scored against; they must be the same numbers whichever replica reads them,
  and the compact image tower is a CNN whose convolutions ``quantize_dynamic`` does not cover.

A quantised text tower therefore moves the query side only, and :func:`load_model`'s model_id
(digested from the float checkpoint before this runs) stays the checkpoint's, so a published
index still matches. CUDA and non-float32 runs are left as they are (logged): dynamic int8 kernels
are CPU kernels, and a GPU gains nothing from them.

``cpu_bf16`` swaps the same modules' nn.Linear layers for :class:`Bf16Linear`: the weight is kept in
bfloat16 and each product runs in bfloat16 with float32 accumulation (oneDNN, on AMX or AVX512-BF16
units where the CPU has them), while the input and output, the residual stream, layer norms,
softmax and GELU stay float32. Where the CPU multiplies bfloat16 natively this is 2-3x faster
than float32 for ITM; elsewhere bfloat16 is emulated and slower, so ``"auto"`` turns it on only
on such CPUs (:func:`cpu_has_native_bf16`).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from blip_ops.family import RetrievalModel

logger = logging.getLogger(__name__)

# Submodules of the network (``RetrievalModel.model``) whose nn.Linear layers are quantised; those
# a family lacks (``fusion`` outside the compact ALBEF layout) are skipped.
TEXT_SIDE_MODULES = ("text_encoder", "fusion", "text_proj", "itm_head")
QUANTIZATION = "dynamic-int8"  # what ``model.quantization`` says once quantised
BF16 = "bf16-matmul"  # ... once its text side multiplies in bfloat16


def quantization_of(model: RetrievalModel) -> str:
    """``"dynamic-int8"`` for a model :func:`quantize_text_side` changed, ``"bf16-matmul"`` for one
    :func:`bf16_text_side` changed, else ``"none"``."""
    return getattr(model, "quantization", "none")


def cpu_quantize_applies(device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
    """(whether the CPU settings, ``cpu_quantize`` and ``cpu_bf16``, apply to a model on
    ``device`` in ``dtype``, why not)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return False, f"the model runs on {dev}; these settings swap in CPU kernels"
    if dtype != torch.float32:
        return False, f"the model runs in {dtype}; these settings replace float32 nn.Linear only"
    return True, ""


def apply_cpu_quantize(model: RetrievalModel, enabled: bool) -> bool:
    """Quantise ``model``'s text side in place when ``enabled`` and it runs on a CPU in float32;
    returns whether it did. Elsewhere the request is logged and ignored."""
    if not enabled:
        return False
    applies, why_not = cpu_quantize_applies(model.device, model.dtype)
    if not applies:
        logger.info("cpu_quantize ignored for %s: %s", model.model_id, why_not)
        return False
    quantize_text_side(model)
    return True


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16) and torch's
    oneDNN backend is there to use it."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    native = any(getattr(cpu, name, lambda: False)() for name in probes)
    return bool(native and torch.backends.mkldnn.is_available())


def apply_cpu_settings(model: RetrievalModel, *, quantize: bool, bf16: bool | str) -> str:
    """Apply ``cpu_quantize`` and ``cpu_bf16`` (``True``, ``False`` or ``"auto"``: on where
    :func:`cpu_has_native_bf16`) to a loaded model; returns :func:`quantization_of` after. int8
    wins over an explicit ``bf16=True`` (logged); neither applies off a float32 CPU model."""
    if quantize:
        if bf16 is True:
            logger.info(
                "cpu_bf16 ignored for %s: cpu_quantize makes the text side int8", model.model_id
            )
        apply_cpu_quantize(model, True)
        return quantization_of(model)
    if bf16 not in (True, False, "auto"):
        raise ValueError(f"cpu_bf16 must be true, false or 'auto', got {bf16!r}")
    if bf16 is False:
        return quantization_of(model)
    applies, why_not = cpu_quantize_applies(model.device, model.dtype)
    if applies and bf16 == "auto" and not cpu_has_native_bf16():
        applies, why_not = False, "this CPU has no native bfloat16 (AMX or AVX512-BF16) units"
    if not applies:
        log = logger.info if bf16 is True else logger.debug
        log("cpu_bf16 ignored for %s: %s", model.model_id, why_not)
        return quantization_of(model)
    bf16_text_side(model)
    return quantization_of(model)


class Bf16Linear(nn.Module):
    """An inference-only nn.Linear whose product runs in bfloat16: the weight and bias are stored
    in bfloat16, the input is cast in and the output cast back to the input's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16)
        self.register_buffer("weight", weight)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16"


def bf16_text_side(model: RetrievalModel) -> int:
    """Swap every nn.Linear of :data:`TEXT_SIDE_MODULES` for a :class:`Bf16Linear`, in place;
    returns how many were swapped. The vision tower stays as it is (see the module's notes)."""
    if quantization_of(model) != "none":
        return 0
    net = _network(model)
    parts = [name for name in TEXT_SIDE_MODULES if getattr(net, name, None) is not None]
    swapped = 0
    for part in parts:
        module = getattr(net, part)
        if isinstance(module, nn.Linear):
            setattr(net, part, Bf16Linear(module))
            swapped += 1
            continue
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Bf16Linear(child))
                    swapped += 1
    model.quantization = BF16
    logger.info(
        "%s: %d nn.Linear of %s multiply in bfloat16 (%s); the vision tower stays %s",
        model.model_id, swapped, "/".join(parts), BF16, model.dtype,
    )  # fmt: skip
    return swapped


def _network(model: RetrievalModel) -> nn.Module:
    net = getattr(model, "model", None)
    if not isinstance(net, nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no torch network in .model (got {type(net).__name__})"
        )
    if model.device.type != "cpu":
        raise ValueError(f"this runs on a CPU; the model is on {model.device}")
    return net


def quantize_text_side(model: RetrievalModel) -> int:
    """Swap the nn.Linear layers of :data:`TEXT_SIDE_MODULES` but the feed-forward
    down-projections for dynamic int8 ones, in place; returns how many were swapped. The model
    must be on a CPU (see :func:`apply_cpu_quantize`)."""
    if quantization_of(model) != "none":
        return 0  # quantising again would try to quantise int8 layers
    net = _network(model)
    parts = [name for name in TEXT_SIDE_MODULES if getattr(net, name, None) is not None]
    kept = feed_forward_down_projections(net, parts)
    linears = sum(isinstance(m, nn.Linear) for name in parts for m in getattr(net, name).modules())
    _quantize_linears(net, parts, kept)
    model.quantization = QUANTIZATION
    swapped = linears - len(kept)
    logger.info(
        "%s: %d nn.Linear of %s quantised (%s, %s engine); %d feed-forward down-projections and "
        "the vision tower stay %s",
        model.model_id, swapped, "/".join(parts), QUANTIZATION, torch.backends.quantized.engine,
        len(kept), model.dtype,
    )  # fmt: skip
    return swapped


def feed_forward_down_projections(net: nn.Module, parts: list[str]) -> list[str]:
    """Names (in ``net``) of the feed-forward down-projection of every transformer layer inside
    ``parts``: ``<layer>.output.dense`` of a layer that has an ``intermediate`` (up) block. The
    attention blocks' own ``output.dense`` are not among them."""
    names = []
    for part in parts:
        for name, module in getattr(net, part).named_modules(prefix=part):
            dense = getattr(getattr(module, "output", None), "dense", None)
            if hasattr(module, "intermediate") and isinstance(dense, nn.Linear):
                names.append(f"{name}.output.dense")
    return names


def _quantize_linears(net: nn.Module, parts: list[str], kept: list[str]) -> None:
    """Every nn.Linear inside the submodules ``parts`` of ``net`` but those named in ``kept`` made
    int8-dynamic, in place.

    The parts are named to ``quantize_dynamic`` rather than passed to it one by one: it swaps the
    children of the module it gets, so a bare nn.Linear part (``text_proj``) would stay float.
    """
    ao = getattr(torch, "ao", None)
    quantize_dynamic = getattr(getattr(ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic; "
            "run with model.cpu_quantize=false"
        )
    # One scale per output channel (the down-projections float): ITC R@1 moved -0.4 points on
    # 4,140 train-split titles and -0.2 on 606 val titles; one scale per tensor: +0.2 and -1.8.
    qconfig = ao.quantization.per_channel_dynamic_qconfig
    spec = {**dict.fromkeys(parts, qconfig), **dict.fromkeys(kept)}  # None: left float
    # Named parts get the qconfig for every type quantize_dynamic knows, nn.Embedding included
    # (which it then refuses: embeddings need a weight-only qconfig); the mapping keeps nn.Linear.
    mapping = {nn.Linear: ao.nn.quantized.dynamic.Linear}
    with warnings.catch_warnings():
        # torch marks the eager quantisation API deprecated (torchao is its successor) but still
        # ships and runs it; the warning would repeat on every replica start.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        quantize_dynamic(net, spec, dtype=torch.qint8, mapping=mapping, inplace=True)
