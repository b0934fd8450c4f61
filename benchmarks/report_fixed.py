"""Section 6's before/after table of docs/performance.md, from the result files only.

A before figure is only set against an after figure from the same run (``--ablate``, two settings
timed in one process) or from runs back to back (``benchmarks/results/before/`` holds the code
before the fixes, run from a git worktree); nothing is typed in by hand.
"""

from __future__ import annotations

from benchmarks.report_data import model_entry, num, table
from benchmarks.report_projection import project_index

MODELS = ("compact", "tiny")
ABLATE = "bench_index.py --ablate, same run"


def _ba_row(what: str, before, after, unit: str, digits: int, src: str) -> list:
    """One before/after row: the two figures and their ratio (after / before)."""
    ratio = (
        f"{after / before:.2f}×" if isinstance(before, (int, float)) and before and after else "–"
    )
    return [what, f"{num(before, digits)} {unit}", f"{num(after, digits)} {unit}", ratio, src]


def _ablation(m: dict | None, label_start: str) -> dict | None:
    for a in (m or {}).get("ablation", []):
        if a["label"].startswith(label_start):
            return a["job"]
    return None


def _commit(d: dict) -> str:
    return (d.get("before_index") or d.get("before_query") or {}).get("commit", "before")


def _all_fixes(d: dict) -> list[list]:
    """The job's steady images/s before all fixes and now, back to back."""
    index, before, rows = d["index"], d.get("before_index"), []
    for name in MODELS:
        m, b = model_entry(index, name), model_entry(before, name)
        if m and b:
            share = (b["pipeline_vs_model_only"]["steady"], m["pipeline_vs_model_only"]["steady"])
            rows.append(_ba_row(
                f"**all indexing fixes**: job steady images/s, {name} "
                f"({100 * share[0]:.0f}% → {100 * share[1]:.0f}% of model-only)",
                b["job"]["steady_images_per_s"], m["job"]["steady_images_per_s"], "img/s", 1,
                f"bench_index.py at {_commit(d)} → at {index.get('commit', 'HEAD')}, back to back",
            ))  # fmt: skip
    return rows


def _ablations(d: dict) -> list[list]:
    """Fixes 1 and 2 one at a time, from ``--ablate``'s runs of the same process."""
    index = d["index"]
    runs = [
        (name, _ablation(model_entry(index, name), "and the 1 MiB"),
         _ablation(model_entry(index, name), "derivatives on"))
        for name in MODELS
    ]  # fmt: skip
    rows = [
        _ba_row(f"1. encoder actor's mmap threshold 1 MiB → 32 MiB: job steady, {name} "
                "(derivatives on the actor's thread in both)",
                one_mib["steady_images_per_s"], thread["steady_images_per_s"], "img/s", 1, ABLATE)
        for name, one_mib, thread in runs
        if one_mib and thread
    ]  # fmt: skip
    rows += [
        _ba_row(f"1. … its cost: encoder actor peak memory, {name}",
                one_mib["worker_peak_rss_mb"], thread["worker_peak_rss_mb"], "MB", 0, ABLATE)
        for name, one_mib, thread in runs
        if one_mib and thread
    ]  # fmt: skip
    for name, _, thread in runs:
        m = model_entry(index, name)
        if thread and m:
            rows.append(_ba_row(
                f"2. stored JPEGs made on `encode.derivative_threads` threads while torch encodes: job steady, {name}",
                thread["steady_images_per_s"], m["job"]["steady_images_per_s"], "img/s", 1, ABLATE,
            ))  # fmt: skip
    return rows


def _derivatives(d: dict) -> list[list]:
    """Fix 2's CPU time per image: the stage split and the decode options, before and now."""
    index, before, bcommit = d["index"], d.get("before_index"), _commit(d)
    rows = []
    for name in MODELS:
        m, b = model_entry(index, name), model_entry(before, name)
        if m and b:
            rows.append(_ba_row(
                f"2. stored JPEGs' CPU time per image, {name} (one resize for the model and the JPEG; bicubic thumbnail)",
                b["stages"]["ms_per_image"]["derivatives"], m["stages"]["ms_per_image"]["derivatives"],
                "ms", 2, f"bench_index.py stage split at {bcommit} → now",
            ))  # fmt: skip
    bd, ad = (before or {}).get("decode") or {}, (index or {}).get("decode") or {}
    if bd.get("derivatives_384") and ad.get("derivatives_384"):
        rows.append(_ba_row(
            "2. stored JPEGs at BLIP-base's 384 px, CPU path (draft decode), per image",
            bd["derivatives_384"]["ms_per_image"], ad["derivatives_384"]["ms_per_image"], "ms", 2,
            f"bench_index.py at {bcommit} → now",
        ))  # fmt: skip
    if bd.get("derivatives_384_full_size") and ad.get("derivatives_384_gpu_path"):
        rows.append(_ba_row(
            "2. stored JPEGs at 384 px, GPU path: CPU time per image (before: PIL resized the "
            "full-size decode twice; now: resized on the GPU, JPEG-encoded on the CPU)",
            bd["derivatives_384_full_size"]["ms_per_image"], ad["derivatives_384_gpu_path"]["ms_per_image"],
            "ms", 2, f"bench_index.py at {bcommit} → now (the GPU resizes not timed here)",
        ))  # fmt: skip
    pi = project_index(d)
    if pi["before"] and pi["as_is"]:
        rows.append(_ba_row("projected indexing per H200 node (section 5)", pi["before"],
                            pi["as_is"], "img/s", 0, "projection"))  # fmt: skip
    return rows


