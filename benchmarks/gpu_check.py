"""GPU component check: one command, one table, under 5 minutes on one H200.

    python gpu_check.py [--json FILE] [--budget-s 270] [--skip SECTION ...]     # on a CUDA machine
    python benchmarks/gpu_check.py --smoke [--json FILE]                        # anywhere: CPU, tiny model

Imports only torch, transformers, PIL, numpy and ``blip_ops``' core (torchvision only inside
``blip_ops``' GPU JPEG path and the raw nvJPEG row): no Ray, no LanceDB, no pipelines, so copying
``blip_ops/`` and this file to a bare GPU machine (python 3.12, torch 2.11, transformers 5.17) is
enough. Random weights (speed does not depend on them), bf16, batch sizes fixed below.

Sections (each row of the table is one measured figure; a failure becomes a row with its error,
never a crash):

  encode   BLIP-base and BLIP-large @384 vision tower (``encode_images``: vision + vision_proj +
           normalise, embeddings copied to the host) on random pixels already on the GPU:
           transformers' eager attention vs ``blip_ops.attention`` SDPA vs SDPA + torch.compile,
           images/s and the share of 790 TFLOP/s at 111 / 382 GFLOP per image (the H200 reference figures, as in benchmarks/model_throughput.py).
  decode   800x800 JPEGs (synthetic product shots, quality 90) decoded and resized to 384 px:
           PIL plain, PIL + draft and ``blip_ops.decode.decode_image(target_size)`` on all CPU
           cores (one process per core); nvJPEG raw (torchvision ``decode_jpeg`` on CUDA, batches of
           128, + one batched resize) and ``blip_ops``' GPU path as the index job runs it
           (``decode_batch(device="cuda")`` + ``preprocess(device="cuda")``).
  text     ``encode_texts`` at batch 1 and 64 (tokenisation included), SDPA.
  itm      re-rank for one query: top 32 / 128 with vision tokens cached, and recomputed
           (``encode_images(return_tokens=True)`` + ``itm_scores``); the whole one-query path
           (text encode + vision of 32 + ITM: the ≤ 15 ms target); 64 queries x 32 candidates
           batched in one ``itm_scores`` call (the ≥ 400 queries/s target).
  graphs   the batch-1 paths (text encode; ITM of 32 cached; the whole query) replayed from CUDA
           graphs (``torch.cuda.CUDAGraph``, static shapes: the query's own token length), and the
           whole query through ``torch.compile(mode="reduce-overhead")``.
  compile  SDPA + torch.compile of the vision tower (16 s+ per batch size to compile), base at 256
           and 1024, large at 256; run last, skipped when ``--budget-s`` would be exceeded.

``--smoke`` runs every path once on the CPU with the tiny random BLIP (64 px), small batches and
small images; CUDA-only rows say "skipped: no CUDA". It is what CI-class machines can check.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # `python gpu_check.py` next to blip_ops/, or benchmarks/gpu_check.py
    here = Path(__file__).resolve().parent
    for root in (here, here.parent):
        if (root / "blip_ops").is_dir():
            sys.path.insert(0, str(root))
            break

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

PEAK_TFLOPS = 790.0  # dense bf16 of one H200 (NVIDIA's datasheet figure)
GFLOP = {"blip-base": 111.0, "blip-large": 382.0}
FORBIDDEN = ("ray", "lancedb", "lance", "pyarrow", "pipelines", "pydantic", "pandas")
SECTIONS = ("encode", "decode", "text", "itm", "graphs", "compile")
SKIPPED_NO_CUDA = "skipped: no CUDA"

_JPEGS: list[bytes] = []  # set before the decode pool forks: workers read it, nothing is pickled


# ---- plumbing ------------------------------------------------------------------------------------
class Check:
    """Rows of the table, printed as they come and saved after each one (a kill keeps them)."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.rows: list[dict] = []
        self.started = time.perf_counter()
        self.meta = environment(device, dtype, args)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, section, what, variant, batch, value=None, unit="", ms=None, peak=None, note=""):
        row = {
            "section": section,
            "what": what,
            "variant": variant,
            "batch": batch,
            "value": value,
            "unit": unit,
            "ms": ms,
            "peak_share": peak,
            "note": note,
            "t": round(self.elapsed(), 1),
        }
        self.rows.append(row)
        shown = "-" if value is None else f"{value:,.1f}"
        extra = f" {ms:.2f} ms" if ms is not None else ""
        print(
            f"[{row['t']:6.1f}s] {section:8s} {what} | {variant} | b={batch} | {shown} {unit}{extra} {note}",
            flush=True,
        )
        self.save()
        return row

    def fail(self, section, what, variant, batch, err: BaseException):
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
        if self.args.verbose:
            traceback.print_exc()
        return self.add(section, what, variant, batch, note=f"error: {msg}")

    def skip(self, section, what, variant, batch, why):
        return self.add(section, what, variant, batch, note=why)

    def save(self) -> None:
        if self.args.json:
            path = Path(self.args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps(
                    {**self.meta, "seconds": round(self.elapsed(), 1), "rows": self.rows}, indent=2
                )
            )


