"""Indexing on CPU: the Ray job end to end vs the model alone vs a naive loop, and where the time goes.

    python benchmarks/bench_index.py [--products 1000] [--models tiny compact] [--batch-size 16]
        [--ablate]
        [--workdir .data/bench/index] [--decode-sample 200] [--stage-sample 256]
        [--json benchmarks/results/index-cpu.json] [--plot benchmarks/results/index-cpu.png]

On a demo catalog (``pipelines.make_catalog``: rendered product photos, 400-1000 px, 85% JPEG /
8% PNG / 7% WebP, inline in Parquet; generated once per size under ``--workdir``), per model:

1. **The job**: ``pipelines.indexing.job.run_index`` with ``configs/local.yaml`` (local Ray, 2
   CPUs, one encoder actor), a fresh index folder, ``encode.batch_size`` = ``--batch-size``. Its
   summary's images/s (encoded rows / seconds of the Ray Data stream, actor start-up and model load
   included) and steady images/s (after the first encoder batch), and the driver's phases: Ray
   start, the stream (read → validate → decode + encode → stage, overlapped), merge, indexes,
   report, timed by wrapping those functions in this process (nothing in the job changes).
2. **Model only**: ``benchmarks.model_throughput.run_bench`` on the same checkpoint, batch size,
   device and attention, in this process: images/s of ``encode_images`` on pixel tensors (the
   ceiling).
3. **Naive baseline** (code, with part 5's: ``benchmarks/index_alternatives.py``) (HF BLIP checkpoints only: the compact family is not a
   ``BlipForImageTextRetrieval``): a plain loop as a user would write it first: read the Parquet
   files with pyarrow, ``PIL.Image.open(...).convert("RGB")``, transformers' ``BlipProcessor``,
   ``BlipForImageTextRetrieval.vision_model`` + ``vision_proj`` (transformers' eager attention),
   batches of ``--batch-size``, then one LanceDB ``create_table`` of ids + embeddings. No
   validation, no content hashes, no thumbnails, no resume, no accounting.
4. **Where the time goes**: each stage's own function timed over a sample of the catalog (ms per
   image, torch on ``encode.torch_threads`` threads as in the actor): ``read_files``,
   ``validate``, then inside ``EncodeBatch``: decode (``decode_batch``), preprocess, encode,
   derivatives (``EncodeBatch._derivatives`` on one thread: model-resolution JPEG from the
   model's own resize, thumbnail, plus the normalised title), the whole ``EncodeBatch`` call as a
   cross-check (wall time: its derivative threads overlap the encoder), and
   ``write_staged_rows`` (stage); merge and index per image come from the job run. The encoder is
   also timed, with its minor page faults counted, on the same pixel tensors with glibc's default
   malloc, with ``EncodeBatch``'s mmap threshold (``encode.malloc_mmap_threshold_mb``) and with
   the 1 MiB threshold it had before (``malloc_cap``): the threshold applies to the whole process,
   and this shows what it costs the model. In the job the stream's stages overlap on 2 cores, so
   these add up to CPU time, not wall time.
Model-only, naive, stage and decode measurements each run in a fresh spawned process, so no
setting of one (threads, malloc) leaks into the next; the job runs in this process.
5. **Decode options** on the catalog's images at each model's input size and at BLIP-base's 384:
   PIL plain (open, convert, resize), PIL with ``draft``, ``blip_ops.decode.decode_image`` without
   and with ``target_size`` (the job's path), each followed by the bicubic resize; one thread.

Expected runtime on 2 quiet cores: ~1.5 min for ``--models tiny`` at 1,000 products, ~4 min with
compact (docs/performance.md has the measured figures).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REPO,
    RESULTS,
    decode_grid,
    header,
    save,
)
from benchmarks.index_alternatives import decode_options, naive_baseline  # noqa: E402
from pipelines.evaluation.charts import bar_chart, stack  # noqa: E402

logger = logging.getLogger("bench_index")

MODEL_DIRS = {
    "tiny": REPO / ".data" / "models" / "tiny",
    "compact": REPO / ".data" / "models" / "compact",
}
STAGES = ("read", "validate", "decode", "preprocess", "encode", "derivatives", "stage")


# ---- inputs --------------------------------------------------------------------------------------
def ensure_model(name: str) -> Path:
    """The checkpoint directory for ``tiny`` / ``compact`` (built under .data/models when missing,
    as ``make demo`` does) or a path."""
    from pipelines.runtime.inputs import ensure_model as ensure

    path = Path(ensure(MODEL_DIRS.get(name, Path(name)).resolve()))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--models {name!r}: not tiny, compact or a checkpoint directory")
    return path


def ensure_catalog(workdir: Path, products: int, seed: int = 0) -> Path:
    from pipelines.runtime.inputs import ensure_catalog as ensure

    out = workdir / f"catalog-{products}"
    ensure(out, products, seed)
    return out


def job_config(model_dir: Path, catalog: Path, index_dir: Path, batch_size: int, *extra: str):
    from pipelines.config import load_config

    return load_config(
        REPO / "configs" / "local.yaml",
        [
            f"model.name_or_path={model_dir}",
            f"source.uri={catalog / 'products'}",
            f"index.uri={index_dir}",
            f"encode.batch_size={batch_size}",
            *extra,
        ],
    )


# The job again with one encoder setting at a time turned back (``--ablate``): what each of the
# 2026-11-29 encoder changes is worth on its own.
ABLATIONS = (
    ("derivatives on the actor's thread", ("encode.derivative_threads=0",)),
    (
        "and the 1 MiB malloc threshold (before)",
        ("encode.derivative_threads=0", "encode.malloc_mmap_threshold_mb=1"),
    ),
)


def in_subprocess(fn, *args):
    """Run ``fn(*args)`` in a fresh spawned process: its torch threads and malloc settings never
    leak into the next measurement (``EncodeBatch`` and ``merge_staged`` call
    ``cap_malloc_retention()``, which changes how fast this process's torch runs)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ---- 1. the job ----------------------------------------------------------------------------------
@contextlib.contextmanager
def phase_timers(phases: dict[str, float]):
    """Time the job's driver-side phases by wrapping the functions it calls (same process)."""
    targets = [
        ("blip_ops", "load_model", "driver_model_load"),
        ("pipelines.indexing.job", "init_ray", "ray_init"),
        ("pipelines.indexing.staging", "merge_staged", "merge"),
        ("pipelines.indexing.job", "build_indexes", "index"),
        ("pipelines.indexing.job", "write_run_report", "report"),
    ]
    saved = []
    for module_name, attr, phase in targets:
        module = importlib.import_module(module_name)
        original = getattr(module, attr, None)
        if original is None:
            logger.warning("%s.%s not found: phase %r not timed", module_name, attr, phase)
            continue

        def timed(*a, _f=original, _p=phase, **kw):
            t0 = time.perf_counter()
            try:
                return _f(*a, **kw)
            finally:
                phases[_p] = phases.get(_p, 0.0) + time.perf_counter() - t0

        setattr(module, attr, timed)
        saved.append((module, attr, original))
    try:
        yield phases
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def run_job(cfg, index_dir: Path) -> dict:
    from pipelines.indexing.job import run_index

    shutil.rmtree(index_dir, ignore_errors=True)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    with phase_timers(phases):
        summary = run_index(cfg)
    wall = time.perf_counter() - t0
    encoded = summary["encoded_this_run"]
    stream = encoded / summary["images_per_s"] if summary["images_per_s"] else None
    if stream is not None:
        phases["stream"] = stream
    phases["other"] = max(0.0, summary["seconds"] - sum(phases.values()))
    keys = (
        "in",
        "indexed",
        "unchanged",
        "rejected",
        "encoded_this_run",
        "seconds",
        "images_per_s",
        "steady_images_per_s",
        "products_rows",
        "ann_index",
        "driver_peak_rss_mb",
        "worker_peak_rss_mb",
    )
    return {
        **{k: summary.get(k) for k in keys},
        "wall_s": round(wall, 2),
        "end_to_end_images_per_s": round(encoded / wall, 2),
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
    }


# ---- 2. model only -------------------------------------------------------------------------------
def model_only(model_dir: Path, batch_size: int, attention: str) -> dict:
    from benchmarks.model_throughput import run_bench

    (row,) = run_bench(str(model_dir), batch_sizes=[batch_size], device="cpu", attention=attention)
    keep = (
        "images_per_s",
        "image_ms_per_batch",
        "texts_per_s",
        "itm_ms_per_query",
        "warmup",
        "iters",
        "gflop_per_image",
        "image_size",
        "params",
        "threads",
    )
    return {k: row.get(k) for k in keep}


# ---- 4. where the time goes ----------------------------------------------------------------------
def _read_and_validate(cfg, catalog: Path, s3, cols, ms: dict[str, float]):
    """The catalog read and validated as the job's first two stages do; their ms per image go
    into ``ms``. Returns the validated rows."""
    from pipelines.indexing.stages import RunState, read_files, validate
    from pipelines.indexing.validate import duplicated_ids

    files = [str(p) for p in sorted((catalog / "products").glob("*.parquet"))]
    t = time.perf_counter()
    read = [
        b
        for f in files
        for b in read_files({"path": np.array([f])}, source_uri=cfg.source.uri, s3=s3, columns=cols)
    ]
    n_read = sum(b.num_rows for b in read)
    ms["read"] = (time.perf_counter() - t) / n_read * 1000
    all_ids = pa.chunked_array([b.column("product_id") for b in read])
    state = RunState(
        duplicates=frozenset(duplicated_ids(all_ids)), max_image_bytes=cfg.source.max_image_bytes
    )
    t = time.perf_counter()
    validated = [validate(b, state=state) for b in read]
    ms["validate"] = (time.perf_counter() - t) / n_read * 1000
    return pa.concat_tables(validated)


def _encode_loop(m, pix: list) -> tuple[float, float]:
    """ms and minor page faults per image of encoding ``pix`` (after one warm-up batch)."""
    import resource

    n_pix = sum(len(x) for x in pix)
    m.encode_images(pix[0])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for x in pix:
        m.encode_images(x)
    dt = time.perf_counter() - t
    return dt / n_pix * 1000, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n_pix


def _malloc_comparison(cfg, rows, bs: int) -> tuple[list, tuple, tuple]:
    """The encoder on the same images before EncodeBatch caps glibc's malloc retention (its
    __init__ calls cap_malloc_retention(); see pipelines/indexing/stages.py), and with the 1 MiB
    threshold it set before: the difference is that setting's cost on this model. Returns the
    pixel batches and (ms, faults) per image of both."""
    from blip_ops import load_model
    from blip_ops.decode import decode_batch
    from pipelines.indexing.stages import cap_malloc_retention

    plain = load_model(
        cfg.model.name_or_path,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        attention=cfg.model.attention,
    )
    psize = plain.image_settings.size
    batches = [rows.slice(i, bs) for i in range(0, rows.num_rows, bs)]
    pix = [
        plain.preprocess(
            [
                im
                for im in decode_batch(b.column("image").to_pylist(), target_size=psize).images
                if im is not None
            ]
        )
        for b in batches
    ]
    before = _encode_loop(plain, pix)
    del plain
    cap_malloc_retention(1 << 20)  # the threshold EncodeBatch set before 2026-11-29
    one_mib = _encode_loop(load_model(cfg.model.name_or_path, device=cfg.model.device), pix)
    return pix, before, one_mib


def _encode_batch(cfg, s3):
    """The job's encoder stage, configured as the job configures it."""
    from blip_ops.token_cache import token_shape
    from pipelines.indexing.stages import EncodeBatch, stores_itm_tokens

    enc = EncodeBatch(
        model=cfg.model.name_or_path,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        attention=cfg.model.attention,
        thumbnail_size=cfg.encode.thumbnail_size,
        source_uri=cfg.source.uri,
        s3=s3,
        max_image_bytes=cfg.source.max_image_bytes,
        torch_threads=cfg.encode.torch_threads,
        derivative_threads=cfg.encode.derivative_threads,
        malloc_mmap_threshold_mb=cfg.encode.malloc_mmap_threshold_mb,
    )
    # The job decides this on its driver from the model's token shape; the same rule here.
    index = cfg.index
    enc.store_tokens = stores_itm_tokens(
        index.store_itm_tokens, token_shape(enc.model), index.max_stored_token_bytes
    )
    return enc


def _time_stages(cfg, enc, rows, workdir: Path) -> tuple[dict[str, float], int]:
    """Seconds spent in each stage's own function over ``rows``, one batch after another, and the
    number of images that decoded."""
    from blip_ops.decode import decode_batch
    from pipelines.indexing import staging as stage_io
    from pipelines.indexing import tables

    bs = cfg.encode.batch_size
    model, size = enc.model, enc.model.image_settings.size
    parts = dict.fromkeys(
        ("decode", "preprocess", "encode", "derivatives", "encode_batch_call", "stage"), 0.0
    )
    metadata = [rows.schema.field(c) for c in cfg.source.metadata_columns if c in rows.schema.names]
    schema = tables.products_schema(model.embedding_dim, metadata)
    stage_uri = stage_io.dataset_uri(str(workdir / "stage-split"), "staging")
    shutil.rmtree(workdir / "stage-split", ignore_errors=True)
    enc(rows.slice(0, bs))  # warm-up: first calls allocate
    images = 0
    for start in range(0, rows.num_rows, bs):
        batch = rows.slice(start, bs)
        datas = batch.column("image").to_pylist()
        t = time.perf_counter()
        decoded = decode_batch(
            datas, target_size=size, max_bytes=cfg.source.max_image_bytes, device=str(model.device)
        )
        parts["decode"] += time.perf_counter() - t
        ok = [im for im in decoded.images if im is not None]
        t = time.perf_counter()
        resized = model.resize(ok)
        pixels = model.preprocess(resized, device=model.device)
        parts["preprocess"] += time.perf_counter() - t
        t = time.perf_counter()
        model.encode_images(pixels)
        parts["encode"] += time.perf_counter() - t
        t = time.perf_counter()
        ok_datas = [d for d, im in zip(datas, decoded.images, strict=True) if im is not None]
        for job, title in zip(
            enc.derivative_jobs(resized, ok, ok_datas),
            batch.column("title").to_pylist(),
            strict=False,
        ):
            enc._derivatives(job)
            model.normalize_text(title)
        parts["derivatives"] += time.perf_counter() - t
        t = time.perf_counter()
        encoded = enc(batch)
        parts["encode_batch_call"] += time.perf_counter() - t
        t = time.perf_counter()
        stage_io.write_staged_rows(encoded, uri=stage_uri, schema=schema, run_id="bench")
        parts["stage"] += time.perf_counter() - t
        images += len(ok)
    shutil.rmtree(workdir / "stage-split", ignore_errors=True)
    return parts, images


def stage_split(cfg, catalog: Path, workdir: Path, sample: int) -> dict:
    """ms per image of each stage's function on a sample (see the module docstring)."""
    import torch

    from pipelines.indexing.stages import Columns
    from pipelines.storage import S3Settings

    if cfg.encode.torch_threads:
        torch.set_num_threads(cfg.encode.torch_threads)
    s3 = S3Settings()
    cols = Columns(metadata=tuple(cfg.source.metadata_columns))
    ms: dict[str, float] = {}
    rows = _read_and_validate(cfg, catalog, s3, cols, ms).slice(0, sample)
    bs = cfg.encode.batch_size
    pix, before, one_mib = _malloc_comparison(cfg, rows, bs)
    n_pix = sum(len(x) for x in pix)
    enc = _encode_batch(cfg, s3)
    after = _encode_loop(enc.model, pix)  # the same tensors, the same loop, EncodeBatch's threshold
    del pix
    parts, images = _time_stages(cfg, enc, rows, workdir)
    ms.update({k: v / images * 1000 for k, v in parts.items()})
    ms["encode_default_malloc"] = before[0]
    ms["encode_1mib_malloc"] = one_mib[0]
    return {
        "malloc_cap": {
            "images": n_pix,
            "threshold_mb": cfg.encode.malloc_mmap_threshold_mb,
            "ms_per_image_default": round(before[0], 3),
            "ms_per_image_capped": round(after[0], 3),
            "ms_per_image_1mib": round(one_mib[0], 3),
            "minor_faults_per_image_default": round(before[1], 1),
            "minor_faults_per_image_capped": round(after[1], 1),
            "minor_faults_per_image_1mib": round(one_mib[1], 1),
        },
        "derivative_threads": cfg.encode.derivative_threads,
        "sample_images": images,
        "batch_size": bs,
        "torch_threads": torch.get_num_threads(),
        "ms_per_image": {k: round(v, 3) for k, v in ms.items()},
    }


# ---- plot ----------------------------------------------------------------------------------------
def plot(result: dict, out: Path) -> Path:
    models = result["models"]
    groups = [m["model"] for m in models]
    series = {
        "naive loop (transformers + processor)": [
            (m.get("naive") or {}).get("images_per_s") for m in models
        ],
        "job end to end (run_index wall)": [m["job"]["end_to_end_images_per_s"] for m in models],
        "job stream (summary images/s)": [m["job"]["images_per_s"] for m in models],
        "job steady (after first batch)": [m["job"]["steady_images_per_s"] for m in models],
        "model only (model_throughput)": [m["model_only"]["images_per_s"] for m in models],
    }
    panels = [
        bar_chart(
            f"Indexing on CPU, {result['products']:,} products, batch {result['batch_size']}: images/s (log)",
            groups,
            series,
            ylabel="images/s",
            log=True,
        )
    ]
    stages = [*STAGES[:5], "encode_default_malloc", *STAGES[5:], "merge", "index"]
    series2 = {}
    for m in models:
        per = dict(m["stages"]["ms_per_image"])
        n = max(1, m["job"]["encoded_this_run"] or 1)
        for phase in ("merge", "index"):
            per[phase] = m["job"]["phases_s"].get(phase, 0.0) / n * 1000
        series2[m["model"]] = [per.get(s) for s in stages]
    labels = [s.replace("encode_default_malloc", "encode\n(malloc not capped)") for s in stages]
    panels.append(
        bar_chart(
            "Where the time goes: CPU ms per image per stage (log)",
            labels,
            series2,
            ylabel="ms / image",
            log=True,
        )
    )
    dec = result["decode"]
    sizes, series3 = decode_grid(dec)
    panels.append(
        bar_chart(
            f"Decode + resize, one thread, {dec['images']} catalog images: images/s",
            [f"to {s} px" for s in sizes],
            series3,
            ylabel="images/s",
        )
    )
    return stack(panels, out)


# ---- CLI -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from blip_ops.family import read_catalog_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--products", type=int, default=1000)
    p.add_argument(
        "--models", nargs="+", default=["tiny", "compact"], help="tiny, compact or checkpoint dirs"
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="encoder batch size (job and model-only)"
    )
    p.add_argument("--workdir", type=Path, default=REPO / ".data" / "bench" / "index")
    p.add_argument("--stage-sample", type=int, default=256, help="images timed per stage")
    p.add_argument("--decode-sample", type=int, default=200, help="images per decode option")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument(
        "--ablate",
        action="store_true",
        help="also run the job with each encoder setting turned back (derivative threads, malloc)",
    )
    p.add_argument("--json", type=Path, default=RESULTS / "index-cpu.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "index-cpu.png")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("pipelines", "ray", "blip_ops"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    result = header("index", argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    catalog = ensure_catalog(args.workdir, args.products)
    # Ray first (lancedb must be imported after it forks its workers); its start-up is reported
    # apart from the job's own phases.
    from pipelines.runtime.cluster import init_ray

    t0 = time.perf_counter()
    init_ray(
        job_config(ensure_model(args.models[0]), catalog, args.workdir / "unused", args.batch_size)
    )
    result["ray_init_s"] = round(time.perf_counter() - t0, 2)
    result.update(
        {
            "products": args.products,
            "batch_size": args.batch_size,
            "catalog": str(catalog),
            "config": "configs/local.yaml",
            "models": [],
        }
    )
    sizes = set()
    for name in args.models:
        model_dir = ensure_model(name)
        index_dir = args.workdir / f"index-{Path(name).name}"
        cfg = job_config(model_dir, catalog, index_dir, args.batch_size)
        entry: dict = {"model": Path(name).name, "path": str(model_dir)}
        logger.info("%s: model only", name)
        entry["model_only"] = in_subprocess(
            model_only, model_dir, args.batch_size, cfg.model.attention
        )
        sizes.add(entry["model_only"]["image_size"])
        family = read_catalog_config(model_dir).get("family", "hf_blip")
        entry["family"] = family
        if family == "hf_blip" and not args.skip_naive:
            logger.info("%s: naive baseline", name)
            entry["naive"] = in_subprocess(
                naive_baseline, model_dir, catalog, args.batch_size, args.workdir
            )
        else:
            entry["naive"] = None
        logger.info("%s: stage split", name)
        entry["stages"] = in_subprocess(stage_split, cfg, catalog, args.workdir, args.stage_sample)
        logger.info("%s: the index job", name)
        entry["job"] = run_job(cfg, index_dir)
        entry["index_dir"] = str(index_dir)
        mo = entry["model_only"]["images_per_s"]
        entry["pipeline_vs_model_only"] = {
            "stream": round(entry["job"]["images_per_s"] / mo, 4),
            "steady": round((entry["job"]["steady_images_per_s"] or 0) / mo, 4),
            "end_to_end": round(entry["job"]["end_to_end_images_per_s"] / mo, 4),
        }
        if entry["naive"]:
            entry["pipeline_vs_naive"] = round(
                entry["job"]["end_to_end_images_per_s"] / entry["naive"]["images_per_s"], 3
            )
        logger.info(
            "%s: job %.1f images/s (steady %s), model only %.1f, naive %s",
            name,
            entry["job"]["images_per_s"],
            entry["job"]["steady_images_per_s"],
            mo,
            (entry["naive"] or {}).get("images_per_s"),
        )
        if args.ablate:
            entry["ablation"] = []
            for label, overrides in ABLATIONS:
                logger.info("%s: the index job, %s", name, label)
                job = run_job(
                    job_config(model_dir, catalog, index_dir, args.batch_size, *overrides),
                    index_dir,
                )
                entry["ablation"].append({"label": label, "overrides": list(overrides), "job": job})
        result["models"].append(entry)
    sizes.add(384)
    logger.info("decode options")
    result["decode"] = in_subprocess(decode_options, catalog, sorted(sizes), args.decode_sample)
    save(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
