"""ANN and full text-query latency on CPU: LanceDB tables of synthetic 256-d embeddings.

    python benchmarks/bench_ann.py [--sizes 10000 100000 1000000] [--queries 200]
        [--query-models tiny compact] [--rerank-ks 8 32 128] [--workdir .data/bench/ann]
        [--json benchmarks/results/ann-cpu.json] [--plot benchmarks/results/ann-cpu.png]

Part 1, ANN (per table size): a table of ``product_id`` + ``image_embedding`` (fixed_size_list
float32[256]; no image columns, so 1M rows stay ~1 GB on disk) filled with L2-normalised vectors
from a hierarchical Gaussian mixture (``Mixture``: categories, product families, low-rank noise, so
nearest neighbours are structured as real embeddings are, not uniform noise); queries are fresh draws
from the same mixture. Ground truth is exact top-``k`` by cosine in numpy. Measured:
  * exact search latency (LanceDB brute force, ``bypass_vector_index``; the figure to beat);
  * per index type (IVF_FLAT, IVF_PQ, IVF_HNSW_SQ, metric cosine, ``num_partitions`` = sqrt(rows)
    as the index job builds it): build seconds, then per search setting (nprobes, refine_factor,
    ef) p50/p99 latency of one query at a time and recall@k against exact.
Queries go through LanceDB's Python query builder exactly as the service's ``Snapshot.candidates``
does (select, limit, to_arrow), one at a time on the calling thread.

Part 2 (its code in ``benchmarks/text_query.py``), the full text query (per model, per re-rank
depth): encode the text
(``QueryScorer.encode_texts``) → ANN top 100 on the largest table (the last index built:
IVF_HNSW_SQ) → fetch the candidates' model-resolution JPEGs from a side table → ITM re-rank of
the first 8/32/128 (``QueryScorer.itm``: decode + vision tower + ITM, the service's own code) →
``combine_scores``. Twice: token cache cold (every candidate's vision tokens recomputed) and warm
(the same query repeated: tokens cached). The side table holds 256 real model-resolution JPEGs
of rendered catalog products, shared by all rows (row i uses image i mod 256), so 1M rows need no
1M images. A model whose ITC embedding is not 256-d (the tiny test model: 32-d) has its query
zero-padded to 256-d and renormalised: the ANN cost is that of a 256-d query. Each cell stops
after ``--text-queries`` queries or ``--cell-seconds`` seconds, whichever comes first, with at
least 3 timed queries after one warm-up (ITM of 128 candidates with the compact model takes
seconds per query on 2 cores: its p99 is then the slowest of a few).

Runtime on 2 quiet cores: see docs/performance.md ("How to run"); ``--sizes 10000 100000``
takes a few minutes, 1M adds the index builds at 1M (the bulk of the time).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    header,
    save,
    summary_ms,
)
from benchmarks.text_query import (  # noqa: E402
    POOL,
    batched_itm,
    bench_text_query,
    candidate_decode,
    cold_itm,
)
from pipelines.evaluation.charts import bar_chart, line_chart, stack  # noqa: E402
from pipelines.search.snapshot import VECTOR  # noqa: E402

logger = logging.getLogger("bench_ann")

DIM = 256
CHUNK = 10_000  # rows per generated chunk: a table of N rows is a prefix of a larger one

# (index type, build kwargs, list of search settings). Settings are dicts of nprobes /
# refine_factor / ef; {} is LanceDB's defaults, which is how the service searches
# (pipelines/search/snapshot.py sets none of these knobs).
INDEX_CONFIGS = {
    "IVF_FLAT": ({}, [{}, {"nprobes": 50}, {"nprobes": 100}]),
    "IVF_PQ": (
        {"num_sub_vectors": 32},
        [
            {},
            {"nprobes": 50},
            {"nprobes": 20, "refine_factor": 10},
            {"nprobes": 50, "refine_factor": 10},
            {"nprobes": 100, "refine_factor": 20},
        ],
    ),
    "IVF_HNSW_SQ": (
        {},
        [
            {},
            {"nprobes": 10, "ef": 150},
            {"nprobes": 20, "ef": 300},
            {"nprobes": 50, "ef": 300},
            {"nprobes": 100, "ef": 300},
        ],
    ),
}


# ---- data ----------------------------------------------------------------------------------------
class Mixture:
    """A fixed hierarchical Gaussian mixture on the 256-d sphere (reproducible row chunks and
    queries), shaped like image embeddings rather than uniform noise:

    ``x = normalize(0.35 g + c[cat] + 0.6 f[cat, fam] + e)``: a shared direction ``g`` (embedding
    spaces are anisotropic), 256 category centres with Dirichlet weights, 64 product families per
    category, and per-product noise ``e`` of norm ~0.5 with a decaying spectrum (std of the i-th
    of 256 random orthogonal directions ~ (i+1)^-0.7: low intrinsic dimension). The result's
    cosine statistics (random pairs, top-1 and top-100 neighbours) are stored with the results,
    so the reader can judge how close this is to their embeddings.
    """

    CATEGORIES, FAMILIES = 256, 64

    def __init__(self, seed: int = 0, dim: int = DIM):
        rng = np.random.default_rng([seed, 0])
        self.seed, self.dim = seed, dim

        def unit(*shape):
            v = rng.standard_normal((*shape, dim)).astype(np.float32)
            return v / np.linalg.norm(v, axis=-1, keepdims=True)

        self.shared = unit(1)[0] * 0.35
        self.centers = unit(self.CATEGORIES)
        self.families = unit(self.CATEGORIES, self.FAMILIES) * 0.6
        self.weights = rng.dirichlet(np.ones(self.CATEGORIES))
        spectrum = (np.arange(dim) + 1.0) ** -0.7
        spectrum *= 0.5 / np.linalg.norm(spectrum)  # E|e| ~ 0.5
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.noise_basis = (spectrum[:, None] * rotation).astype(np.float32)  # (dim, dim)

    def draw(self, n: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, stream])
        cat = rng.choice(self.CATEGORIES, size=n, p=self.weights)
        fam = rng.integers(0, self.FAMILIES, size=n)
        noise = rng.standard_normal((n, self.dim)).astype(np.float32) @ self.noise_basis
        x = self.shared + self.centers[cat] + self.families[cat, fam] + noise
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def rows(self, n: int):
        """(start, (m, dim) float32) chunks of the first n rows."""
        for i, start in enumerate(range(0, n, CHUNK)):
            yield start, self.draw(min(CHUNK, n - start), stream=1000 + i)

    def queries(self, n: int) -> np.ndarray:
        return self.draw(n, stream=7)


def cosine_stats(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    """Mean cosine of random pairs, and of each query's 1st and 100th exact neighbour."""
    rng = np.random.default_rng(0)
    a = vectors[rng.integers(0, len(vectors), 2000)]
    b = vectors[rng.integers(0, len(vectors), 2000)]
    top = np.einsum("qd,qkd->qk", queries, vectors[truth[:, [0, -1]]])
    return {
        "random_pair": round(float(np.mean(np.sum(a * b, axis=1))), 3),
        "top1": round(float(top[:, 0].mean()), 3),
        f"top{truth.shape[1]}": round(float(top[:, 1].mean()), 3),
    }