def nvml_facts(device: torch.device) -> dict:
    """What makes GPU figures comparable beyond the card's name: driver, power limit, clocks and
    MIG mode, from NVML (``nvidia-ml-py``, the ``[gpu]`` extra); a note when it is missing."""
    try:
        import pynvml
    except ImportError:
        return {"note": "nvidia-ml-py not installed (pip install -e '.[gpu]')"}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        mig = pynvml.nvmlDeviceGetMigMode(handle)[0] if hasattr(pynvml, "nvmlDeviceGetMigMode") else None
        return {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "mig_mode": mig,
        }
    except pynvml.NVMLError as err:
        return {"note": f"NVML unavailable: {err}"}


def environment(device: torch.device, dtype: torch.dtype, args) -> dict:
    import transformers

    try:
        import torchvision

        tv = torchvision.__version__
    except Exception as err:  # noqa: BLE001 - any import failure means no GPU JPEG path
        tv = f"unavailable ({type(err).__name__})"
    cuda = device.type == "cuda"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "benchmark": "gpu_check",
        "command": "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": bool(args.smoke),
        "machine": {
            "uname": " ".join(platform.uname()[i] for i in (0, 2, 4)),
            "hostname": platform.node(),
            "cpu_model": cpu,
            "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "gpu_memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
            if cuda
            else None,
            "python": platform.python_version(),
            "packages": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "torchvision": tv,
                "numpy": np.__version__,
                "pillow": Image.__version__,
            },
            "cuda": torch.version.cuda,
            "nvml": nvml_facts(device) if cuda else None,
        },
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": PEAK_TFLOPS,
    }


def timeit(fn, sync, warmup: int, iters: int) -> tuple[float, float, float | None]:
    """(mean s, median s, first warm-up call s) of ``fn`` with a device sync around each call."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return sum(times) / len(times), times[len(times) // 2], first


def _oom_types():
    return (getattr(torch, "OutOfMemoryError", RuntimeError), RuntimeError)


def build(name: str, c: Check, attention: str = "sdpa"):
    """A random ``tiny`` / ``blip-base`` / ``blip-large`` on the check's device and dtype."""
    from blip_ops.tiny_model import make_random_model

    return make_random_model(name, device=str(c.device), dtype=c.args.dtype, attention=attention)


# ---- encode --------------------------------------------------------------------------------------
def section_encode(c: Check, plan: dict) -> None:
    from blip_ops.attention import set_attention

    for name, batches, (warmup, iters) in plan["encode"]:
        try:
            hf = build(name, c)
        except Exception as err:  # noqa: BLE001
            c.fail("encode", name, "build", None, err)
            continue
        gflop = GFLOP.get(name)
        size = hf.image_settings.size
        gen = torch.Generator(device=c.device).manual_seed(0)
        for kind in ("eager", "sdpa"):
            set_attention(hf.model, kind)
            for bsz in batches:
                try:
                    pixels = torch.randn(
                        bsz, 3, size, size, generator=gen, device=c.device, dtype=hf.dtype
                    )
                    mean, _, _ = timeit(
                        lambda p=pixels, m=hf: m.encode_images(p), c.sync, warmup, iters
                    )
                    ips = bsz / mean
                    peak = (
                        ips * gflop / 1000 / PEAK_TFLOPS
                        if (gflop and c.device.type == "cuda")
                        else None
                    )
                    c.add(
                        "encode",
                        f"{name} @{size} vision",
                        f"{kind} attention",
                        bsz,
                        ips,
                        "img/s",
                        ms=mean * 1000,
                        peak=peak,
                    )
                    del pixels
                except _oom_types() as err:
                    c.fail("encode", f"{name} @{size} vision", f"{kind} attention", bsz, err)
                    if c.device.type == "cuda":
                        torch.cuda.empty_cache()
        set_attention(hf.model, "sdpa")
        del hf
        if c.device.type == "cuda":
            torch.cuda.empty_cache()


