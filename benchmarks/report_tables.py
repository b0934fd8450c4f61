"""The tables of docs/performance.md sections 1-5, each from one result file.

Each function takes the loaded result files (``report_data.load_all``) and returns a Markdown
table, or None when its result file (or the part of it the table needs) is missing.
"""

from __future__ import annotations

from benchmarks.common import decode_grid
from benchmarks.report_data import ANCHORS, num, rec, search_label, table
from benchmarks.report_projection import project_index, project_query


# ---- 1. indexing on CPU --------------------------------------------------------------------------
def index_table(d: dict) -> str | None:
    index = d["index"]
    if not index:
        return None
    rows = []
    for m in index["models"]:
        j, mo, nv = m["job"], m["model_only"], m.get("naive") or {}
        r = m["pipeline_vs_model_only"]
        rows.append(
            [
                m["model"],
                f"{mo['image_size']} px",
                num(nv.get("images_per_s")) if nv else "n/a (not an HF BLIP)",
                num(j["end_to_end_images_per_s"]),
                num(j["images_per_s"]),
                num(j["steady_images_per_s"]),
                num(mo["images_per_s"]),
                f"{100 * r['steady']:.0f}% / {100 * r['stream']:.0f}%",
            ]
        )
    head = ["model", "input", "naive loop img/s", "job end to end img/s", "job stream img/s",
            "job steady img/s", "model only img/s", "steady / stream vs model only"]  # fmt: skip
    return table(head, rows)


def index_phases_table(d: dict) -> str | None:
    if not d["index"]:
        return None
    keys = ["driver_model_load", "ray_init", "stream", "merge", "index", "report", "other"]
    rows = [
        [m["model"], *(num(m["job"]["phases_s"].get(k), 2) for k in keys), num(m["job"]["seconds"], 2)]
        for m in d["index"]["models"]
    ]
    return table(["model", *keys, "total"], rows)


STAGE_KEYS = ["read", "validate", "decode", "preprocess", "encode", "encode_default_malloc",
              "encode_1mib_malloc", "derivatives", "stage", "encode_batch_call"]  # fmt: skip


def index_stages_table(d: dict) -> str | None:
    if not d["index"]:
        return None
    rows = [
        [m["model"], *(num(m["stages"]["ms_per_image"].get(k), 2) for k in STAGE_KEYS)]
        for m in d["index"]["models"]
    ]
    return table(["model", *STAGE_KEYS], rows)


def index_ablation_table(d: dict) -> str | None:
    ablated = [m for m in (d["index"] or {}).get("models", []) if m.get("ablation")]
    if not ablated:
        return None
    rows = []
    for m in ablated:
        runs = [("as committed", m["job"])] + [(a["label"], a["job"]) for a in m["ablation"]]
        for label, j in runs:
            rows.append([m["model"], label, num(j["steady_images_per_s"]), num(j["images_per_s"]),
                         num(j["worker_peak_rss_mb"], 0)])  # fmt: skip
    head = ["model", "encoder settings", "job steady img/s", "job stream img/s", "encoder peak MB"]
    return table(head, rows)


def index_naive_table(d: dict) -> str | None:
    naive = [m for m in (d["index"] or {}).get("models", []) if m.get("naive")]
    if not naive:
        return None
    nk = ["read", "decode", "processor", "model", "write"]
    rows = [
        [m["model"], *(num(m["naive"]["ms_per_image"][k], 2) for k in nk), m["naive"]["processor"]]
        for m in naive
    ]
    return table(["model", *nk, "processor"], rows)


def index_decode_table(d: dict) -> str | None:
    if not d["index"]:
        return None
    sizes, grid = decode_grid(d["index"]["decode"])
    rows = [[o, *(num(v) for v in values)] for o, values in grid.items()]
    return table(["option", *(f"to {s} px" for s in sizes)], rows)


def model_table(d: dict) -> str | None:
    if not d["model"]:
        return None
    rows = [
        [
            r.get("name", r["model"]),
            f"{r['image_size']} px",
            r["attention"],
            r["batch_size"],
            num(r.get("images_per_s")),
            num(r.get("texts_per_s")),
            num(r.get("itm_ms_per_query"), 2),
        ]
        for r in d["model"]["rows"]
        if "error" not in r
    ]
    head = ["model", "input", "attention", "batch", "images/s", "texts/s",
            "ITM ms / query (K=32, cached)"]  # fmt: skip
    return table(head, rows)


# ---- 2. ANN and the text query -------------------------------------------------------------------
def ann_size_table(d: dict, rows_wanted: int) -> str | None:
    """Every index and search setting measured at ``rows_wanted`` rows."""
    ann = d["ann"]
    size = next((s for s in (ann or {}).get("sizes", []) if s["rows"] == rows_wanted), None)
    if size is None:
        return None
    k = ann["k"]
    rows = [
        [
            cfg["index_type"],
            cfg["num_partitions"],
            num(cfg["build_s"]),
            search_label(cfg["search"]),
            num(cfg["p50_ms"], 2),
            num(cfg["p99_ms"], 2),
            f"{rec(cfg, k):.3f}",
            f"{cfg['speedup_vs_exact_p50']}×",
        ]
        for cfg in size["configs"]
    ]
    head = ["index", "partitions", "build s", "search", "p50 ms", "p99 ms", f"recall@{k}",
            "vs exact (p50)"]  # fmt: skip
    return table(head, rows)


