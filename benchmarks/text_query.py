"""Part 2 of ``benchmarks/bench_ann.py``: the full text query on its largest ANN table, and the
re-rank's parts on their own (candidate JPEG decode, cold-cache ITM, batched ITM). bench_ann.py's
docstring says what is measured; this module holds the measurements, bench_ann.py the CLI.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.common import summary_ms
from pipelines.search.snapshot import VECTOR

logger = logging.getLogger("bench_ann")

POOL = 256  # distinct model-resolution images in the side table


def model_path(name: str) -> Path:
    from benchmarks.bench_index import ensure_model

    return ensure_model(name)


def side_images(size: int, seed: int = 0) -> list[bytes]:
    """POOL model-resolution JPEGs of rendered demo-catalog products at ``size`` px."""
    from blip_ops.decode import decode_image
    from pipelines.catalog.plan import plan_catalog
    from pipelines.catalog.writer import render_image
    from pipelines.indexing.derivatives import model_resolution_jpeg

    out = []
    for product in plan_catalog(POOL, seed):
        im = decode_image(render_image(product), target_size=size)
        out.append(model_resolution_jpeg(im, size))
    return out


def bench_text_query(db, table, n_rows: int, setting: dict, args) -> list[dict]:
    from blip_ops import load_model
    from blip_ops.rerank import combine_scores
    from blip_ops.tiny_model import synthetic_titles
    from pipelines.search.scorer import ItmJob, QueryScorer

    dim = table.schema.field(VECTOR).type.list_size  # the ANN table's (256)
    rows = []
    texts = [" ".join(t.split()[:5]) for t in synthetic_titles(args.text_queries + 8, seed=1)]
    for name in args.query_models:
        path = model_path(name)
        model = load_model(str(path), device="cpu", dtype="float32", attention="sdpa")
        size = model.image_settings.size
        t0 = time.perf_counter()
        pool = side_images(size)
        side = db.create_table(
            f"images_{size}",
            data=pa.table(
                {
                    "slot": pa.array(range(POOL), pa.int32()),
                    "model_image": pa.array(pool, pa.binary()),
                }
            ),
            mode="overwrite",
        )
        logger.info(
            "%s: side table of %d %d-px JPEGs in %.1f s", name, POOL, size, time.perf_counter() - t0
        )
        for rerank_k in args.rerank_ks:
            for cache in ("cold", "warm"):
                scorer = QueryScorer(model, cache_items=0 if cache == "cold" else 100_000)
                stages: dict[str, list[float]] = {
                    s: [] for s in ("encode", "ann", "fetch", "itm", "total")
                }
                stop = time.perf_counter() + args.cell_seconds
                for i, text in enumerate(texts):
                    repeats = 2 if cache == "warm" else 1  # warm: time the second of two runs
                    for rep in range(repeats):
                        t = {"start": time.perf_counter()}
                        emb = scorer.encode_texts([text])[0]
                        t["encode"] = time.perf_counter()
                        vec = np.zeros(dim, np.float32)
                        vec[: min(dim, len(emb))] = emb[:dim]
                        vec /= max(float(np.linalg.norm(vec)), 1e-12)
                        found = _query_full(table, vec, args.candidates, setting)
                        t["ann"] = time.perf_counter()
                        pids = found.column("product_id").to_pylist()[:rerank_k]
                        slots = [int(p[1:]) % POOL for p in pids]
                        images = side.take_offsets(slots).select(["model_image"]).to_arrow()
                        images = images.column("model_image").to_pylist()
                        t["fetch"] = time.perf_counter()
                        itm = scorer.itm([ItmJob(text, tuple(pids), tuple(images))])[0]
                        itc = 1.0 - found.column("_distance").to_numpy(zero_copy_only=False)
                        combine_scores(itc, itm)
                        t["itm"] = time.perf_counter()
                        if i < 1 or rep < repeats - 1:  # the first query warms up
                            continue
                        prev = t["start"]
                        for s in ("encode", "ann", "fetch", "itm"):
                            stages[s].append(t[s] - prev)
                            prev = t[s]
                        stages["total"].append(t["itm"] - t["start"])
                    if len(stages["total"]) >= 3 and time.perf_counter() > stop:
                        break
                row = {
                    "model": name,
                    "model_id": model.model_id,
                    "image_size": size,
                    "embedding_dim": model.embedding_dim,
                    "padded_to_256": model.embedding_dim != dim,
                    "table_rows": n_rows,
                    "ann": setting,
                    "candidates": args.candidates,
                    "rerank_k": rerank_k,
                    "token_cache": cache,
                    **summary_ms(stages["total"]),
                    "stages_p50_ms": {
                        s: summary_ms(v)["p50_ms"] for s, v in stages.items() if s != "total"
                    },
                }
                rows.append(row)
                logger.info(
                    "%s rerank %d (%s cache): p50 %.1f ms p99 %.1f ms %s",
                    name,
                    rerank_k,
                    cache,
                    row["p50_ms"],
                    row["p99_ms"],
                    row["stages_p50_ms"],
                )
    return rows


def _query_full(table, vec, n, setting):
    b = table.search(vec, vector_column_name=VECTOR).distance_type("cosine")
    for knob, value in (setting or {}).items():
        b = getattr(b, knob)(value)
    return b.select(["product_id", "_distance"]).with_row_id(True).limit(n).to_arrow()


def candidate_decode(args) -> dict:
    """CPU cost of the re-ranker's decode of model-resolution JPEGs at BLIP-base's 384 px (what
    every cache miss pays before the vision tower): 32 candidates at a time with
    ``scorer.decode_candidates`` as ``QueryScorer`` calls it, one at a time on the request's thread
    (``serve.decode_threads`` 0 or 1, what the service did before) and on its thread pool (the
    default ``serve.decode_threads``)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.config import ServeConfig
    from pipelines.search.scorer import decode_candidates

    images = side_images(384)[:64]
    threads = ServeConfig().decode_threads
    out: dict = {"image_px": 384, "images": len(images), "decode_threads": threads}
    with ThreadPoolExecutor(threads) as pool:
        for key, use in (("one_thread", None), ("threads", pool)):
            decode_candidates(images[:32], 384, use)  # warm-up
            times = []
            for rep in range(6):
                start = (rep * 32) % len(images)
                t0 = time.perf_counter()
                decode_candidates((images * 2)[start : start + 32], 384, use)
                times.append(time.perf_counter() - t0)
            out[f"ms_per_32_{key}"] = round(float(np.median(times)) * 1000, 2)
    out["ms_per_image"] = round(out["ms_per_32_one_thread"] / 32, 3)
    out["ms_per_32"] = out["ms_per_32_one_thread"]  # the key older result files have
    return out