def section_compile(c: Check, entries: list) -> None:
    smoke = c.device.type != "cuda"
    label = (
        'sdpa + torch.compile(backend="eager") stand-in (no CUDA)'
        if smoke
        else "sdpa + torch.compile"
    )
    for name, batches, (warmup, iters), need_s in entries:
        try:
            hf = build(name, c)
        except Exception as err:  # noqa: BLE001
            c.fail("compile", name, "build", None, err)
            continue
        gflop = GFLOP.get(name)
        size = hf.image_settings.size
        original = hf.model.vision_model
        for bsz in batches:
            if c.left() < need_s:
                c.skip(
                    "compile",
                    f"{name} @{size} vision",
                    label,
                    bsz,
                    f"skipped: {c.left():.0f} s of --budget-s left, needs ~{need_s} s",
                )
                continue
            try:
                torch._dynamo.reset()
                hf.model.vision_model = torch.compile(
                    original, dynamic=False, **({"backend": "eager"} if smoke else {})
                )
                pixels = torch.randn(bsz, 3, size, size, device=c.device, dtype=hf.dtype)
                mean, _, first = timeit(
                    lambda p=pixels, m=hf: m.encode_images(p), c.sync, warmup, iters
                )
                ips = bsz / mean
                c.add(
                    "compile",
                    f"{name} @{size} vision",
                    label,
                    bsz,
                    ips,
                    "img/s",
                    ms=mean * 1000,
                    peak=ips * gflop / 1000 / PEAK_TFLOPS if (gflop and not smoke) else None,
                    note=f"compile {first:.0f} s",
                )
            except Exception as err:  # noqa: BLE001
                c.fail("compile", f"{name} @{size} vision", label, bsz, err)
            finally:
                hf.model.vision_model = original
                torch._dynamo.reset()
        del hf
        if not smoke:
            torch.cuda.empty_cache()


# ---- decode --------------------------------------------------------------------------------------
def synthetic_jpegs(n: int, side: int, seed: int = 0) -> list[bytes]:
    """Product-shot-like JPEGs: a light background, a few shaded shapes, mild texture."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(215, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.integers(0, side * 3 // 4, 2)
            w, h = rng.integers(side // 8, side // 2, 2)
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=color)
        # photographic grain and shading: real 800 px product photos are ~80-150 KB at q90
        noise = rng.normal(0, 40, (side // 2, side // 2, 3))
        texture = Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8)).resize(
            (side, side)
        )
        im = Image.blend(im, texture, 0.22).filter(ImageFilter.SMOOTH)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _decode_worker(task: tuple[str, int, list[int]]) -> int:
    """Decode + resize ``_JPEGS[i]`` for i in the task's indices one way; returns a checksum so
    the work cannot be skipped (no pixels travel back)."""
    mode, size, indices = task
    total = 0
    for i in indices:
        data = _JPEGS[i]
        if mode == "blip_ops":
            from blip_ops.decode import decode_image

            im = decode_image(data, target_size=size)
        else:
            im = Image.open(io.BytesIO(data))
            if mode == "draft":
                im.draft("RGB", (size, size))
            im = im.convert("RGB")
        arr = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))
        total += int(arr[size // 2, size // 2, 0])
    return total


def section_decode(c: Check, plan: dict, pool) -> None:
    p = plan["decode"]
    size, reps = p["target"], p["reps"]
    n = len(_JPEGS) * reps
    mb = sum(len(b) for b in _JPEGS) / len(_JPEGS) / 1e6
    desc = f"{len(_JPEGS)} JPEGs {p['side']}x{p['side']} (~{mb:.2f} MB) -> {size} px"
    chunk = max(1, len(_JPEGS) // (4 * p["workers"]))
    for mode, label in (
        ("plain", "PIL plain"),
        ("draft", "PIL + draft"),
        ("blip_ops", "blip_ops decode_image(target_size)"),
    ):
        tasks = [
            (mode, size, list(range(i, min(i + chunk, len(_JPEGS)))))
            for _ in range(reps)
            for i in range(0, len(_JPEGS), chunk)
        ]
        try:
            pool.map(_decode_worker, tasks[: p["workers"]])  # warm the workers (imports, caches)
            t0 = time.perf_counter()
            pool.map(_decode_worker, tasks)
            dt = time.perf_counter() - t0
            c.add(
                "decode",
                desc,
                f"{label}, {p['workers']} CPU processes",
                None,
                n / dt,
                "img/s",
                ms=dt / n * 1000 * p["workers"],
                note="ms = per image per core",
            )
        except Exception as err:  # noqa: BLE001
            c.fail("decode", desc, label, None, err)
    bsz = 128
    batches = [_JPEGS[i : i + bsz] for i in range(0, len(_JPEGS), bsz)] * reps
    smoke = c.device.type != "cuda"
    gpu_label = "blip_ops GPU path (decode_batch + preprocess on cuda)"
    if smoke:
        c.skip(
            "decode",
            desc,
            "nvJPEG raw (torchvision decode_jpeg) + batched resize",
            bsz,
            SKIPPED_NO_CUDA,
        )
        gpu_label = "blip_ops GPU path with a PIL stand-in for nvJPEG (no CUDA)"
        _blip_ops_gpu_path(c, plan, desc, gpu_label, batches, n, _pil_tensor_decoder)
        return
    # raw: nvJPEG in batches + one batched antialiased bicubic resize per batch (all one size)
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        def raw(batch):
            enc = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch]
            imgs = decode_jpeg(enc, device=c.device, mode=ImageReadMode.RGB)
            x = torch.stack(imgs).float()
            return torch.nn.functional.interpolate(
                x, size=(size, size), mode="bicubic", antialias=True
            )

        raw(batches[0])
        dt = _timed_pass(c, raw, batches)
        c.add(
            "decode",
            desc,
            "nvJPEG raw (torchvision decode_jpeg) + batched resize",
            bsz,
            n / dt,
            "img/s",
            ms=dt / n * 1000,
        )
    except Exception as err:  # noqa: BLE001
        c.fail("decode", desc, "nvJPEG raw", bsz, err)
    _blip_ops_gpu_path(c, plan, desc, gpu_label, batches, n, None)


def _timed_pass(c: Check, fn, batches) -> float:
    """Seconds for ``fn`` over every batch, the device synced before and after (after a warm-up)."""
    c.sync()
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    c.sync()
    return time.perf_counter() - t0


def _pil_tensor_decoder(datas: list[bytes]) -> list[torch.Tensor]:
    """--smoke's stand-in for nvJPEG: (3, H, W) uint8 tensors, as the GPU decoder returns."""
    out = []
    for d in datas:
        arr = np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return out