def text_query_table(d: dict) -> str | None:
    tq = (d["ann"] or {}).get("text_query") or []
    if not tq:
        return None
    stages = ("encode", "ann", "fetch", "itm")
    rows = [
        [r["model"], f"{r['image_size']} px", r["rerank_k"], r["token_cache"], r["n"],
         num(r["p50_ms"], 1), num(r["p99_ms"], 1),
         " / ".join(num(r["stages_p50_ms"][s], 1) for s in stages)]
        for r in tq
    ]  # fmt: skip
    head = ["model", "input", "rerank_k", "token cache", "queries", "p50 ms", "p99 ms",
            "p50 ms: encode / ANN / fetch / ITM"]  # fmt: skip
    return table(head, rows)


def batched_itm_table(d: dict) -> str | None:
    bi = (d["ann"] or {}).get("batched_itm") or []
    if not bi:
        return None
    rows = [
        [r["model"], num(r["itm_ms"], 1), num(r["tokenise_distinct_ms"], 2),
         num(r["tokenise_every_pair_ms"], 2)]
        for r in bi
    ]  # fmt: skip
    head = ["model", "ITM of the batch ms", "tokenise distinct texts ms", "tokenise every pair ms"]
    return table(head, rows)


# ---- 3. the service ------------------------------------------------------------------------------
def _serve_row(batching: str, label: str, r: dict) -> list:
    """One row of the service table: throughput, latency, server time, HTTP overhead, stages."""
    overhead = None if r.get("mean_ms") is None else r["mean_ms"] - r["server_ms_per_request"]
    return [
        batching,
        label,
        num(r["qps"]),
        num(r["p50_ms"]),
        num(r["p99_ms"]),
        num(r["server_ms_per_request"]),
        num(overhead),
        ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["stage_share"].items()),
    ]


def serve_table(d: dict) -> str | None:
    if not d["serve"]:
        return None
    rows = []
    for run in d["serve"]["runs"]:
        b = "on" if run["batching"] else "off"
        for name, r in run["single_client"].items():
            rows.append(_serve_row(b, f"1 client, {name}", r))
        for r in run["concurrency"]:
            label = f"{r['clients']} client{'' if r['clients'] == 1 else 's'}"
            rows.append(_serve_row(b, label, r))
    head = ["@serve.batch", "load", "queries/s", "p50 ms", "p99 ms", "server ms",
            "HTTP + queueing ms", "server time by stage"]  # fmt: skip
    return table(head, rows)


# ---- 4. GPU components ---------------------------------------------------------------------------
def _reference_table() -> str:
    a = ANCHORS
    rows = [
        ["BLIP-base vision @384: eager / SDPA / SDPA + compile",
         f"{num(a['encode_eager'], 0)} / {num(a['encode_sdpa'], 0)} / {num(a['encode_compiled'], 0)} img/s"],
        ["BLIP-large vision @384: eager / SDPA",
         f"{num(a['large_eager'], 0)} / {num(a['large_sdpa'], 0)} img/s"],
        ["text encoder, batch 1 / 64", f"{a['text_b1_ms']} / {a['text_b64_ms']} ms"],
        ["ITM 1 × 32: cached / + vision recompute",
         f"{a['itm32_cached_ms']} / + {a['itm32_recompute_extra_ms']} ms"],
        ["ITM 1 × 128: cached / + vision recompute",
         f"{a['itm128_cached_ms']} / + {a['itm128_recompute_extra_ms']} ms"],
        ["ITM batched 64 × 32",
         f"{num(a['itm_batched_64x32_ms'], 0)} ms → {num(a['itm_batched_qps'], 0)} queries/s"],
        ["JPEG 800×800 → 384, PIL on 16 cores: plain / draft",
         f"{num(a['pil_plain_16'], 0)} / {num(a['pil_draft_16'], 0)} img/s"],
        ["nvJPEG (torchvision, CUDA), batches of 128", f"{num(a['nvjpeg_128'], 0)} img/s"],
    ]  # fmt: skip
    return table(["component (H200 reference)", "figure"], rows)


def gpu_table(d: dict) -> str:
    """``gpu_check.py``'s rows; without a result, the H200 reference figures (labelled)."""
    gpu = d["gpu"]
    if not gpu:
        return _reference_table()
    rows = [
        [
            r["section"],
            r["what"],
            r["variant"],
            "–" if r["batch"] is None else r["batch"],
            "–" if r["value"] is None else f"{num(r['value'])} {r['unit']}",
            num(r["ms"], 2),
            "–" if r.get("peak_share") is None else f"{100 * r['peak_share']:.1f}%",
            r["note"],
        ]
        for r in gpu["rows"]
    ]
    head = ["section", "what", "variant", "batch", "figure", "ms", "% of 790 TFLOP/s", "note"]
    return table(head, rows)


# ---- 5. projection -------------------------------------------------------------------------------
def projection_index_table(d: dict) -> str | None:
    lines = project_index(d)["lines"]
    return table(["part", "figure", "measured where"], lines) if lines else None


def projection_query_table(d: dict) -> str | None:
    lines = project_query(d)["lines"]
    return table(["part", "figure", "measured where"], lines) if lines else None
