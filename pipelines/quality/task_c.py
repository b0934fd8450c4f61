"""Task C, the service: Task B's figures through the service's own two-stage search on a
published table, per hybrid × re-rank mode, restricted to the test split as the demo is."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipelines.quality.common import DEPTH, Relevance
from pipelines.quality.rankings import judge, paired_report, per_query_metrics, ranking_report

if TYPE_CHECKING:
    from blip_ops.family import RetrievalModel
    from pipelines.config import AppConfig
    from pipelines.search.engine import Scorer
    from pipelines.search.request import Limits
    from pipelines.search.snapshot import Snapshot

logger = logging.getLogger(__name__)

SERVICE_MODES = (("off", False), ("off", True), ("rrf", False), ("rrf", True))  # hybrid, rerank
TEST_FILTER = "split = 'test'"


@dataclass
class Service:
    """What :func:`task_c` searches with: a pinned published version, a scorer, request limits."""

    snapshot: Snapshot
    scorer: Scorer
    limits: Limits


def open_service(cfg: AppConfig, model: RetrievalModel | None = None) -> Service:
    """The published table of ``cfg.index.uri`` and a local scorer on ``model`` (default: load
    ``cfg.model``), as the search service builds them, without Ray Serve."""
    from pipelines.search.engine import LocalScorer
    from pipelines.search.request import Limits
    from pipelines.search.scorer import QueryScorer
    from pipelines.search.snapshot import ann_settings, open_snapshot
    from pipelines.storage import S3Settings

    snap = open_snapshot(
        cfg.index.uri, S3Settings.from_config(cfg.s3), cache_dir=cfg.serve.cache_dir,
        ann=ann_settings(cfg.index),
    )  # fmt: skip
    if model is None:
        from blip_ops import load_model

        model = load_model(cfg.model.name_or_path, device=cfg.model.device, dtype=cfg.model.dtype)
    if model.model_id != snap.model_id:
        raise ValueError(
            f"the published table was encoded by {snap.model_id}, the model given is "
            f"{model.model_id}: load the checkpoint its run recorded"
        )
    scorer = LocalScorer(QueryScorer(model, cfg.serve.token_cache_items))
    return Service(snap, scorer, Limits.from_config(cfg.serve))


def run_searches(
    snapshot: Snapshot,
    scorer: Scorer,
    queries: Sequence[Mapping],
    limits: Limits,
    *,
    hybrid: str,
    rerank: bool,
    candidate_filter: str | None = TEST_FILTER,
    k: int = DEPTH,
) -> list[list[str]]:
    """Each query through ``pipelines.search.engine.search``: its ranked product ids (first k)."""
    from pipelines.search.engine import search
    from pipelines.search.request import parse_search

    async def run_all() -> list[list[str]]:
        ranked = []
        for q in queries:
            body = {"text": q["query"], "k": k, "rerank": rerank, "hybrid": hybrid}
            if candidate_filter:
                body["filter"] = candidate_filter
            response = await search(parse_search(body, limits), snapshot, scorer)
            ranked.append([r["product_id"] for r in response["results"]])
        return ranked

    return asyncio.run(run_all())


def _mode_name(hybrid: str, rerank: bool) -> tuple[str, str]:
    return hybrid, "rerank_on" if rerank else "rerank_off"


def task_c_report(
    ranked: Mapping[tuple[str, bool], Sequence[Sequence[str]]],
    queries: Sequence[Mapping],
    products: Sequence[Mapping],
    *,
    relevance: Relevance | None = None,
    n_boot: int = 1000,
) -> dict:
    """Task B's metrics from the service's answers.

    ranked: {(hybrid, rerank): one list of ranked product ids per query}; ids outside
    ``products`` count as irrelevant results. Returns {"modes": {hybrid: {"rerank_off",
    "rerank_on": ranking report, "rerank_on_minus_off", "minus_hybrid_off": {"rerank_off",
    "rerank_on"}: paired reports}}, "counts"} (each where both sides were run).
    """
    judged = judge(queries, products, relevance)
    per_query: dict[tuple[str, str], dict] = {}
    for (hybrid, rerank), lists in ranked.items():
        if len(lists) != len(queries):
            raise ValueError(f"{hybrid}/{rerank}: {len(lists)} answers, {len(queries)} queries")
        top = np.full((len(lists), DEPTH), -1, dtype=np.int64)  # (Q, DEPTH)
        for q, ids in enumerate(lists):
            found = [judged.index.get(pid, -1) for pid in ids[:DEPTH]]
            top[q, : len(found)] = found
        per_query[_mode_name(hybrid, rerank)] = per_query_metrics(
            top, judged.labelled, judged.relevant
        )
    modes: dict[str, dict] = {}
    for (hybrid, which), values in per_query.items():
        modes.setdefault(hybrid, {})[which] = ranking_report(values, judged.langs, n_boot)
    for hybrid, block in modes.items():
        if {"rerank_off", "rerank_on"} <= set(block):
            a, b = per_query[hybrid, "rerank_off"], per_query[hybrid, "rerank_on"]
            block["rerank_on_minus_off"] = paired_report(a, b, judged.langs, n_boot)
        if hybrid != "off":
            block["minus_hybrid_off"] = {
                which: paired_report(per_query["off", which], values, judged.langs, n_boot)
                for (h, which), values in per_query.items()
                if h == hybrid and ("off", which) in per_query
            }
    counts = {"queries": len(queries), "products": len(products)}
    return {"modes": modes, "counts": counts}


def task_c(
    snapshot: Snapshot,
    scorer: Scorer,
    queries: Sequence[Mapping],
    products: Sequence[Mapping],
    *,
    limits: Limits,
    modes: Sequence[tuple[str, bool]] = SERVICE_MODES,
    candidate_filter: str | None = TEST_FILTER,
    itm_weight: float | None = None,
    n_boot: int = 1000,
    relevance: Relevance | None = None,
) -> dict:
    """Task B's metrics through the service's two-stage search, per (hybrid, rerank) mode.

    snapshot / scorer / limits: :func:`open_service`. queries / products: the test split's
    (:func:`catalog_queries`, :func:`catalog_products`). ``itm_weight`` overrides the limits'
    (``serve.itm_weight``). Returns :func:`task_c_report` plus "settings".
    """
    started = time.perf_counter()
    if itm_weight is not None:
        limits = dataclasses.replace(limits, itm_weight=itm_weight)
    ranked = {}
    for hybrid, rerank in modes:
        ranked[hybrid, bool(rerank)] = run_searches(
            snapshot, scorer, queries, limits, hybrid=hybrid, rerank=bool(rerank),
            candidate_filter=candidate_filter,
        )  # fmt: skip
    out = task_c_report(ranked, queries, products, relevance=relevance, n_boot=n_boot)
    out["settings"] = {
        "modes": [list(m) for m in ranked],
        "filter": candidate_filter,
        "k": DEPTH,
        "candidates": limits.candidates,
        "rerank_k": limits.rerank_k,
        "itm_weight": getattr(limits, "itm_weight", 1.0),
        "table_version": snapshot.version,
        "model_id": snapshot.model_id,
    }
    logger.info(
        "task C (%d queries x %d modes): %.1fs",
        len(queries), len(ranked), time.perf_counter() - started,
    )  # fmt: skip
    return out