def _blip_ops_gpu_path(
    c: Check, plan: dict, desc: str, label: str, batches, n: int, decoder
) -> None:
    """blip_ops' path as EncodeBatch runs it: ``decode_batch`` (header checks on the CPU, nvJPEG
    for plain JPEGs) then ``RetrievalModel.preprocess`` (one antialiased resize per image)."""
    from blip_ops.decode import decode_batch
    from blip_ops.family import CLIP_MEAN, CLIP_STD, ImageSettings, RetrievalModel

    size = plan["decode"]["target"]

    class _Pre:  # RetrievalModel.preprocess needs only image_settings and resize
        image_settings = ImageSettings(size=size, mean=CLIP_MEAN, std=CLIP_STD)
        resize = RetrievalModel.resize

    def path(batch):
        res = decode_batch(batch, target_size=size, device=str(c.device), gpu_jpeg_decoder=decoder)
        imgs = [im for im in res.images if im is not None]
        return RetrievalModel.preprocess(_Pre(), imgs, device=c.device), res.gpu_decoded

    try:
        _, gpu_n = path(batches[0])
        dt = _timed_pass(c, path, batches)
        c.add(
            "decode",
            desc,
            label,
            len(batches[0]),
            n / dt,
            "img/s",
            ms=dt / n * 1000,
            note=f"{gpu_n}/{len(batches[0])} went to the GPU decoder",
        )
    except Exception as err:  # noqa: BLE001
        c.fail("decode", desc, label, len(batches[0]), err)


# ---- text / ITM ----------------------------------------------------------------------------------
def section_text_itm(c: Check, plan: dict, sections: set[str]):
    """Text and ITM rows; returns the deferred reduce-overhead check (or None)."""
    from blip_ops.tiny_model import synthetic_titles

    name = plan["query_model"]
    try:
        hf = build(name, c)
    except Exception as err:  # noqa: BLE001
        c.fail("text", name, "build", None, err)
        return None
    size = hf.image_settings.size
    titles = synthetic_titles(256, seed=0)
    gen = torch.Generator(device=c.device).manual_seed(1)
    if "text" in sections:
        _text_rows(c, plan, hf, titles)
    if "itm" not in sections and "graphs" not in sections:
        return None
    kmax = max(plan["itm_ks"])
    pixels = torch.randn(kmax, 3, size, size, generator=gen, device=c.device, dtype=hf.dtype)
    tokens = hf.encode_images(pixels, return_tokens=True).tokens  # (kmax, N, H)
    if "itm" in sections:
        _itm_rows(c, plan, hf, pixels, tokens)
        _whole_query_row(c, plan, hf, pixels)
        _batched_itm_rows(c, plan, hf, titles, tokens)
    # The model and its tensors stay alive for the deferred check (BLIP-base bf16: < 1 GB).
    return section_graphs(c, plan, hf, pixels, tokens) if "graphs" in sections else None


def _text_rows(c: Check, plan: dict, hf, titles: list[str]) -> None:
    """``encode_texts`` at each text batch size, eager and SDPA attention."""
    from blip_ops.attention import set_attention

    name = plan["query_model"]
    warmup, iters = plan["query_iters"]
    for kind in ("eager", "sdpa"):
        set_attention(hf.model, kind)
        for bsz in plan["text_batches"]:
            try:
                _, med, _ = timeit(
                    lambda b=bsz: hf.encode_texts(titles[:b]), c.sync, warmup, iters
                )
                c.add(
                    "text",
                    f"{name} encode_texts",
                    f"{kind} attention",
                    bsz,
                    bsz / med,
                    "texts/s",
                    ms=med * 1000,
                )
            except Exception as err:  # noqa: BLE001
                c.fail("text", f"{name} encode_texts", kind, bsz, err)
    set_attention(hf.model, "sdpa")