def build_table(db, name: str, mix: Mixture, n: int) -> tuple[object, np.ndarray, float]:
    """The table of the first n rows, and those rows in memory (for exact ground truth)."""
    vectors = np.empty((n, mix.dim), np.float32)
    schema = pa.schema(
        [pa.field("product_id", pa.string()), pa.field(VECTOR, pa.list_(pa.float32(), mix.dim))]
    )

    def batches():
        for start, x in mix.rows(n):
            vectors[start : start + len(x)] = x
            ids = pa.array([f"p{i:08d}" for i in range(start, start + len(x))], pa.string())
            emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), mix.dim)
            yield pa.RecordBatch.from_arrays([ids, emb], schema=schema)

    t0 = time.perf_counter()
    table = db.create_table(
        name, data=pa.RecordBatchReader.from_batches(schema, batches()), mode="overwrite"
    )
    return table, vectors, time.perf_counter() - t0


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) row indices of the k largest cosines (vectors are unit length), best first."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), 200_000):
        s = queries @ vectors[start : start + 200_000].T  # (Q, m)
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_i


# ---- queries -------------------------------------------------------------------------------------
def _query(table, q: np.ndarray, k: int, setting: dict | None, exact: bool = False):
    b = table.search(q, vector_column_name=VECTOR).distance_type("cosine")
    if exact:
        b = b.bypass_vector_index()
    for knob, value in (setting or {}).items():
        if value is not None:
            b = getattr(b, knob)(value)
    return b.select(["product_id", "_distance"]).limit(k).to_arrow()


