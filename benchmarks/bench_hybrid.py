"""Recall of the demo catalog's held-out queries with and without hybrid (BM25 + vector) recall.

    python benchmarks/bench_hybrid.py --config configs/local.yaml --index-uri DIR \
        --queries CATALOG/queries.parquet [--model PATH] [--json FILE]

Runs every held-out query (English, 汉字, pinyin) through the service's own two-stage search
(``pipelines.search.engine.search``, no Serve needed) on the published table, restricted to the
``test`` split as the demo does (``split = 'test'``), once per fusion mode (off, rrf, weighted),
with and without the ITM re-rank, and reports recall@1/5/10 per language.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from pipelines.config import add_config_arguments, cli_config  # noqa: E402

AT = (1, 5, 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, ("index_uri", "model"))
    parser.add_argument("--queries", required=True, help="queries.parquet of the demo catalog")
    parser.add_argument("--filter", default="split = 'test'", help="candidate filter (SQL)")
    parser.add_argument("--json", default=None)
    args = parser.parse_intermixed_args(argv)
    cfg = cli_config(args)
    if cfg is None:
        return 2
    from blip_ops import load_model
    from pipelines.search.engine import LocalScorer, search
    from pipelines.search.request import Limits, parse_search
    from pipelines.search.scorer import QueryScorer
    from pipelines.search.snapshot import open_snapshot
    from pipelines.storage import S3Settings

    snap = open_snapshot(cfg.index.uri, S3Settings.from_config(cfg.s3))
    model = load_model(cfg.model.name_or_path, device=cfg.model.device, dtype=cfg.model.dtype)
    if model.model_id != snap.model_id:
        print(f"error: table model {snap.model_id} != loaded {model.model_id}", file=sys.stderr)
        return 2
    scorer = LocalScorer(QueryScorer(model, cfg.serve.token_cache_items))
    limits = Limits.from_config(cfg.serve)
    queries = pq.read_table(args.queries).to_pylist()
    queries = [q for q in queries if q.get("split", "test") == "test"]  # val queries tune, never report
    results: dict = {"index_uri": cfg.index.uri, "model_id": model.model_id, "rows": snap.rows}
    table = []
    for rerank in (False, True):
        for mode in ("off", "rrf", "weighted"):
            hits: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
            count: dict[str, int] = defaultdict(int)
            for q in queries:
                body = {"text": q["query"], "k": max(AT), "rerank": rerank, "hybrid": mode}
                if args.filter:
                    body["filter"] = args.filter
                out = asyncio.run(search(parse_search(body, limits), snap, scorer))
                ids = [r["product_id"] for r in out["results"]]
                count[q["lang"]] += 1
                for k in AT:
                    hits[q["lang"]][k] += q["product_id"] in ids[:k]
            for lang in sorted(count):
                row = {
                    "rerank": rerank,
                    "hybrid": mode,
                    "lang": lang,
                    "queries": count[lang],
                    **{f"R@{k}": round(hits[lang][k] / count[lang], 3) for k in AT},
                }
                table.append(row)
                print(
                    f"rerank {'on ' if rerank else 'off'} hybrid {mode:8s} {lang:7s} "
                    + " ".join(f"R@{k} {row[f'R@{k}']:.3f}" for k in AT)
                )
    results["recall"] = table
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