def _itm_rows(c: Check, plan: dict, hf, pixels, tokens) -> None:
    """ITM of one query against k candidates, vision tokens cached and recomputed."""
    from blip_ops.attention import set_attention
    from blip_ops.tiny_model import ITM_QUERY

    name = plan["query_model"]
    warmup, iters = plan["query_iters"]
    for kind in ("eager", "sdpa"):
        set_attention(hf.model, kind)
        for k in plan["itm_ks"]:
            try:
                _, med, _ = timeit(
                    lambda k=k: hf.itm_scores(ITM_QUERY, tokens[:k]), c.sync, warmup, iters
                )
                c.add(
                    "itm",
                    f"{name} ITM 1 query x {k}",
                    f"vision cached, {kind}",
                    1,
                    k / med,
                    "pairs/s",
                    ms=med * 1000,
                )

                def recompute(k=k):
                    t = hf.encode_images(pixels[:k], return_tokens=True).tokens
                    return hf.itm_scores(ITM_QUERY, t)

                _, med, _ = timeit(recompute, c.sync, warmup, iters)
                c.add(
                    "itm",
                    f"{name} ITM 1 query x {k}",
                    f"vision recomputed, {kind}",
                    1,
                    k / med,
                    "pairs/s",
                    ms=med * 1000,
                )
            except Exception as err:  # noqa: BLE001
                c.fail("itm", f"{name} ITM 1 query x {k}", kind, 1, err)
    set_attention(hf.model, "sdpa")


def _whole_query_row(c: Check, plan: dict, hf, pixels) -> None:
    """The whole one-query path with eager launches: text encode + vision of k + ITM of k."""
    from blip_ops.tiny_model import ITM_QUERY

    name, k = plan["query_model"], plan["target_k"]
    warmup, iters = plan["query_iters"]

    def whole_query():
        hf.encode_texts([ITM_QUERY])
        t = hf.encode_images(pixels[:k], return_tokens=True).tokens
        return hf.itm_scores(ITM_QUERY, t)

    try:
        _, med, _ = timeit(whole_query, c.sync, warmup, iters)
        c.add(
            "itm",
            f"{name} whole query: text + vision {k} + ITM {k}",
            "sdpa, eager launches",
            1,
            1 / med,
            "queries/s",
            ms=med * 1000,
            note="target <= 15 ms",
        )
    except Exception as err:  # noqa: BLE001
        c.fail("itm", f"{name} whole query", "sdpa", 1, err)