def _rerank(d: dict) -> list[list]:
    """Fixes 3 and 4 from one source: the run back to back with the before files."""
    src_name, src = next(
        ((n, x) for n, x in (("ann-query.json", d.get("query")), ("ann-cpu.json", d["ann"])) if x),
        ("", None),
    )
    if not src:
        return []
    rows = []
    cd = src.get("candidate_decode_384") or {}
    if cd.get("ms_per_32_threads"):
        rows.append(_ba_row(
            f"3. re-rank: decode 32 candidates' 384-px JPEGs on a cache miss, one thread → "
            f"{cd['decode_threads']} threads (2 cores here)",
            cd["ms_per_32_one_thread"], cd["ms_per_32_threads"], "ms", 1,
            f"bench_ann.py, same run ({src_name})",
        ))  # fmt: skip
    for r in src.get("cold_itm") or []:
        rows.append(_ba_row(
            f"3. one query's ITM of 32, token cache cold (decode + vision + ITM), {r['model']}, "
            f"decode one thread → {r['decode_threads']} threads",
            r["one_thread_p50_ms"], r["threads_p50_ms"], "ms", 1,
            f"bench_ann.py, same run, interleaved ({src_name}; p50 of {r['rounds']} rounds)",
        ))  # fmt: skip
    for r in src.get("batched_itm") or []:
        rows.append(_ba_row(
            f"4. batched ITM, {r['queries']} queries × {r['candidates']}: tokenise every pair → "
            f"each query once, {r['model']}",
            r["tokenise_every_pair_ms"], r["tokenise_distinct_ms"], "ms", 2,
            f"bench_ann.py, same run ({src_name}); ITM of the whole batch {num(r['itm_ms'], 1)} ms",
        ))  # fmt: skip
    return rows


def _batch_wait(d: dict) -> list[list]:
    """Fix 5: the two service runs of ``make bench`` (every batch waits / adaptive wait)."""
    serve, fixed = d["serve"], d.get("serve_fixed_wait")
    on = next((r for r in (serve or {}).get("runs", []) if r["batching"]), None)
    on5 = next((r for r in (fixed or {}).get("runs", []) if r["batching"]), None)
    if not (on and on5):
        return []
    now = {r["clients"]: r for r in on["concurrency"]}
    old = {r["clients"]: r for r in on5["concurrency"]}
    wait_ms = 1000 * serve["batch_wait_timeout_s"]
    return [
        _ba_row(
            f"5. `@serve.batch` waits {wait_ms:g} ms for every batch → only while "
            f"other calls are in flight: queries/s at {c} client{'s' if c > 1 else ''} "
            f"(p50 {num(old[c]['p50_ms'])} → {num(now[c]['p50_ms'])} ms)",
            old[c]["qps"], now[c]["qps"], "q/s", 1,
            "bench_serve.py, the two runs of `make bench` back to back (serve-cpu-fixed-wait.json, serve-cpu.json)",
        )
        for c in sorted(set(now) & set(old))
        if c in (1, 4, 32)
    ]  # fmt: skip


def _text_query(d: dict) -> list[list]:
    """Fixes 3 + 4 on the full text query: its ITM stage before and now, back to back."""
    query, before_q = d.get("query"), d.get("before_query")
    if not (query and before_q):
        return []
    rows = []
    for r in query.get("text_query") or []:
        if r["rerank_k"] != 32 or r["token_cache"] != "cold":
            continue
        key = (r["model"], r["rerank_k"], r["token_cache"])
        b = next(
            (x for x in before_q.get("text_query") or []
             if (x["model"], x["rerank_k"], x["token_cache"]) == key),
            None,
        )  # fmt: skip
        if b:
            rows.append(_ba_row(
                f"3 + 4. full text query, {r['model']}, re-rank 32, token cache cold: ITM stage p50 "
                "(decode + vision + ITM)",
                b["stages_p50_ms"]["itm"], r["stages_p50_ms"]["itm"], "ms", 1,
                f"bench_ann.py at {_commit(d)} → at {query.get('commit', 'HEAD')}, back to back "
                "(one cell each: subject to the machine's drift)",
            ))  # fmt: skip
    return rows


def fixed_rows(d: dict) -> list[list]:
    """Before/after rows of section 6, in the order of the fixes."""
    return [
        *_all_fixes(d),
        *_ablations(d),
        *_derivatives(d),
        *_rerank(d),
        *_batch_wait(d),
        *_text_query(d),
    ]


def fixed_table(d: dict) -> str | None:
    rows = fixed_rows(d)
    return table(["what", "before", "after", "after / before", "measured"], rows) if rows else None
