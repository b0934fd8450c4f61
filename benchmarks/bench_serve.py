"""The search service under load over real HTTP: latency, throughput and where the time goes.

    python benchmarks/bench_serve.py --config configs/local.yaml --index-uri DIR \
        [--model PATH] [--seconds 6] [--clients 1 2 4 8 16 32]
        [--json benchmarks/results/serve-cpu.json] [--plot benchmarks/results/serve-cpu.png]

Starts a local Ray (2 CPUs unless ``ray.num_cpus`` says otherwise) and Serve on 127.0.0.1, deploys
the application once per variant (default: ``serve.batching`` true, then false; ``--variant
NAME:key=value,key=value`` names others, e.g. the serving layout or stored ITM tokens, measured
back to back in one run) and, for each, measures:
  * the first query after the deployment is ready (cold: empty token cache, first model call),
    over ``--cold-queries`` distinct queries, each on a freshly deployed application, sent on the
    connection that fetched ``/healthz`` (``--cold-after`` seconds later), and the same query again
    at once (its cost without the one-off part: the cold queries are not the typical query);
  * single-client p50/p99 of text queries with the ITM re-rank (rerank_k from config) and without;
  * queries/s and p50/p99 at each client count (closed loop: each client sends its next query as
    soon as the last one answers), re-rank on;
  * the share of server time per stage (the responses' timings_ms: encode, ann, rerank).
Queries are shortened product titles drawn from the table (English, pinyin and mixed, as the
catalog's titles are), so every query is realistic for the index being measured. The JSON starts
with the command, machine and date (``benchmarks/common.py``); the plot shows queries/s and p99
against the number of clients, with and without ``@serve.batch``. ``make bench`` runs it on the
tiny-model index that ``benchmarks/bench_index.py`` leaves in ``.data/bench/index/index-tiny``.
Runtime: about 2 x (3 + (2 + len(clients)) x seconds) s plus ~20 s of start-up (~2 min with the
defaults).
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.common import RESULTS, header, save  # noqa: E402
from pipelines.config import add_config_arguments, cli_config, load_config  # noqa: E402
from pipelines.evaluation.charts import line_chart, stack  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def sample_queries(cfg, n: int = 200, seed: int = 0) -> list[str]:
    from pipelines.search.snapshot import open_snapshot
    from pipelines.storage import S3Settings

    snap = open_snapshot(cfg.index.uri, S3Settings.from_config(cfg.s3))
    titles = (
        snap.table.search().select(["title"]).limit(None).to_arrow().column("title").to_pylist()
    )
    rng = random.Random(seed)
    out = []
    for title in rng.sample(titles, min(n, len(titles))):
        words = title.split()
        start = rng.randrange(max(1, len(words) - 3))
        out.append(" ".join(words[start : start + rng.randint(2, 5)]))
    return out


def run_load(url: str, queries: list[str], clients: int, seconds: float, body: dict) -> dict:
    """Closed-loop load: ``clients`` threads, each with its own connection, for ``seconds``."""
    latencies: list[float] = []
    stages: dict[str, float] = {"encode": 0.0, "ann": 0.0, "rerank": 0.0, "total": 0.0}
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = c.post("/search", json={**body, "text": rng.choice(queries)})
                dt = time.perf_counter() - t
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        latencies.append(dt * 1000)
                        for k, v in r.json()["timings_ms"].items():
                            stages[k] = stages.get(k, 0.0) + v

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    total = stages.pop("total") or 1.0
    return {
        "clients": clients,
        "requests": len(latencies),
        "statuses": statuses,
        "qps": round(len(latencies) / wall, 2),
        "p50_ms": round(_pct(latencies, 50), 2),
        "p99_ms": round(_pct(latencies, 99), 2),
        "mean_ms": round(statistics.fmean(latencies), 2) if latencies else None,
        "stage_share": {k: round(v / total, 3) for k, v in stages.items()},
        "server_ms_per_request": round(total / max(1, len(latencies)), 2),
    }


def variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``NAME:key=value,key=value`` specs as (name, overrides); default: batching on, then off."""
    if not specs:
        return [("@serve.batch on", ["serve.batching=true"]),
                ("@serve.batch off", ["serve.batching=false"])]  # fmt: skip
    out = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        out.append((name, [kv for kv in rest.split(",") if kv]))
    return out


def cold_query(url: str, cfg, query: str, after_s: float = 0.0) -> dict:
    """One query on a freshly deployed application, ``after_s`` seconds after it is ready, over
    the connection that fetched ``/healthz`` (as the page's first query follows the page's own
    load), then the same query again on that connection: client latency and the server's
    stages of both, so the one-off cost is told apart from the cost of the query itself."""
    from ray import serve

    from pipelines.search.deployments import build_app

    serve.run(build_app(cfg), name="bench", route_prefix="/")
    with httpx.Client(base_url=url, timeout=120) as client:
        client.get("/healthz", timeout=60).raise_for_status()
        time.sleep(after_s)
        runs = []
        for _ in range(2):
            started = time.perf_counter()
            r = client.post("/search", json={"text": query})
            ms = (time.perf_counter() - started) * 1000
            r.raise_for_status()
            runs.append({"ms": round(ms, 2), "timings_ms": r.json()["timings_ms"]})
    serve.delete("bench")
    first, again = runs
    return {**first, "query": query, "again": again}


