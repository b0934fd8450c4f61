"""The summary table of docs/performance.md: each project target, our figure, met or missed, and
where the figure was measured (or projected: section 5)."""

from __future__ import annotations

from benchmarks.report_data import (
    ANCHORS,
    NOT_YET,
    ann_best,
    gpu_batched,
    gpu_best_encode,
    gpu_decode,
    gpu_name,
    gpu_query,
    num,
    rec,
    search_label,
    table,
    verdict,
)
from benchmarks.report_projection import project_index, project_query

ANN_TARGET = "ANN over 1M × 256-d: recall@100 ≥ 0.95 vs exact, ≥ 20× faster than exact"


def _encode(gpu) -> list:
    enc = gpu_best_encode(gpu)
    return [
        "Encode BLIP-base @384 bf16, one H200, model only: ≥ 4,000 img/s",
        f"{num(enc['value'])} img/s ({enc['variant']}, batch {enc['batch']})"
        if enc
        else f"{NOT_YET} (anchor: {num(ANCHORS['encode_compiled'], 0)} with SDPA + compile)",
        verdict(enc["value"] >= 4000 if enc else None),
        f"{gpu_name(gpu)}, `gpu_check.py` ({gpu['date'][:10]})"
        if enc
        else "needs a GPU: `make bench-gpu`",
    ]


def _decode(gpu) -> list:
    dec = gpu_decode(gpu, "blip_ops GPU path")
    return [
        "Decode + preprocess ≥ 3,500 img/s per H200 node",
        f"{num(dec['value'])} img/s (blip_ops GPU path)"
        if dec
        else f"{NOT_YET} (anchor: nvJPEG {num(ANCHORS['nvjpeg_128'], 0)}, PIL + draft on 16 cores {num(ANCHORS['pil_draft_16'], 0)})",
        verdict(dec["value"] >= 3500 if dec else None),
        f"{gpu_name(gpu)}, `gpu_check.py`" if dec else "needs a GPU",
    ]


def _pipeline(d: dict) -> list:
    proj = project_index(d)
    before = f" (before the fixes of section 6: {num(proj['before'])})" if proj["before"] else ""
    return [
        "Pipeline end to end ≥ 3,500 img/s per H200 node",
        f"projected {num(proj['as_is'])} img/s, bound by {proj['bound']}; the encoder actor's own thread on a GPU not measured"
        + before
        if proj["as_is"]
        else NOT_YET,
        verdict(proj["as_is"] >= 3500 if proj["as_is"] else None, projected=True),
        "projection (section 5): GPU components × CPU-measured per-image work",
    ]


def _one_query(gpu) -> list:
    q = gpu_query(gpu)
    anchor = ANCHORS["text_b1_ms"] + ANCHORS["itm32_cached_ms"] + ANCHORS["itm32_recompute_extra_ms"]
    return [
        "One text query, BLIP-base, H200: text encode + vision recompute + ITM of 32 ≤ 15 ms",
        f"{num(q['ms'], 2)} ms ({q['variant']})"
        if q
        else f"{NOT_YET} (anchor: {num(anchor)} ms before launch-overhead work)",
        verdict(q["ms"] <= 15 if q else None),
        f"{gpu_name(gpu)}, `gpu_check.py`" if q else "needs a GPU",
    ]


def _query_with_ann(pq: dict) -> list:
    got = NOT_YET
    if pq["p50"]:
        got = f"projected p50 {num(pq['p50'])} ms, p99 {num(pq['p99'])} ms (token cache cold)"
        if pq["rows"] < 1_000_000:
            got += f"; ANN measured at {pq['rows']:,} rows, not 1M"
    missed = pq["p50"] and (pq["p50"] > 25 or pq["p99"] > 60)
    # a miss at a smaller table is a miss at 1M too; a pass there says nothing yet
    judged = pq["p50"] and (pq["rows"] >= 1_000_000 or missed)
    return [
        "Query with ANN over 1M products: p50 ≤ 25 ms, p99 ≤ 60 ms",
        got,
        verdict(not missed if judged else None, projected=True),
        "projection (section 5)",
    ]


def _batched(gpu, pq: dict) -> list:
    b = gpu_batched(gpu)
    return [
        "≥ 400 queries/s with batching (one H200)",
        f"{num(b['value'])} queries/s ITM batched, 64 × 32 ({b['variant']}); projected service {num(pq['qps'])} q/s"
        if b
        else f"{NOT_YET} (anchor: {num(ANCHORS['itm_batched_qps'], 0)})",
        verdict(min(b["value"], pq["qps"] or b["value"]) >= 400 if b else None),
        "H200 component + CPU-measured per-query work (section 5)" if b else "needs a GPU",
    ]


def _ann(ann) -> list:
    size, best = ann_best(ann, 1_000_000)
    if size is None:
        largest, lbest = ann_best(ann)
        got = NOT_YET
        if largest:
            got += f" at 1M (largest measured: {largest['rows']:,} rows"
            if lbest:
                got += f", {lbest['index_type']} recall@{ann['k']} {rec(lbest, ann['k']):.3f}, {lbest['speedup_vs_exact_p50']}× exact"
            got += ")"
        return [ANN_TARGET, got, "–", "CPU, `bench_ann.py --sizes ... 1000000`"]
    k = ann["k"]
    if best:
        got = f"{best['index_type']} ({search_label(best['search'])}): recall@{k} {rec(best, k):.3f}, p50 {num(best['p50_ms'], 2)} ms vs exact {num(size['exact']['p50_ms'])} ms = {best['speedup_vs_exact_p50']}×"
        ok = best["speedup_vs_exact_p50"] >= 20
    else:
        top = max(size["configs"], key=lambda c: c[f"recall@{k}"])
        got = f"no setting reached recall 0.95 (best {rec(top, k):.3f}, {top['index_type']})"
        ok = False
    return [ANN_TARGET, got, verdict(ok), f"CPU, `bench_ann.py` ({ann['date'][:10]})"]


def _cpu_pipeline(index) -> list[list]:
    if not index:
        return [["CPU (2 cores): pipeline images/s ≥ 85% of model-only", NOT_YET, "–", "`bench_index.py`"]]
    rows = []
    for m in index["models"]:
        r = m["pipeline_vs_model_only"]
        rows.append(
            [
                f"CPU (2 cores): pipeline images/s ≥ 85% of model-only, {m['model']}, batch {index['batch_size']}",
                f"steady {100 * r['steady']:.0f}% ({num(m['job']['steady_images_per_s'])} vs {num(m['model_only']['images_per_s'])} img/s); whole stream {100 * r['stream']:.0f}%",
                verdict(r["steady"] >= 0.85),
                f"CPU, `bench_index.py` ({index['date'][:10]})",
            ]
        )
    return rows


def targets_table(d: dict) -> str:
    gpu = d["gpu"]
    pq = project_query(d)
    rows = [
        _encode(gpu),
        _decode(gpu),
        _pipeline(d),
        _one_query(gpu),
        _query_with_ann(pq),
        _batched(gpu, pq),
        _ann(d["ann"]),
        *_cpu_pipeline(d["index"]),
        [
            "`make demo` ≤ 10 minutes after the install",
            "not measured by `make bench` (`make demo` prints its own time)",
            "–",
            "–",
        ],
    ]
    return table(["target", "our figure", "", "measured where"], rows)