def _batched_itm_rows(c: Check, plan: dict, hf, titles: list[str], tokens) -> None:
    """nq queries x k cached candidates in one call: through ``itm_scores`` (it tokenises every
    pair on the CPU), and with each query tokenised once and its rows repeated on the device."""
    name, k, nq = plan["query_model"], plan["target_k"], plan["batched_queries"]
    warmup, iters = plan["query_iters"]
    try:
        texts = [t for q in titles[:nq] for t in [q] * k]  # each query against its k candidates
        reps = math.ceil(nq * k / len(tokens))
        pair_tokens = tokens.repeat(reps, 1, 1)[: nq * k].contiguous()
        _, med, _ = timeit(
            lambda: hf.itm_scores(texts, pair_tokens),
            c.sync,
            max(1, warmup // 2),
            max(3, iters // 3),
        )
        c.add(
            "itm",
            f"{name} ITM batched: {nq} queries x {k} (vision cached)",
            "sdpa, itm_scores (tokenises all pairs)",
            nq * k,
            nq / med,
            "queries/s",
            ms=med * 1000,
            note="target >= 400 queries/s",
        )
        m = hf.model
        image_mask = torch.ones(pair_tokens.shape[:2], dtype=torch.long, device=c.device)

        @torch.inference_mode()
        def batched_once():
            enc = hf._tokenize(titles[:nq])
            ids = enc["input_ids"].repeat_interleave(k, dim=0)
            att = enc["attention_mask"].repeat_interleave(k, dim=0)
            h = m.text_encoder(
                input_ids=ids,
                attention_mask=att,
                encoder_hidden_states=pair_tokens,
                encoder_attention_mask=image_mask,
            ).last_hidden_state
            return m.itm_head(h[:, 0, :])[:, 1].float().cpu()

        diff = float((batched_once() - hf.itm_scores(texts, pair_tokens)).abs().max())
        _, med, _ = timeit(batched_once, c.sync, max(1, warmup // 2), max(3, iters // 3))
        c.add(
            "itm",
            f"{name} ITM batched: {nq} queries x {k} (vision cached)",
            "sdpa, queries tokenised once",
            nq * k,
            nq / med,
            "queries/s",
            ms=med * 1000,
            note=f"max |diff| vs itm_scores {diff:.2g}",
        )
    except Exception as err:  # noqa: BLE001
        c.fail("itm", f"{name} ITM batched {nq}x{k}", "sdpa", nq * k, err)


def _capture(fn, args, c: Check):
    """A CUDA graph of ``fn(*args)`` (static inputs: copy new data into ``args`` then replay)."""
    stream = torch.cuda.Stream(device=c.device)
    stream.wait_stream(torch.cuda.current_stream(c.device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream(c.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph, out


class _EagerGraph:
    """--smoke's stand-in for a CUDA graph: ``replay()`` recomputes into the captured outputs, so
    every line of the graph section runs on a CPU (the speed means nothing there)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def replay(self) -> None:
        new = self.fn(*self.args)
        for dst, src in zip(
            self.out if isinstance(self.out, tuple) else (self.out,),
            new if isinstance(new, tuple) else (new,),
            strict=True,
        ):
            dst.copy_(src)


def _eager_capture(fn, args, c: Check):
    g = _EagerGraph(fn, args)
    g.out = fn(*args)
    return g, g.out


def _graph_cases(c: Check, plan: dict, hf, pixels, tokens) -> dict:
    """The batch-1 paths as functions of static input tensors, for capture:
    {key: (fn, static inputs, refresh: a new query's tokens copied into those inputs)}."""
    import torch.nn.functional as F

    from blip_ops.tiny_model import ITM_QUERY

    k = plan["target_k"]
    m = hf.model
    enc = hf._tokenize([ITM_QUERY])  # the query's own length: graphs are per shape (bucket them)
    ids, mask = enc["input_ids"].clone(), enc["attention_mask"].clone()
    ids_k, mask_k = ids.expand(k, -1).contiguous(), mask.expand(k, -1).contiguous()
    img_mask = torch.ones(k, tokens.shape[1], dtype=torch.long, device=c.device)
    toks, pix = tokens[:k].contiguous(), pixels[:k].contiguous()

    def text_fn(i, a):
        h = m.text_encoder(input_ids=i, attention_mask=a).last_hidden_state
        return F.normalize(m.text_proj(h[:, 0, :]).float(), dim=-1)

    def itm_fn(i, a, t, im):
        h = m.text_encoder(
            input_ids=i, attention_mask=a, encoder_hidden_states=t, encoder_attention_mask=im
        ).last_hidden_state
        return m.itm_head(h[:, 0, :])[:, 1].float()

    def query_fn(i, a, ik, ak, p, im):
        emb = text_fn(i, a)
        t = m.vision_model(pixel_values=p).last_hidden_state
        return emb, itm_fn(ik, ak, t, im)

    def tokenize_into(dst_ids, dst_mask):  # a new query's tokens into the static inputs
        e = hf._tokenize([ITM_QUERY])
        dst_ids.copy_(e["input_ids"].expand_as(dst_ids))
        dst_mask.copy_(e["attention_mask"].expand_as(dst_mask))

    return {
        "text": (text_fn, (ids, mask), lambda: tokenize_into(ids, mask)),
        "itm": (itm_fn, (ids_k, mask_k, toks, img_mask), lambda: tokenize_into(ids_k, mask_k)),
        "query": (
            query_fn,
            (ids, mask, ids_k, mask_k, pix, img_mask),
            lambda: (tokenize_into(ids, mask), tokenize_into(ids_k, mask_k)),
        ),
    }


def _graph_row(c: Check, plan: dict, key: str, case: tuple, what: str, label: str) -> None:
    """One path captured (a CUDA graph, or its eager stand-in with --smoke), checked against the
    eager result, and timed replaying with a new query's tokens each time."""
    fn, args, refresh = case
    k = plan["target_k"]
    warmup, iters = plan["query_iters"]
    capture = _eager_capture if c.device.type != "cuda" else _capture
    try:
        eager_out = fn(*args)
        graph, out = capture(fn, args, c)

        def step(g=graph, o=out, r=refresh):
            r()
            g.replay()
            return [x.cpu() for x in (o if isinstance(o, tuple) else (o,))]

        step()
        got = out if isinstance(out, tuple) else (out,)
        ref = eager_out if isinstance(eager_out, tuple) else (eager_out,)
        err = max(
            float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref, strict=True)
        )
        _, med, _ = timeit(step, c.sync, warmup, iters)
        value, unit = (
            (k / med, "pairs/s")
            if key == "itm"
            else (1 / med, "queries/s" if key == "query" else "texts/s")
        )
        c.add(
            "graphs",
            what,
            label,
            1,
            value,
            unit,
            ms=med * 1000,
            note=f"max |graph - eager| {err:.2g}" + ("; target <= 15 ms" if key == "query" else ""),
        )
        del graph
    except Exception as err:  # noqa: BLE001
        c.fail("graphs", what, label, 1, err)


def _reduce_overhead(c: Check, plan: dict, case: tuple, what: str) -> None:
    """The whole query through torch.compile(mode="reduce-overhead"): run later, after the
    figures the targets need, since it compiles for a minute or more."""
    smoke = c.device.type != "cuda"
    label = (
        'torch.compile(backend="eager") stand-in (no CUDA)'
        if smoke
        else 'torch.compile(mode="reduce-overhead")'
    )
    need = plan["reduce_overhead_s"]
    if c.left() < need:
        c.skip("graphs", what, label, 1, f"skipped: {c.left():.0f} s of --budget-s left, needs ~{need} s")
        return
    query_fn, args, refresh = case
    warmup, iters = plan["query_iters"]
    try:
        torch._dynamo.reset()
        compiled = (
            torch.compile(query_fn, backend="eager", dynamic=False)
            if smoke
            else torch.compile(query_fn, mode="reduce-overhead", dynamic=False)
        )

        @torch.inference_mode()
        def step_c():
            refresh()
            emb, scores = compiled(*args)
            return emb.cpu(), scores.cpu()

        _, med, first = timeit(step_c, c.sync, warmup + 2, iters)
        c.add(
            "graphs",
            what,
            label,
            1,
            1 / med,
            "queries/s",
            ms=med * 1000,
            note=f"compile {first:.0f} s; target <= 15 ms",
        )
    except Exception as err:  # noqa: BLE001
        c.fail("graphs", what, label, 1, err)
    finally:
        torch._dynamo.reset()


def section_graphs(c: Check, plan: dict, hf, pixels, tokens):
    """The batch-1 paths replayed from CUDA graphs; returns the deferred reduce-overhead check."""
    k = plan["target_k"]
    name = plan["query_model"]
    what = {
        "text": f"{name} encode_texts",
        "itm": f"{name} ITM 1 query x {k}",
        "query": f"{name} whole query: text + vision {k} + ITM {k}",
    }
    smoke = c.device.type != "cuda"
    label = "eager stand-in for a CUDA graph (no CUDA)" if smoke else "CUDA graph replay"
    cases = _graph_cases(c, plan, hf, pixels, tokens)
    with torch.inference_mode():
        for key, case in cases.items():
            _graph_row(c, plan, key, case, what[key], label)
    return functools.partial(_reduce_overhead, c, plan, cases["query"], what["query"])


# ---- report --------------------------------------------------------------------------------------
def table(c: Check) -> str:
    head = ["section", "what", "variant", "batch", "figure", "ms", "% of 790 TF", "note"]
    lines = [head]
    for r in c.rows:
        fig = "-" if r["value"] is None else f"{r['value']:,.1f} {r['unit']}"
        lines.append(
            [
                r["section"],
                r["what"],
                r["variant"],
                "-" if r["batch"] is None else str(r["batch"]),
                fig,
                "-" if r["ms"] is None else f"{r['ms']:,.2f}",
                "-" if r["peak_share"] is None else f"{100 * r['peak_share']:.1f}%",
                r["note"],
            ]
        )
    widths = [max(len(x[i]) for x in lines) for i in range(len(head) - 1)]
    out = []
    for j, x in enumerate(lines):
        out.append(
            " | ".join(v.ljust(w) for v, w in zip(x[:-1], widths, strict=True))
            + (" | " + x[-1] if x[-1] else "")
        )
        if j == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def verdicts(c: Check) -> list[str]:
    """The project's targets these figures decide (only meaningful on an H200, bf16)."""

    def best(pred, key="value", lowest=False):
        vals = [r[key] for r in c.rows if r[key] is not None and pred(r)]
        return (min(vals) if lowest else max(vals)) if vals else None

    out = []
    enc = best(
        lambda r: r["section"] in ("encode", "compile") and r["what"].startswith("blip-base")
    )
    dec = best(lambda r: r["section"] == "decode" and "blip_ops GPU path" in r["variant"])
    q = best(
        lambda r: r["what"].startswith(f"{c.args.query_model} whole query"), key="ms", lowest=True
    )
    bq = best(lambda r: "ITM batched" in r["what"])
    for label, val, goal, ok in (
        (
            "encode BLIP-base @384 bf16, model only",
            enc,
            ">= 4,000 img/s",
            enc is not None and enc >= 4000,
        ),
        (
            "decode + preprocess, blip_ops GPU path",
            dec,
            ">= 3,500 img/s",
            dec is not None and dec >= 3500,
        ),
        ("one query: text + vision 32 + ITM 32", q, "<= 15 ms", q is not None and q <= 15),
        ("ITM batched, 64 queries x 32", bq, ">= 400 queries/s", bq is not None and bq >= 400),
    ):
        shown = "not measured" if val is None else f"{val:,.1f}"
        out.append(
            f"{label}: {shown} (target {goal}): {'met' if ok else 'MISSED' if val is not None else '-'}"
        )
    return out


def plan_for(args) -> dict:
    if args.smoke:
        return {
            "encode": [("tiny", [2, 4], (1, 1))],
            "compile": [("tiny", [2], (1, 1), 0), ("tiny", [4], (1, 1), 0)],
            "decode": {"n": 8, "side": 160, "target": 64, "reps": 1, "workers": 2},
            "query_model": "tiny",
            "query_iters": (1, 2),
            "text_batches": [1, 4],
            "itm_ks": [4, 8],
            "target_k": 4,
            "batched_queries": 3,
            "reduce_overhead_s": 0,
        }
    return {
        "encode": [
            ("blip-base", [64, 128, 256, 512, 1024], (3, 10)),
            ("blip-large", [64, 256, 1024], (2, 5)),
        ],
        "compile": [("blip-base", [256, 1024], (2, 10), 40), ("blip-large", [256], (2, 5), 60)],
        "decode": {"n": 128, "side": 800, "target": 384, "reps": 8, "workers": os.cpu_count() or 1},
        "query_model": "blip-base",
        "query_iters": (5, 30),
        "text_batches": [1, 64],
        "itm_ks": [32, 128],
        "target_k": 32,
        "batched_queries": 64,
        "reduce_overhead_s": 90,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--smoke", action="store_true", help="CPU + tiny model: every path once (CUDA rows skipped)"
    )
    p.add_argument("--json", default=None, help="also write every row here (after each row)")
    p.add_argument(
        "--budget-s", type=float, default=270.0, help="optional compiles are skipped past this"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 with --smoke")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "gpu_check: no CUDA device here; run with --smoke for a CPU check of every path",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        args.dtype
    ]
    plan = plan_for(args)
    args.query_model = plan["query_model"]
    sections = [s for s in SECTIONS if s not in args.skip]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool, made = None, time.perf_counter()
    if "decode" in sections:  # JPEGs first, then fork the workers, before any CUDA work
        import blip_ops.decode  # noqa: F401  (the workers inherit it)

        d = plan["decode"]
        _JPEGS[:] = synthetic_jpegs(d["n"], d["side"])
        made = time.perf_counter() - made
        pool = multiprocessing.get_context("fork").Pool(d["workers"])
    c = Check(args, device, dtype)
    if pool is not None:
        print(
            f"made {len(_JPEGS)} JPEGs in {made:.1f} s; {plan['decode']['workers']} decode workers",
            flush=True,
        )
    print(
        f"gpu_check: {c.meta['machine']['gpu'] or 'CPU'} | torch {torch.__version__} | "
        f"transformers {c.meta['machine']['packages']['transformers']} | {args.dtype} | sections {sections}",
        flush=True,
    )

    def guarded(name: str, fn, *fargs):
        """A section that raises still leaves a row, and the next section runs."""
        try:
            return fn(*fargs)
        except Exception as err:  # noqa: BLE001
            c.fail(name, "section", "aborted", None, err)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    try:
        if "encode" in sections:
            guarded("encode", section_encode, c, plan)
        later = None
        if {"text", "itm", "graphs"} & set(sections):
            later = guarded("itm", section_text_itm, c, plan, set(sections))
        if pool is not None:
            guarded("decode", section_decode, c, plan, pool)
            pool.close()
            pool = None
        # Most wanted first: compiled BLIP-base (the encode target), then the compiled query,
        # then compiled BLIP-large; each is skipped when --budget-s would be exceeded.
        if "compile" in sections:
            guarded("compile", section_compile, c, plan["compile"][:1])
        if later is not None:
            guarded("graphs", later)
        if "compile" in sections:
            guarded("compile", section_compile, c, plan["compile"][1:])
    finally:
        if pool is not None:
            pool.terminate()
    bad = sorted(m for m in FORBIDDEN if m in sys.modules)
    c.add(
        "imports",
        "modules outside torch/transformers/PIL/numpy/blip_ops",
        "sys.modules",
        None,
        note=f"error: imported {bad}" if bad else "ok: none of " + ", ".join(FORBIDDEN),
    )
    print("\n" + table(c))
    if args.smoke:
        print("\ntargets: not judged (--smoke: tiny model on the CPU)")
    else:
        print("\n" + "\n".join(verdicts(c)))
    print(f"\ntotal {c.elapsed():.0f} s" + (f"; rows in {args.json}" if args.json else ""))
    failed = [r for r in c.rows if r["note"].startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