def _summary(runs: list[dict]) -> dict:
    ms = sorted(c["ms"] for c in runs)
    stages = {k: round(statistics.median(c["timings_ms"].get(k, 0.0) for c in runs), 2)
              for k in runs[0]["timings_ms"]}  # fmt: skip
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "max_ms": ms[-1],
            "stages_p50_ms": stages}  # fmt: skip


def _cold_summary(cold: list[dict]) -> dict:
    """The first queries' figures, and under ``same_query_again`` those of each repeated at once
    (warm: what the cold query costs without its one-off part)."""
    if not cold:
        return {}
    return {**_summary(cold), "same_query_again": _summary([c["again"] for c in cold]),
            "queries": [c["query"] for c in cold]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, ("index_uri", "model"))
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME:key=value,...",
        help="a deployment to measure (repeatable); default: batching on, then off",
    )  # fmt: skip
    parser.add_argument(
        "--cold-queries", type=int, default=3,
        help="cold first queries, each on a fresh deployment (median reported)",
    )  # fmt: skip
    parser.add_argument(
        "--cold-after", type=float, default=0.0,
        help="seconds between a fresh deployment being ready and its cold query",
    )  # fmt: skip
    parser.add_argument(
        "--json", default=str(RESULTS / "serve-cpu.json"), help="write the results here"
    )
    parser.add_argument(
        "--plot", default=str(RESULTS / "serve-cpu.png"), help="PNG chart ('' for none)"
    )
    args = parser.parse_intermixed_args(argv)
    cfg = cli_config(args)
    if cfg is None:
        return 2
    import ray
    from ray import serve

    from pipelines.runtime.cluster import init_ray
    from pipelines.search.deployments import build_app

    head = header("serve", argv)
    init_ray(cfg)  # before lancedb is imported (lancedb's threads make Ray's fork warn otherwise)
    queries = sample_queries(cfg)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results: dict = {
        **head,
        "index_uri": cfg.index.uri,
        "model": cfg.model.name_or_path,
        "candidates": cfg.serve.candidates,
        "rerank_k": cfg.serve.rerank_k,
        "cpus": ray.cluster_resources().get("CPU"),
        "cold_after_s": args.cold_after,
        "seconds_per_measurement": args.seconds,
        "max_batch_size": cfg.serve.max_batch_size,
        "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
        "runs": [],
    }
    for name, overrides in variants(args.variant):
        flags = {name: getattr(args, name) for name in ("index_uri", "model")}
        app_cfg = load_config(args.config, [*args.overrides, *overrides], flags)
        cold = [
            cold_query(url, app_cfg, query, args.cold_after)
            for query in queries[-args.cold_queries :]
        ]  # distinct queries, never in the warm-up
        serve.run(build_app(app_cfg), name="bench", route_prefix="/")
        health = httpx.get(url + "/healthz", timeout=30).json()
        results["rows"], results["model_id"] = health["rows"], health["model_id"]
        run_load(url, queries, 2, 3.0, {})  # warm-up: caches, JIT paths, connections
        single = {
            "rerank": run_load(url, queries, 1, args.seconds, {}),
            "no_rerank": run_load(url, queries, 1, args.seconds, {"rerank": False}),
        }
        by_clients = [run_load(url, queries, n, args.seconds, {}) for n in args.clients]
        results["runs"].append(
            {"variant": name, "overrides": overrides, "batching": app_cfg.serve.batching,
             "cold_first_query": _cold_summary(cold), "single_client": single,
             "concurrency": by_clients}
        )  # fmt: skip
        print(f"\n{name} ({health['rows']} products): cold first query {_cold_summary(cold)}")
        for label, r in single.items():
            print(
                f"  1 client, {label:9s}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                f"{r['qps']} q/s, stages {r['stage_share']}"
            )
        for r in by_clients:
            print(
                f"  {r['clients']:2d} clients: {r['qps']} q/s, p50 {r['p50_ms']} ms, "
                f"p99 {r['p99_ms']} ms, statuses {r['statuses']}, stages {r['stage_share']}"
            )
        serve.delete("bench")
    serve.shutdown()
    save(results, args.json, plot, args.plot)
    return 0


def plot(results: dict, out: Path) -> Path:
    qps, p99 = {}, {}
    for run in results["runs"]:
        name = run.get("variant") or f"@serve.batch {'on' if run['batching'] else 'off'}"
        qps[name] = [(r["clients"], r["qps"]) for r in run["concurrency"]]
        p99[name] = [(r["clients"], r["p99_ms"]) for r in run["concurrency"]]
    what = f"{results['rows']:,} products, rerank_k {results['rerank_k']}, {results['cpus']:g} CPUs"
    panels = [
        line_chart(
            f"Search over HTTP on CPU: queries/s vs concurrent clients ({what})",
            qps,
            xlabel="concurrent clients (closed loop)",
            ylabel="queries/s",
            logx=True,
        ),
        line_chart(
            "p99 latency vs concurrent clients",
            p99,
            xlabel="concurrent clients",
            ylabel="p99 ms",
            logx=True,
        ),
    ]
    return stack(panels, out)


if __name__ == "__main__":
    sys.exit(main())