def time_queries(table, queries, k, setting=None, *, exact=False, max_seconds=30.0, warmup=5):
    """Latencies (s) and returned ids, one query at a time; stops early after max_seconds
    (at least 10 queries)."""
    for q in queries[:warmup]:
        _query(table, q, k, setting, exact)
    lat, ids = [], []
    stop = time.perf_counter() + max_seconds
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        got = _query(table, q, k, setting, exact)
        lat.append(time.perf_counter() - t0)
        ids.append([int(p[1:]) for p in got.column("product_id").to_pylist()])
        if i >= 9 and time.perf_counter() > stop:
            break
    return lat, ids


def recall(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    hits = [len(set(f[:k]) & set(truth[i, :k].tolist())) / k for i, f in enumerate(found)]
    return float(np.mean(hits)) if hits else float("nan")


def bench_size(db, mix: Mixture, n: int, args) -> tuple[dict, object]:
    k = args.k
    name = f"vectors_{n}"
    table, vectors, write_s = build_table(db, name, mix, n)
    queries = mix.queries(args.queries)
    t0 = time.perf_counter()
    truth = exact_topk(vectors, queries, k)
    truth_s = time.perf_counter() - t0
    stats = cosine_stats(vectors, queries, truth)
    del vectors
    disk_mb = (
        sum(
            f.stat().st_size
            for f in (Path(args.workdir) / f"{name}.lance").rglob("*")
            if f.is_file()
        )
        / 2**20
    )
    out = {
        "rows": n,
        "dim": mix.dim,
        "k": k,
        "queries": len(queries),
        "write_s": round(write_s, 2),
        "numpy_exact_s": round(truth_s, 2),
        "disk_mb": round(disk_mb, 1),
        "cosines": stats,
        "configs": [],
    }
    lat, ids = time_queries(table, queries, k, exact=True, max_seconds=args.cell_seconds)
    out["exact"] = {**summary_ms(lat), "recall": round(recall(ids, truth, k), 4)}
    logger.info(
        "%d rows: exact p50 %.2f ms (recall %.3f vs numpy)",
        n,
        out["exact"]["p50_ms"],
        out["exact"]["recall"],
    )
    partitions = max(1, int(n**0.5))
    for index_type in args.index_types:
        build_kwargs, settings = INDEX_CONFIGS[index_type]
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # the job's own (deprecated) call, for parity
            warnings.simplefilter("ignore", DeprecationWarning)
            table.create_index(
                metric="cosine",
                vector_column_name=VECTOR,
                index_type=index_type,
                num_partitions=partitions,
                replace=True,
                **build_kwargs,
            )
        build_s = time.perf_counter() - t0
        stats = table.index_stats(f"{VECTOR}_idx")
        indexed = getattr(stats, "num_indexed_rows", None)
        logger.info(
            "%d rows: %s(%d) built in %.1f s (%s rows indexed)",
            n,
            index_type,
            partitions,
            build_s,
            indexed,
        )
        for setting in settings:
            lat, ids = time_queries(table, queries, k, setting, max_seconds=args.cell_seconds)
            row = {
                "index_type": index_type,
                "num_partitions": partitions,
                **build_kwargs,
                "build_s": round(build_s, 2),
                "indexed_rows": indexed,
                "search": setting,
                **summary_ms(lat),
                f"recall@{k}": round(recall(ids, truth, k), 4),
            }
            row["speedup_vs_exact_p50"] = round(out["exact"]["p50_ms"] / row["p50_ms"], 1)
            out["configs"].append(row)
            logger.info(
                "  %s %s: p50 %.2f ms p99 %.2f ms recall@%d %.3f (%.0fx exact)",
                index_type,
                setting,
                row["p50_ms"],
                row["p99_ms"],
                k,
                row[f"recall@{k}"],
                row["speedup_vs_exact_p50"],
            )
    return out, table


# ---- plot ----------------------------------------------------------------------------------------
def plot(result: dict, out: Path) -> Path:
    k = result["k"]
    panels = []
    series: dict[str, list[tuple[float, float]]] = {}
    for size in result["sizes"]:
        for c in size["configs"]:
            key = f"{c['index_type']} @{size['rows']:,}"
            series.setdefault(key, []).append((c[f"recall@{k}"], c["p50_ms"]))
    panels.append(
        line_chart(
            f"ANN on CPU: p50 latency vs recall@{k} per index type and size (points: search settings)",
            series,
            xlabel=f"recall@{k} vs exact",
            ylabel="p50 ms per query (log)",
            logy=True,
            xrange=(
                math.floor(min((p[0] for v in series.values() for p in v), default=0.0) * 20) / 20,
                1.0,
            ),
        )
    )
    groups = [f"{s['rows']:,} rows" for s in result["sizes"]]
    best: dict[str, list[float | None]] = {
        "exact (brute force)": [s["exact"]["p50_ms"] for s in result["sizes"]]
    }
    for t in ("IVF_FLAT", "IVF_PQ", "IVF_HNSW_SQ"):
        vals = []
        for s in result["sizes"]:
            ok = [c for c in s["configs"] if c["index_type"] == t and c[f"recall@{k}"] >= 0.95]
            vals.append(min((c["p50_ms"] for c in ok), default=None))
        if any(v is not None for v in vals):
            best[f"{t} (fastest with recall>=0.95)"] = vals
    panels.append(
        bar_chart("Exact vs ANN p50 latency (ms, log)", groups, best, ylabel="ms", log=True)
    )
    tq = result.get("text_query") or []
    if tq:
        groups = sorted(
            {f"{r['model']}\nrerank {r['rerank_k']}" for r in tq},
            key=lambda g: (g.split()[0], int(g.split()[-1])),
        )
        series2: dict[str, list[float | None]] = {}
        for cache in ("cold", "warm"):
            for q in ("p50_ms", "p99_ms"):
                vals = []
                for g in groups:
                    m, r = g.split("\n")[0], int(g.split()[-1])
                    hit = [
                        x
                        for x in tq
                        if x["model"] == m and x["rerank_k"] == r and x["token_cache"] == cache
                    ]
                    vals.append(hit[0][q] if hit else None)
                series2[f"{q[:3]} {cache} cache"] = vals
        panels.append(
            bar_chart(
                f"Full text query on CPU: encode + ANN ({tq[0]['table_rows']:,} rows) + ITM re-rank (ms, log)",
                groups,
                series2,
                ylabel="ms",
                log=True,
            )
        )
    return stack(panels, out)


# ---- CLI -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=200, help="ANN queries per setting")
    p.add_argument("--k", type=int, default=100, help="recall@k and candidates per ANN query")
    p.add_argument(
        "--index-types", nargs="+", default=list(INDEX_CONFIGS), choices=list(INDEX_CONFIGS)
    )
    p.add_argument("--cell-seconds", type=float, default=20.0, help="time cap per measured cell")
    p.add_argument("--query-models", nargs="*", default=["tiny", "compact"], help="[] skips part 2")
    p.add_argument("--rerank-ks", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument(
        "--itm-batch", type=int, default=16, help="queries per batched ITM (serve.max_batch_size)"
    )
    p.add_argument("--candidates", type=int, default=100, help="ANN candidates of the text query")
    p.add_argument("--text-queries", type=int, default=40, help="text queries per cell (at most)")
    p.add_argument("--workdir", default=".data/bench/ann")
    p.add_argument(
        "--keep", action="store_true", help="keep the tables (default: delete at the end)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=RESULTS / "ann-cpu.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "ann-cpu.png")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if args.index_types[-1] != "IVF_HNSW_SQ" and args.query_models:
        logger.info("the text query uses the last index built: %s", args.index_types[-1])

    import lancedb

    result = header("ann", argv)
    result.update(
        {
            "dim": DIM,
            "k": args.k,
            "data": "hierarchical Gaussian mixture (Mixture)",
            "images": "none in the ANN tables; "
            f"text-query candidates take theirs from a {POOL}-image side table",
            "sizes": [],
        }
    )
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = lancedb.connect(str(work))
    mix = Mixture(args.seed)
    table = None
    try:
        for n in sorted(args.sizes):
            size_result, table = bench_size(db, mix, n, args)
            result["sizes"].append(size_result)
        if args.query_models and table is not None:
            last = result["sizes"][-1]
            last_type = args.index_types[-1]
            default_setting = next(
                c["search"] for c in last["configs"] if c["index_type"] == last_type
            )
            ok = [
                c
                for c in last["configs"]
                if c["index_type"] == last_type and c[f"recall@{args.k}"] >= 0.95
            ]
            setting = min(ok, key=lambda c: c["p50_ms"])["search"] if ok else default_setting
            result["text_query_ann"] = {
                "index_type": last_type,
                "search": setting,
                "rows": last["rows"],
            }
            result["text_query"] = bench_text_query(db, table, last["rows"], setting, args)
            result["candidate_decode_384"] = candidate_decode(args)
            result["batched_itm"] = batched_itm(args)
            result["cold_itm"] = cold_itm(args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    save(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