def cold_itm(args) -> list[dict]:
    """One query's ITM of 32 candidates with the token cache off (decode + vision + ITM), with the
    misses decoded one at a time (``serve.decode_threads`` 0, as before) and on the default
    threads, interleaved in one process so that the machine's drift hits both alike."""
    from blip_ops import load_model
    from pipelines.config import ServeConfig
    from pipelines.search.scorer import ItmJob, QueryScorer

    threads = ServeConfig().decode_threads
    rows = []
    for name in args.query_models:
        model = load_model(str(model_path(name)), device="cpu", dtype="float32", attention="sdpa")
        images = side_images(model.image_settings.size)[:32]
        job = ItmJob("red leather shoe", tuple(f"p{i}" for i in range(32)), tuple(images))
        scorers = {n: QueryScorer(model, cache_items=0, decode_threads=n) for n in (0, threads)}
        times: dict[int, list[float]] = {n: [] for n in scorers}
        stop = time.perf_counter() + args.cell_seconds
        for rep in range(21):
            for n, scorer in scorers.items():
                t0 = time.perf_counter()
                scorer.itm([job])
                if rep:  # the first round warms up
                    times[n].append(time.perf_counter() - t0)
            if rep >= 3 and time.perf_counter() > stop:
                break
        row = {
            "model": name,
            "image_size": model.image_settings.size,
            "candidates": 32,
            "rounds": len(times[0]),
            "decode_threads": threads,
            "one_thread_p50_ms": round(float(np.median(times[0])) * 1000, 2),
            "threads_p50_ms": round(float(np.median(times[threads])) * 1000, 2),
        }
        logger.info("%s cold ITM of 32: %s", name, row)
        rows.append(row)
    return rows


def batched_itm(args) -> list[dict]:
    """``QueryScorer.itm`` on a batch of ``--itm-batch`` queries x 32 cached candidates (what one
    ``@serve.batch`` call hands the model replica), and the tokenisation inside it: the distinct
    query texts (what ``itm_scores`` tokenises now) against one string per (query, candidate) pair
    (what it tokenised before 2026-11-29), with the checkpoint's own tokenizer and text rule."""
    from blip_ops.tiny_model import synthetic_titles

    texts = [" ".join(t.split()[:5]) for t in synthetic_titles(args.itm_batch, seed=2)]
    return [_batched_itm_one(name, texts, args.cell_seconds / 2) for name in args.query_models]


def _batched_itm_one(name: str, texts: list[str], seconds: float) -> dict:
    from blip_ops import load_model
    from pipelines.search.scorer import ItmJob, QueryScorer

    model = load_model(str(model_path(name)), device="cpu", dtype="float32", attention="sdpa")
    images = side_images(model.image_settings.size)[:32]
    keys = tuple(f"p{i}" for i in range(32))
    jobs = [ItmJob(t, keys, tuple(images)) for t in texts]
    scorer = QueryScorer(model, cache_items=1000)
    scorer.itm(jobs[:1])  # fills the token cache: the batch below is ITM only
    pairs = [t for t in texts for _ in keys]

    def every_pair():
        return model.tokenizer(
            [model.normalize_text(t) for t in pairs],
            padding="longest",
            truncation=True,
            max_length=model.text_settings.max_length,
            return_tensors="pt",
        )

    timed = {
        "itm": lambda: scorer.itm(jobs),
        "tokenise_distinct": lambda: model._tokenize(pairs),
        "tokenise_every_pair": every_pair,
    }
    row = {"model": name, "queries": len(jobs), "candidates": len(keys), "pairs": len(pairs)}
    for key, fn in timed.items():
        fn()
        times = []
        stop = time.perf_counter() + seconds
        while len(times) < 3 or (len(times) < 20 and time.perf_counter() < stop):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        row[f"{key}_ms"] = round(float(np.median(times)) * 1000, 2)
    logger.info("%s batched ITM: %s", name, row)
    return row
