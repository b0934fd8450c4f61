"""Model-only throughput of a BLIP retrieval model: vision tower, text encoder, ITM re-rank.

    python benchmarks/model_throughput.py [--model PATH|tiny|blip-base|blip-large] [--batch-size N ...]
        [--device D] [--dtype T] [--attention eager|sdpa|both] [--image-size S] [--iters N]
        [--warmup N] [--itm-candidates K] [--compile] [--json FILE]

No Ray, no decoding, no data loading: this module imports only torch, transformers, PIL, numpy and
the ``blip_ops`` core, so it runs on a bare GPU machine (python 3.12, torch 2.11, transformers 5.17).
Per (attention, batch size) it measures

- images/s: ``encode_images`` on random pixel tensors already on the device (preprocessing and
  JPEG decoding excluded: this is the ceiling the indexing pipeline can reach);
- texts/s: ``encode_texts`` on synthetic catalog titles, tokenisation included;
- ITM: ``itm_scores(one query, image tokens of K candidates)`` with the tokens precomputed, i.e. the
  re-rank cost per query when candidate tokens are cached (independent of the batch size).

``blip-base`` / ``blip-large`` are the published architectures with random weights (speed does not
depend on the weights), so no download is needed; ``blip_ops.tiny_model`` builds them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from blip_ops.attention import ATTENTION_KINDS, set_attention  # noqa: E402
from blip_ops.family import resolve_device, resolve_dtype  # noqa: E402
from blip_ops.tiny_model import ITM_QUERY, synthetic_titles  # noqa: E402

logger = logging.getLogger(__name__)

NAMED_MODELS = ("tiny", "blip-base", "blip-large")
ATTENTION_CHOICES = (*ATTENTION_KINDS, "both")
# Default batch sizes. On 2 CPU cores BLIP-base @384 fp32 takes ~0.7 s per image, so CPU stays small.
CUDA_BATCH_SIZES = (64, 128, 256, 512)
CPU_BATCH_SIZES = (8,)
DEFAULT_ITM_CANDIDATES = 32  # BLIP's re-rank depth is 128-256; 32 is the serving default here
# Dense bf16 matrix throughput of one H200 (NVIDIA's datasheet figure): the denominator of "% peak".
PEAK_TFLOPS = 790.0
# GFLOP per image for the published vision towers, keyed by (hidden, layers, patch, image size)
# (the H200 reference measurements). Anything else is estimated by _vision_gflop's formula.
ANCHOR_GFLOP = {(768, 12, 16, 384): 111.0, (1024, 24, 16, 384): 382.0}
# Figures every successful row carries: positive finite numbers (tests check exactly these).
FIGURES = (
    "images_per_s",
    "image_ms_per_batch",
    "texts_per_s",
    "text_ms_per_batch",
    "itm_pairs_per_s",
    "itm_ms_per_query",
)
_OOM = getattr(torch, "OutOfMemoryError", RuntimeError)  # torch.cuda.OutOfMemoryError's public name


class BenchError(ValueError):
    """A bad benchmark setting (model, device, batch size ...); the CLI exits 2 on it."""


# ---- model ---------------------------------------------------------------------------------------
def _random_model(name: str, dev: torch.device, dtype: str, attention: str,
                  image_size: int | None, seed: int):
    """A named random model and how long its construction and its wrap took."""
    from blip_ops.hf_blip import HFBlipModel
    from blip_ops.tiny_model import random_network

    started = time.perf_counter()
    try:
        net, tokenizer, image_settings = random_network(
            name, seed=seed, image_size=image_size, device=dev
        )
    except ValueError as err:  # an image size that is no whole number of patches
        raise BenchError(f"--image-size: {err}") from err
    construct_s = time.perf_counter() - started
    t0 = time.perf_counter()
    model = HFBlipModel(net, tokenizer, image_settings, device=str(dev), dtype=dtype,
                        attention=attention)
    return model, construct_s, time.perf_counter() - t0


def _checkpoint(name: str, dev: torch.device, dtype: str, attention: str, image_size: int | None):
    from blip_ops import load_model

    path = Path(name).expanduser()
    if not path.is_dir():
        raise BenchError(
            f"--model got {name!r}: not a checkpoint directory nor one of {', '.join(NAMED_MODELS)}"
        )
    try:
        model = load_model(path, device=str(dev), dtype=dtype, attention=attention)
    except (OSError, ValueError, RuntimeError) as err:
        raise BenchError(f"--model got {name!r}: cannot load it as a checkpoint: {err}") from err
    if not hasattr(model, "model") or not hasattr(model.model, "vision_model"):
        raise BenchError(f"--model got {name!r}: a {type(model).__name__}, the bench needs an HF BLIP model")
    if image_size is not None and image_size != model.image_settings.size:
        raise BenchError(
            f"--image-size {image_size} given, but checkpoint {name!r} takes {model.image_settings.size} px"
        )
    return model


def build_model(
    spec: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "sdpa",
    image_size: int | None = None,
    seed: int = 0,
):
    """``spec`` (checkpoint directory, ``tiny``, ``blip-base``, ``blip-large``) → (HFBlipModel, info).

    ``info`` says what was built and how long it took (``construct_s``: the transformers module with
    its random init; ``wrap_s``: HFBlipModel's weights digest and the move to device/dtype).
    """
    name = str(spec)
    try:
        dev = resolve_device(device)
        resolve_dtype(dtype, dev)  # fail before seconds of model construction
    except (ValueError, RuntimeError) as err:
        raise BenchError(str(err)) from err
    started = time.perf_counter()
    if name in NAMED_MODELS:
        model, construct_s, wrap_s = _random_model(name, dev, dtype, attention, image_size, seed)
    else:
        model = _checkpoint(name, dev, dtype, attention, image_size)
        construct_s, wrap_s = time.perf_counter() - started, None
    info = {
        "model": name,
        "random_weights": name in NAMED_MODELS,
        "construct_s": round(construct_s, 3),
        "wrap_s": None if wrap_s is None else round(wrap_s, 3),
        "build_s": round(time.perf_counter() - started, 3),
    }
    return model, info


def _vision_gflop(model) -> tuple[float, str, dict[str, Any]]:
    """GFLOP per image of the vision tower: the reference figure where it exists, else
    2·P·T (every weight is one multiply-add per token) + 4·L·T²·H (QKᵀ and AV). A model that is
    not a ViT (the compact family's CNN) counts its own (``vision_gflop()``)."""
    own = getattr(model, "vision_gflop", None)
    if callable(own):
        return own()
    vc = model.model.config.vision_config
    size = model.image_settings.size
    tokens = (size // vc.patch_size) ** 2 + 1  # patches + [CLS]
    params = sum(p.numel() for p in model.model.vision_model.parameters())
    shape = {"vision_params": params, "image_tokens": tokens}
    anchor = ANCHOR_GFLOP.get((vc.hidden_size, vc.num_hidden_layers, vc.patch_size, size))
    if anchor is not None:
        return anchor, "H200 reference", shape
    flops = 2 * params * tokens + 4 * vc.num_hidden_layers * tokens**2 * vc.hidden_size
    return flops / 1e9, "estimate 2*P*T + 4*L*T^2*H", shape


# ---- timing --------------------------------------------------------------------------------------
def _timer(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None]) -> tuple[float, float | None]:
    """Mean seconds per call over ``iters`` timed calls after ``warmup`` untimed ones; also the
    duration of the first call (where torch.compile compiles), None without warm-up."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t0
    total = 0.0
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        total += time.perf_counter() - t0
    return total / iters, first


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{dev.type} ({platform.processor() or platform.machine()})"


def environment(dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": str(dev),
        "device_name": _device_name(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def _default_iters(dev: torch.device, vision_params: int) -> tuple[int, int]:
    if dev.type == "cuda":
        return 3, 10
    # ~0.7 s per BLIP-base image on 2 cores: one warm-up and two timed batches are enough.
    return (1, 2) if vision_params > 20_000_000 else (2, 10)


def _positive_int(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BenchError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


# ---- run_bench's steps ---------------------------------------------------------------------------
@dataclass
class _Plan:
    """What one run_bench call measures, its settings resolved against the model's device."""

    kinds: list[str]
    batch_sizes: list[int]
    warmup: int
    iters: int
    itm_candidates: int
    compile: bool
    seed: int
    gflop: float


def _check_settings(attention, itm_candidates, image_size, warmup, iters, batch_sizes):
    """Every setting checked before the model is built (seconds for BLIP-base on CPU); returns
    (attention kinds to run, batch sizes or None for the device's defaults)."""
    if attention not in ATTENTION_CHOICES:
        raise BenchError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    kinds = ["eager", "sdpa"] if attention == "both" else [attention]  # transformers' own first
    _positive_int(itm_candidates, "itm_candidates")
    if image_size is not None:
        _positive_int(image_size, "image_size")
    if warmup is not None:
        _positive_int(warmup, "warmup", 0)
    if iters is not None:
        _positive_int(iters, "iters")
    if batch_sizes is not None:
        batch_sizes = [_positive_int(b, "batch size") for b in batch_sizes]
        if not batch_sizes:
            raise BenchError("no batch sizes given")
    return kinds, batch_sizes


def _resolve_model(model, *, device, dtype, attention, image_size, compile, seed):
    """(HFBlipModel, build info) from a spec or an already built model."""
    if isinstance(model, (str, Path)):
        if compile:  # say so before seconds of model construction
            try:
                wanted = resolve_device(device)
            except (ValueError, RuntimeError) as err:
                raise BenchError(str(err)) from err
            if wanted.type != "cuda":
                raise BenchError(f"--compile is CUDA only, got device {wanted}")
        hf, info = build_model(model, device=device, dtype=dtype, attention=attention,
                               image_size=image_size, seed=seed)
    elif hasattr(model, "model") and hasattr(model.model, "vision_model"):
        hf, info = model, {"model": getattr(model, "model_id", type(model).__name__), "random_weights": None,
                           "construct_s": None, "wrap_s": None, "build_s": None}
    else:
        raise BenchError(f"model must be a path, one of {NAMED_MODELS} or an HFBlipModel, got {model!r:.80}")
    if compile and hf.device.type != "cuda":
        raise BenchError(f"--compile is CUDA only, got device {hf.device}")
    return hf, info


def _base_row(hf, info: dict, plan: _Plan, gflop_source: str, shape: dict) -> dict[str, Any]:
    """The keys every row shares: configuration, model shape and environment."""
    return {
        **info,
        "model_id": getattr(hf, "model_id", None),
        "params": sum(p.numel() for p in hf.model.parameters()),
        **shape,
        "image_size": hf.image_settings.size,
        "compile": plan.compile,
        "warmup": plan.warmup,
        "iters": plan.iters,
        "itm_candidates": plan.itm_candidates,
        "itm_query": ITM_QUERY,
        "gflop_per_image": float(f"{plan.gflop:.4g}"),
        "gflop_source": gflop_source,
        **environment(hf.device, hf.dtype),
    }


def _itm_tokens(hf, plan: _Plan, gen: torch.Generator) -> torch.Tensor:
    """Candidate tokens for ITM, computed once (cached in serving). Tiling a few encoded images to
    K keeps this cheap on CPU; ITM cost does not depend on which tokens they are."""
    size, k = hf.image_settings.size, plan.itm_candidates
    n_unique = min(k, max(plan.batch_sizes))
    pixels = torch.randn(n_unique, 3, size, size, generator=gen, device=hf.device, dtype=hf.dtype)
    tokens = hf.encode_images(pixels, return_tokens=True).tokens  # (n_unique, N, H)
    return tokens.repeat(math.ceil(k / n_unique), 1, 1)[:k].contiguous()  # (K, N, H)


def _measure_batch(hf, bsz: int, titles: list[str], gen: torch.Generator, warmup: int, iters: int,
                   sync: Callable[[], None]) -> tuple[float, float | None, float]:
    """Seconds per encode_images batch (and its first call), seconds per encode_texts batch."""
    size = hf.image_settings.size
    pixels = torch.randn(bsz, 3, size, size, generator=gen, device=hf.device, dtype=hf.dtype)  # (B, 3, S, S)
    img_s, first_s = _timer(lambda: hf.encode_images(pixels), warmup, iters, sync)
    txt_s, _ = _timer(lambda: hf.encode_texts(titles), warmup, iters, sync)
    return img_s, first_s, txt_s


def _figures(plan: _Plan, cuda: bool, bsz: int, img_s: float, first_s: float | None,
             txt_s: float, itm_s: float) -> dict[str, Any]:
    images_per_s = bsz / img_s
    tflops = images_per_s * plan.gflop / 1000.0
    return {
        "images_per_s": images_per_s,
        "image_ms_per_batch": img_s * 1000.0,
        "image_first_call_s": first_s,  # includes compilation with --compile
        "texts_per_s": bsz / txt_s,
        "text_ms_per_batch": txt_s * 1000.0,
        "itm_pairs_per_s": plan.itm_candidates / itm_s,
        "itm_ms_per_query": itm_s * 1000.0,
        "vision_tflops": tflops,
        "peak_share": tflops / PEAK_TFLOPS if cuda else None,
    }


def _measure_kind(hf, kind: str, vision, plan: _Plan, base: dict, inputs: tuple) -> list[dict]:
    """Every batch size with ``kind`` attention (and the vision tower compiled with --compile)."""
    titles, gen, itm_tokens = inputs
    dev = hf.device

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    hf.model.vision_model = vision
    set_attention(hf.model, kind)
    hf.attention = kind
    if plan.compile:
        torch._dynamo.reset()  # one cache per attention kind; each batch size compiles once
        hf.model.vision_model = torch.compile(vision, dynamic=False)
    itm_s, _ = _timer(lambda: hf.itm_scores(ITM_QUERY, itm_tokens), plan.warmup, plan.iters, sync)
    rows = []
    for bsz in plan.batch_sizes:
        row = {**base, "attention": kind, "batch_size": bsz}
        try:
            img_s, first_s, txt_s = _measure_batch(hf, bsz, titles[:bsz], gen, plan.warmup, plan.iters, sync)
        except _OOM as err:  # pragma: no cover - GPU only
            row["error"] = f"out of memory: {str(err).splitlines()[0]}"
        if "error" in row:  # pragma: no cover - GPU only
            torch.cuda.empty_cache()  # after the except block: its traceback held the batch
            logger.warning("%s batch %d: %s", kind, bsz, row["error"])
            rows.append(row)
            continue
        row.update(_figures(plan, dev.type == "cuda", bsz, img_s, first_s, txt_s, itm_s))
        logger.info("%s batch %d: %.1f images/s, %.1f texts/s, ITM %.1f ms/query",
                    kind, bsz, row["images_per_s"], row["texts_per_s"], row["itm_ms_per_query"])
        rows.append(row)
    return rows


def _measure(hf, plan: _Plan, base: dict) -> list[dict]:
    """All (attention, batch size) rows; the model's attention and vision tower restored after."""
    gen = torch.Generator(device=hf.device).manual_seed(plan.seed)
    titles = synthetic_titles(max(plan.batch_sizes), plan.seed)
    inputs = (titles, gen, _itm_tokens(hf, plan, gen))
    original_attention = getattr(hf, "attention", "sdpa")
    original_vision = hf.model.vision_model
    rows: list[dict[str, Any]] = []
    try:
        for kind in plan.kinds:
            rows += _measure_kind(hf, kind, original_vision, plan, base, inputs)
    finally:
        hf.model.vision_model = original_vision
        set_attention(hf.model, original_attention)
        hf.attention = original_attention
    return rows


def run_bench(
    model: Any = "tiny",
    *,
    batch_sizes: Sequence[int] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "sdpa",
    image_size: int | None = None,
    iters: int | None = None,
    warmup: int | None = None,
    itm_candidates: int = DEFAULT_ITM_CANDIDATES,
    compile: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Benchmark ``model`` and return one dict per (attention, batch size).

    ``model`` is a checkpoint directory, ``tiny``, ``blip-base``, ``blip-large`` (random weights), or
    an already built :class:`~blip_ops.hf_blip.HFBlipModel` (``device``/``dtype``/``image_size`` are
    then its own; its attention is restored afterwards). Each row carries the configuration, the
    environment and the figures named in :data:`FIGURES`; a batch that runs out of GPU memory gives
    a row with ``error`` instead of figures. ``iters``/``warmup`` None pick a default by device and
    model size (CUDA 3/10; CPU 2/10 for small models, 1/2 for BLIP-base and up).
    """
    kinds, batch_sizes = _check_settings(attention, itm_candidates, image_size, warmup, iters, batch_sizes)
    hf, info = _resolve_model(model, device=device, dtype=dtype, attention=kinds[0],
                              image_size=image_size, compile=compile, seed=seed)
    gflop, gflop_source, shape = _vision_gflop(hf)
    default_warmup, default_iters = _default_iters(hf.device, shape["vision_params"])
    plan = _Plan(
        kinds=kinds,
        batch_sizes=list(batch_sizes or (CUDA_BATCH_SIZES if hf.device.type == "cuda" else CPU_BATCH_SIZES)),
        # the first call compiles with --compile: never time it
        warmup=max(default_warmup if warmup is None else warmup, 1 if compile else 0),
        iters=default_iters if iters is None else iters,
        itm_candidates=itm_candidates,
        compile=compile,
        seed=seed,
        gflop=gflop,
    )
    base = _base_row(hf, info, plan, gflop_source, shape)
    logger.info("benchmarking %s on %s/%s: attention %s, batches %s, warmup %d, iters %d",
                info["model"], hf.device, base["dtype"], kinds, plan.batch_sizes, plan.warmup, plan.iters)
    return _measure(hf, plan, base)


# ---- report --------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _describe(r0: dict[str, Any]) -> list[str]:
    """The lines above the table: environment, model, what each figure measures."""
    cuda = r0["device"].startswith("cuda")
    build = "" if r0["build_s"] is None else f" | built in {r0['build_s']:.1f} s"
    if r0.get("wrap_s") is not None:
        build += f" (construct {r0['construct_s']:.1f} s + digest/move {r0['wrap_s']:.1f} s)"
    weights = " (random weights)" if r0.get("random_weights") else ""
    return [
        f"env: python {r0['python']} | torch {r0['torch']} | transformers {r0['transformers']} | "
        f"device {r0['device_name']} | dtype {r0['dtype']} | threads {r0['threads']}",
        f"model: {r0['model']}{weights} | {r0['params'] / 1e6:.4g}M params (vision {r0['vision_params'] / 1e6:.4g}M) "
        f"| {r0['image_size']} px, {r0['image_tokens']} image tokens | {r0['gflop_per_image']:g} GFLOP/image "
        f"({r0['gflop_source']}){build}",
        f"images/s: encode_images on random (B, 3, {r0['image_size']}, {r0['image_size']}) tensors already on "
        "the device - model only, preprocessing and decoding excluded"
        + (" | vision tower torch.compile'd" if r0["compile"] else ""),
        "texts/s: encode_texts on B synthetic titles (English + pinyin), tokenisation included",
        f"ITM: itm_scores(1 query, K={r0['itm_candidates']} cached image tokens) - re-rank cost per query, "
        "independent of B",
        f"timing: mean of {r0['iters']} iterations after {r0['warmup']} warm-up"
        + (", torch.cuda.synchronize around each" if cuda else ""),
        "",
    ]


def _cells(rows: Sequence[dict[str, Any]], cuda: bool, compiled: bool) -> list[list[str]]:
    """Header and one list of cells per row (an error row: attention, batch, error)."""
    header = ["attention", "batch", "images/s", "ms/batch", "TFLOP/s"]
    if cuda:
        header.append(f"%{PEAK_TFLOPS:g}")
    if compiled:
        header.append("1st call s")
    header += ["texts/s", "ITM pairs/s", f"ms/query (K={rows[0]['itm_candidates']})"]
    table = [header]
    for r in rows:
        if "error" in r:
            table.append([r["attention"], str(r["batch_size"]), r["error"]])
            continue
        line = [r["attention"], str(r["batch_size"]), _fmt(r["images_per_s"]), _fmt(r["image_ms_per_batch"]),
                _fmt(r["vision_tflops"], 3 if r["vision_tflops"] < 1 else 1)]
        if cuda:
            line.append(f"{100 * r['peak_share']:.1f}%")
        if compiled:
            line.append(_fmt(r["image_first_call_s"]))
        line += [_fmt(r["texts_per_s"]), _fmt(r["itm_pairs_per_s"]), _fmt(r["itm_ms_per_query"], 2)]
        table.append(line)
    return table


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    """The human-readable summary: environment, what was measured, one table line per row."""
    if not rows:
        return "no results"
    cuda = rows[0]["device"].startswith("cuda")
    lines = _describe(rows[0])
    table = _cells(rows, cuda, rows[0]["compile"])
    n = len(table[0])
    widths = [max(len(row[i]) for row in table if len(row) == n) for i in range(n)]
    for row in table:
        if len(row) != n:  # an error row
            lines.append("  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2]]))
        else:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    if cuda:
        lines.append(f"\n%{PEAK_TFLOPS:g}: vision TFLOP/s as a share of {PEAK_TFLOPS:g} TFLOP/s (one H200, dense bf16)")
    return "\n".join(lines)


# ---- CLI -----------------------------------------------------------------------------------------
_EPILOG = """\
runtimes measured on 2 shared CPU cores (torch 2.13 CPU, fp32):
  --model tiny --attention both                                 ~5 s
  --model blip-base --attention both  (batch 8, warmup 1, iters 2, K=32)  ~80 s:
      build 3.3 s (random init 2.2 s + weights digest 1.1 s), ~0.7-0.9 s per image,
      ~4 s per ITM query of 32 candidates
On CUDA the defaults are batch sizes 64 128 256 512, warmup 3, iters 10, bf16; with --compile
each (attention, batch size) compiles once (16 s for BLIP-base on an H200, reference measurement),
reported as "1st call s".
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/model_throughput.py",
        description="Model-only throughput of a BLIP retrieval model (no Ray, no decoding).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny",
                   help="checkpoint directory, 'tiny' (in memory), or 'blip-base' / 'blip-large' "
                        "(published architectures, random weights); default tiny")
    p.add_argument("--batch-size", type=int, nargs="+", dest="batch_sizes", metavar="N",
                   help=f"batch sizes (default CPU {' '.join(map(str, CPU_BATCH_SIZES))}; "
                        f"CUDA {' '.join(map(str, CUDA_BATCH_SIZES))})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attention", default="sdpa", choices=ATTENTION_CHOICES,
                   help="BLIP attention: transformers' eager, SDPA, or both on the same model (default sdpa)")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="input side in px for tiny/blip-base/blip-large (default 64 tiny, 384 otherwise); "
                        "a checkpoint takes its own")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: by device and model)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations (default: by device and model)")
    p.add_argument("--itm-candidates", type=int, default=DEFAULT_ITM_CANDIDATES, metavar="K",
                   help=f"candidates re-ranked per ITM query (default {DEFAULT_ITM_CANDIDATES})")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the vision tower (CUDA only; the first call per batch size compiles)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write all rows as a JSON list")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rows = run_bench(
            args.model,
            batch_sizes=args.batch_sizes,
            device=args.device,
            dtype=args.dtype,
            attention=args.attention,
            image_size=args.image_size,
            iters=args.iters,
            warmup=args.warmup,
            itm_candidates=args.itm_candidates,
            compile=args.compile,
            seed=args.seed,
        )
    except BenchError as err:
        print(f"model_throughput: error: {err}", file=sys.stderr)
        return 2
    print(format_report(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"\nwrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
