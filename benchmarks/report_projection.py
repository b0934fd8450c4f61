"""Section 5 of docs/performance.md: indexing and one query on one H200 node, projected from the
GPU components (``gpu_check.py``, else the H200 reference) and the CPU-measured work per image or
per query. Each line of the projection names where its figure was measured."""

from __future__ import annotations

from benchmarks.common import REPO
from benchmarks.report_data import (
    ANCHORS,
    NODE_CORES,
    NOT_YET,
    ann_best,
    gpu_batched,
    gpu_best_encode,
    gpu_decode,
    gpu_query,
    num,
    search_label,
)


def prod_derivative_threads() -> int:
    """``encode.derivative_threads`` of configs/prod.yaml (the GPU deployment), else the default."""
    try:
        import yaml

        cfg = yaml.safe_load((REPO / "configs" / "prod.yaml").read_text()) or {}
        return int((cfg.get("encode") or {}).get("derivative_threads") or 2)
    except (OSError, ImportError, ValueError, TypeError):
        return 2


# ---- indexing ------------------------------------------------------------------------------------
def _gpu_components(gpu) -> tuple[float, str, float, str]:
    """(encode img/s, its source, decode img/s, its source): gpu_check.py, else the reference."""
    enc = gpu_best_encode(gpu)
    enc_v, enc_src = (
        (enc["value"], "gpu_check.py") if enc else (ANCHORS["encode_compiled"], "H200 reference")
    )
    dec = gpu_decode(gpu, "blip_ops GPU path")
    dec_v, dec_src = (
        (dec["value"], "gpu_check.py") if dec else (ANCHORS["nvjpeg_128"], "H200 reference (nvJPEG)")
    )
    return enc_v, enc_src, dec_v, dec_src


def _cpu_ms_per_image(ref: dict, jpeg: float | None) -> dict[str, float | None]:
    """CPU milliseconds per image of each part of the job besides the model."""
    ms = ref["stages"]["ms_per_image"]
    phases = ref["job"]["phases_s"]
    return {
        "stored JPEGs (model image + thumbnail, resized on the GPU, encoded on the CPU)": jpeg,
        "read (Parquet)": ms.get("read"),
        "validate (hashes, checks)": ms.get("validate"),
        "stage (Lance fragment write)": ms.get("stage"),
        "merge + index (driver, per image)": (
            (phases.get("merge", 0) + phases.get("index", 0))
            / max(1, ref["job"]["encoded_this_run"])
            * 1000
        ),
    }


def _index_lines(gpu_parts, per: dict, src: str, threads: int, caps: tuple) -> list[list]:
    enc_v, enc_src, dec_v, dec_src = gpu_parts
    actor_cap, node_cap = caps
    return [
        ["GPU encode, BLIP-base @384 bf16 (model only)", f"{num(enc_v)} img/s", enc_src],
        ["GPU decode + preprocess", f"{num(dec_v)} img/s", dec_src],
        *[
            [f"CPU {k}", f"{num(v, 2)} ms/img" if v is not None else NOT_YET, src]
            for k, v in per.items()
        ],
        [
            f"→ one encoder actor: its {threads} derivative threads (`encode.derivative_threads` "
            "in configs/prod.yaml) JPEG-encode while the GPU encodes",
            f"{num(actor_cap)} img/s",
            f"{threads} × 1000 / JPEG ms",
        ],
        [
            f"→ all CPU work spread over {NODE_CORES - 2} of the node's {NODE_CORES} cores",
            f"{num(node_cap)} img/s",
            f"{NODE_CORES - 2} × 1000 / sum of CPU ms",
        ],
        [
            "not in this sum: the encoder actor's own thread on the GPU path (nvJPEG submission, "
            "per-image thumbnail resizes, host copies of the small images, Arrow output)",
            NOT_YET,
            "needs the job on a GPU node (`gpu_check.py` times decode + preprocess as the job does)",
        ],
    ]


def project_index(d: dict) -> dict:
    """Images/s per H200 node: min of GPU encode, GPU decode and the CPU work per image.

    The encoder actor's stored JPEGs: before the fixes of section 6 PIL resized the full-size GPU
    decode on the actor's one thread (``derivatives_384_full_size``); now both images are resized
    on the GPU and only JPEG-encoded on the CPU, on ``encode.derivative_threads`` threads
    (``derivatives_384_gpu_path``)."""
    index = d["index"]
    gpu_parts = _gpu_components(d["gpu"])
    enc_v, enc_src, dec_v, dec_src = gpu_parts
    out = {"as_is": None, "bound": None, "before": None, "lines": []}
    if not index:
        return out
    ref = next((m for m in index["models"] if m["model"] == "compact"), index["models"][0])
    jpeg = (index["decode"].get("derivatives_384_gpu_path") or {}).get("ms_per_image")
    threads = prod_derivative_threads()
    per = _cpu_ms_per_image(ref, jpeg)
    before = d.get("before_index")
    old = ((before or {}).get("decode") or {}).get("derivatives_384_full_size")
    if old:
        out["before"] = min(enc_v, dec_v, 1000 / old["ms_per_image"])
    if jpeg is None:
        return out
    cpu_total = sum(v for v in per.values() if v)
    actor_cap, node_cap = threads * 1000 / jpeg, (NODE_CORES - 2) * 1000 / cpu_total
    caps = {
        f"GPU encode ({enc_src})": enc_v,
        f"GPU decode ({dec_src})": dec_v,
        f"one encoder actor's {threads} JPEG threads": actor_cap,
        f"the CPU work over {NODE_CORES - 2} cores": node_cap,
    }
    out["bound"], out["as_is"] = min(caps.items(), key=lambda kv: kv[1])
    src = f"bench_index.py ({ref['model']} model, this CPU)"
    out["lines"] = _index_lines(gpu_parts, per, src, threads, (actor_cap, node_cap))
    if old:
        out["lines"].append(
            [
                "→ before the fixes: PIL resized the full-size GPU decode for both JPEGs on the "
                "actor's one thread",
                f"{num(1000 / old['ms_per_image'])} img/s ({num(old['ms_per_image'], 2)} ms/img)",
                f"bench_index.py at {before.get('commit', 'the earlier commit')}",
            ]
        )
    return out


# ---- one query -----------------------------------------------------------------------------------
def _model_ms(gpu) -> tuple[float, str]:
    """Text encode + vision of 32 + ITM of 32 on the GPU, and where that figure comes from."""
    q = gpu_query(gpu)
    if q:
        return q["ms"], f"gpu_check.py ({q['variant']})"
    model_ms = ANCHORS["text_b1_ms"] + ANCHORS["itm32_cached_ms"] + ANCHORS["itm32_recompute_extra_ms"]
    return model_ms, "H200 reference (text 8.1 + ITM 16.6 + vision 9.6)"


def _http_ms(serve: dict | None) -> float | None:
    """One client's latency minus the server's own time: HTTP, Serve routing, JSON."""
    if not serve:
        return None
    single = serve["runs"][0]["single_client"]["rerank"]
    if single.get("mean_ms") is None:
        return None
    return max(0.0, single["mean_ms"] - single["server_ms_per_request"])


def _query_parts(d: dict, size: dict, best: dict) -> tuple[list[tuple], dict]:
    """(label, p50 ms, p99 ms, where) of each part of one query, and the candidate-decode entry."""
    ann = d["ann"]
    model_ms, model_src = _model_ms(d["gpu"])
    tq = [
        r
        for r in (ann.get("text_query") or [])
        if r["rerank_k"] == 32 and r["token_cache"] == "cold"
    ]
    fetch = min((r["stages_p50_ms"]["fetch"] for r in tq), default=None)
    cd = ann.get("candidate_decode_384") or {}
    dec32 = cd.get("ms_per_32_threads") or cd.get("ms_per_32")
    dec_how = (
        f"bench_ann.py (CPU, `serve.decode_threads` {cd['decode_threads']} threads on 2 cores)"
        if cd.get("ms_per_32_threads")
        else "bench_ann.py (CPU, one thread)"
    )
    http = _http_ms(d["serve"])
    ann_where = "bench_ann.py (CPU)" + (
        "" if size["rows"] >= 1_000_000 else ": 1M not measured yet, the largest table measured"
    )
    parts = [
        ("model: text encode + vision of 32 + ITM of 32", model_ms, model_ms, model_src),
        (
            f"ANN top 100 over {size['rows']:,} rows ({best['index_type']}, {search_label(best['search'])})",
            best["p50_ms"],
            best["p99_ms"],
            ann_where,
        ),
        ("fetch the 32 candidates' model-resolution JPEGs", fetch, fetch, "bench_ann.py (CPU)"),
        ("decode 32 model-resolution JPEGs (token cache miss)", dec32, dec32, dec_how),
        ("HTTP + Serve routing + JSON (client time − server time)", http, http,
         "bench_serve.py (CPU, 1 client)"),
    ]  # fmt: skip
    return parts, cd


def _query_sums(out: dict, gpu_qps: float, from_gpu: bool, cpu_ms: float, dec32: float) -> list[list]:
    return [
        [
            "→ one query, token cache cold",
            f"p50 ≈ {num(out['p50'])} ms, p99 ≤ {num(out['p99'])} ms",
            "sum",
        ],
        [
            "→ one query, token cache warm (no decode)",
            f"p50 ≈ {num(out['p50'] - dec32)} ms",
            "sum − decode",
        ],
        [
            f"→ throughput: min(GPU batched ITM, {NODE_CORES - 2} cores / CPU ms per query)",
            f"{num(out['qps'])} queries/s",
            f"GPU {num(gpu_qps)} q/s ({'gpu_check.py' if from_gpu else 'H200 reference'}); CPU {num(cpu_ms, 2)} ms/query",
        ],
    ]


def project_query(d: dict) -> dict:
    """One query on one H200 node with ANN over the largest table measured (1M when measured)."""
    out = {"p50": None, "p99": None, "qps": None, "rows": None, "p50_before": None, "lines": []}
    size, best = ann_best(d["ann"], 1_000_000)
    if size is None:
        size, best = ann_best(d["ann"])
    if not best:
        return out
    parts, cd = _query_parts(d, size, best)
    if any(p[1] is None for p in parts):
        out["lines"] = [
            [p[0], NOT_YET if p[1] is None else f"{num(p[1], 2)} ms", p[3]] for p in parts
        ]
        return out
    fetch, dec32 = parts[2][1], parts[3][1]
    out["rows"] = size["rows"]
    out["p50"] = sum(p[1] for p in parts)
    out["p99"] = sum(p[2] for p in parts)
    if cd.get("ms_per_32_threads"):  # the same sum with the one-thread decode of before
        out["p50_before"] = out["p50"] - dec32 + cd["ms_per_32_one_thread"]
    b = gpu_batched(d["gpu"])
    gpu_qps = b["value"] if b else ANCHORS["itm_batched_qps"]
    cpu_ms = best["p50_ms"] + fetch + dec32  # per query on the CPU, one core each
    out["qps"] = min(gpu_qps, (NODE_CORES - 2) * 1000 / cpu_ms)
    out["lines"] = [
        [p[0], f"{num(p[1], 2)} ms" + (f" (p99 {num(p[2], 2)})" if p[2] != p[1] else ""), p[3]]
        for p in parts
    ]
    out["lines"] += _query_sums(out, gpu_qps, b is not None, cpu_ms, dec32)
    return out
