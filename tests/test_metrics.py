"""blip_ops.metrics on tiny examples whose answers are worked out by hand; the search service's
metrics (pipelines.search.metrics): both sinks, the documented names, and the totals on Ray's
metrics export port of a 2-replica ingress."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blip_ops.metrics import (
    bootstrap_ci,
    grouped_auc_ci,
    hits_at_k,
    ndcg_at_k,
    paired_bootstrap_ci,
    paired_summary,
    roc_auc,
    success_at_1,
    summary,
)

# --------------------------------------------------------------------------- per-query values


def test_hits_at_k_from_ranks():
    ranks = np.array([0, 1, 4, 9, 10])
    assert hits_at_k(ranks, 1).tolist() == [1, 0, 0, 0, 0]
    assert hits_at_k(ranks, 5).tolist() == [1, 1, 1, 0, 0]
    assert hits_at_k(ranks, 10).tolist() == [1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="k must be >= 1"):
        hits_at_k(ranks, 0)
    with pytest.raises(ValueError, match="1-D"):
        hits_at_k(ranks.reshape(5, 1), 1)


def test_success_at_1_is_the_first_position():
    rel = np.array([[True, False], [False, True], [False, False]])
    assert success_at_1(rel).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="K = 0"):
        success_at_1(np.zeros((2, 0), bool))


def test_ndcg_by_hand():
    rel = np.array(
        [
            [False, True, False],  # one relevant at rank 2 of 1 relevant: 1/log2(3)
            [True, True, False],  # both relevant on top: ideal, 1
            [False, False, True],  # 1/log2(4) over the ideal of 2: 1 + 1/log2(3)
            [False, False, False],  # nothing relevant anywhere: 0
        ]
    )
    n_relevant = np.array([1, 2, 2, 0])
    got = ndcg_at_k(rel, 10, n_relevant=n_relevant)
    want = [1 / math.log2(3), 1.0, (1 / math.log2(4)) / (1 + 1 / math.log2(3)), 0.0]
    assert got == pytest.approx(want)
    # k cuts both the ranking and the ideal: the relevant result at rank 3 is past k = 2.
    assert ndcg_at_k(rel, 2, n_relevant=n_relevant)[2] == 0.0
    # Ideal DCG from min(n_relevant, k): 5 relevant, k = 1, first one relevant -> 1.
    assert ndcg_at_k(np.array([[True]]), 1, n_relevant=np.array([5])).tolist() == [1.0]
    with pytest.raises(ValueError, match="n_relevant"):
        ndcg_at_k(rel, 10, n_relevant=np.array([1, 2]))
    with pytest.raises(ValueError, match="below"):
        ndcg_at_k(rel, 10, n_relevant=np.array([0, 2, 2, 0]))


# --------------------------------------------------------------------------- AUC


def test_roc_auc_by_hand_with_ties_half():
    # Pairs: 3>1, 3>2, 2>1, 2=2 (half) -> 3.5 / 4.
    assert roc_auc([3, 2], [1, 2]) == 0.875
    assert roc_auc([5, 6], [1, 2, 3]) == 1.0
    assert roc_auc([1], [2, 3]) == 0.0
    assert roc_auc([1, 1], [1]) == 0.5
    assert math.isnan(roc_auc([], [1.0]))
    assert math.isnan(roc_auc([1.0], []))


def test_roc_auc_weights_equal_repeated_scores():
    pos, neg = np.array([3.0, 2.0, 0.5]), np.array([1.0, 2.0])
    w_pos, w_neg = np.array([2, 0, 1]), np.array([1, 3])
    repeated = roc_auc(np.repeat(pos, w_pos), np.repeat(neg, w_neg))
    assert roc_auc(pos, neg, pos_weight=w_pos, neg_weight=w_neg) == pytest.approx(repeated)


def test_roc_auc_equals_the_pairwise_count():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairwise = ((pos[:, None] > neg) + 0.5 * (pos[:, None] == neg)).mean()
    assert roc_auc(pos, neg) == pytest.approx(pairwise)


def test_grouped_auc_ci_brackets_the_auc():
    rng = np.random.default_rng(1)
    groups = np.arange(60)
    pos, neg = rng.normal(1, 1, 60), rng.normal(0, 1, 60)
    lo, hi = grouped_auc_ci(pos, neg, groups, groups, n_boot=300)
    assert lo <= roc_auc(pos, neg) <= hi and hi - lo < 0.4
    assert grouped_auc_ci([2.0, 3.0], [0.0, 1.0], [0, 1], [0, 1], n_boot=50) == (1.0, 1.0)
    assert all(math.isnan(x) for x in grouped_auc_ci([], [1.0], [], [0]))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_of_constant_values_is_a_point():
    assert bootstrap_ci(np.ones(20)) == (1.0, 1.0)
    assert bootstrap_ci(np.zeros(7)) == (0.0, 0.0)
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([])))


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(2)
    widths = []
    for n in (40, 400, 4000):
        hits = (rng.random(n) < 0.6).astype(float)
        lo, hi = bootstrap_ci(hits, n_boot=500)
        assert lo < hits.mean() < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # About 2 x 1.96 x sqrt(p(1-p)/n) for a proportion: 0.030 at n = 4000.
    assert widths[2] == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 4000), rel=0.25)


def test_bootstrap_is_deterministic_per_seed_and_level_widens():
    hits = (np.random.default_rng(3).random(100) < 0.5).astype(float)
    assert bootstrap_ci(hits, seed=5) == bootstrap_ci(hits, seed=5)
    lo90, hi90 = bootstrap_ci(hits, level=0.90)
    lo99, hi99 = bootstrap_ci(hits, level=0.99)
    assert lo99 <= lo90 and hi90 <= hi99
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(hits, level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(hits, n_boot=0)
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(np.ones((3, 2)))


def test_paired_difference():
    a = (np.random.default_rng(4).random(50) < 0.5).astype(float)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)
    # b wins on exactly 10 of 50 queries and never loses: the difference is 0.2, the interval
    # stays above 0 (the paired design sees it; two separate intervals would overlap).
    b = a.copy()
    b[np.flatnonzero(a == 0)[:10]] = 1.0
    lo, hi = paired_bootstrap_ci(a, b)
    assert 0 < lo < 0.2 < hi
    assert paired_summary(a, b)["value"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap_ci(a, b[:-1])


def test_summary_shape():
    s = summary(np.array([1.0, 0.0, 1.0, 1.0]))
    assert set(s) == {"value", "ci", "n"} and s["n"] == 4 and s["value"] == 0.75
    assert s["ci"][0] <= 0.75 <= s["ci"][1]
    assert summary(np.array([])) == {"value": None, "ci": [None, None], "n": 0}


# --------------------------------------------------------------------------- the search service


def _local_samples(metrics) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_search_metrics_record_in_the_local_registry_without_ray():
    """Outside a Serve replica Ray's metrics record nothing; /metrics still has every series."""
    from pipelines.search.metrics import SearchMetrics

    m = SearchMetrics()
    m.observe_request("/search", 200, 0.02)
    m.observe_request("/search", 400, 0.001)
    m.observe_stages({"encode": 4.0, "total": 9.0, "not-a-stage": 1.0})
    m.observe_model_call("itm", {"batch": 3, "hits": 2, "misses": 0})
    m.set_version(7, 120)
    m.resend_gauges()
    got = _local_samples(m)
    assert got[("search_requests_total", (("route", "/search"), ("status", "200")))] == 1
    assert got[("search_requests_total", (("route", "/search"), ("status", "400")))] == 1
    assert got[("search_http_request_seconds_count", (("route", "/search"),))] == 2
    assert got[("search_stage_seconds_count", (("stage", "total"),))] == 1
    assert not any(dict(k[1]).get("stage") == "not-a-stage" for k in got)
    assert got[("search_model_batch_size_sum", (("kind", "itm"),))] == 3
    assert got[("search_image_token_cache_total", (("result", "hit"),))] == 2
    assert ("search_image_token_cache_total", (("result", "miss"),)) not in got  # 0: not counted
    assert got[("search_table_version", ())] == 7 and got[("search_table_rows", ())] == 120
    assert _local_samples(SearchMetrics()) != got  # one registry per replica, not the global one


def test_gauges_are_re_sent_to_ray_while_the_replica_runs():
    """Ray drops a gauge series not set for two report intervals: the replica's task re-sends
    the last value of each gauge (counters and histograms are cumulative and need nothing)."""
    import asyncio

    from pipelines.search.metrics import SearchMetrics

    m = SearchMetrics()
    m.set_version(4, 50)
    sent = []
    m._metrics["table_version"].ray.set = lambda value, tags=None: sent.append((value, tags))

    async def run_briefly():
        task = asyncio.create_task(m.keep_gauges_exported(every_s=0.01))
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(run_briefly())
    assert len(sent) >= 3 and {value for value, _ in sent} == {4}


def test_every_exported_name_is_documented():
    """docs/metrics.md names every series Ray exports for the service, with its type."""
    from pathlib import Path

    from pipelines.search.metrics import METRICS, exported_names

    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text(encoding="utf-8")
    missing = [name for name in exported_names() if f"`{name}" not in doc]
    assert not missing, missing
    rows = [line for line in doc.splitlines() if line.startswith("| `ray_search_")]
    for spec in METRICS.values():
        assert all(name.startswith("ray_search_") for name in spec.exported())
        [row] = [r for r in rows if r.startswith(f"| `{spec.exported()[0]}`")]
        assert f"| {spec.kind} |" in row and all(f"`{t}`" in row for t in spec.tags), row


EXPORT_APP = "metrics2"
N_SEARCHES = 16
N_BAD = 3


def _ray_export_url() -> str:
    """This node's metrics export endpoint (the port Ray chose, or --metrics-export-port)."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def _exported(url: str, app: str) -> list:
    """The service's samples of one application on Ray's metrics export port."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.search.metrics import exported_names

    names = exported_names()
    families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    return [
        s
        for f in families
        for s in f.samples
        if s.name in names and s.labels.get("application") == app
    ]


def _total(samples, name: str, **labels) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _two_ingress_replicas(cfg):
    serve = cfg.serve.model_copy(
        update={"ingress": cfg.serve.ingress.model_copy(update={"num_replicas": 2})}
    )
    return cfg.model_copy(update={"serve": serve})


def _expected(statuses: dict[int, int], version: int) -> dict:
    """(series, tags) -> its total over the replicas after the test's requests."""
    search = (("route", "/search"),)
    expected = {
        ("ray_search_requests_total", search + (("status", str(code)),)): n
        for code, n in statuses.items()
    }
    expected.update(
        {
            ("ray_search_http_request_seconds_count", search): N_SEARCHES + N_BAD,
            ("ray_search_stage_seconds_count", (("stage", "total"),)): N_SEARCHES,
            ("ray_search_model_batch_size_count", (("kind", "text"),)): N_SEARCHES,
            ("ray_search_table_version", ()): 2 * version,  # one gauge per replica
        }
    )
    return expected


def _totals(url: str, keys) -> dict:
    samples = _exported(url, EXPORT_APP)
    return {key: _total(samples, key[0], **dict(key[1])) for key in keys}


def _send_searches(url: str) -> dict[int, int]:
    """N_SEARCHES good and N_BAD bad searches, 4 at a time (so both replicas get some)."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def search(i: int) -> int:
        body = {"text": f"red chair {i}"} if i < N_SEARCHES else {"text": ""}
        return httpx.post(url + "/search", json=body, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = Counter(pool.map(search, range(N_SEARCHES + N_BAD)))
    assert statuses[200] == N_SEARCHES and all(400 <= c < 500 for c in statuses if c != 200)
    return dict(statuses)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_ray_export_port_totals_equal_the_requests(search_index, search_url):
    """N searches over HTTP on a 2-replica ingress: the totals on Ray's metrics export port,
    summed over the replicas, are exactly N (and the bad requests exactly theirs)."""
    import time

    import httpx
    from ray import serve

    from pipelines.serve_search import build_app

    cfg, _ = search_index
    serve.run(build_app(_two_ingress_replicas(cfg)), name=EXPORT_APP, route_prefix=f"/{EXPORT_APP}")
    url = f"{search_url}/{EXPORT_APP}"
    try:
        statuses = _send_searches(url)
        version = httpx.get(url + "/healthz", timeout=60).json()["table_version"]
        expected = _expected(statuses, version)
        export = _ray_export_url()
        deadline = time.monotonic() + 60  # Ray's agent exports every report interval (10 s)
        while (totals := _totals(export, expected)) != expected and time.monotonic() < deadline:
            assert all(totals[k] <= v for k, v in expected.items()), totals  # never more
            time.sleep(1)
        assert totals == expected
        samples = _exported(export, EXPORT_APP)
        served = {s.labels["replica"] for s in samples if s.name == "ray_search_requests_total"}
        assert len(served) == 2, served  # the totals are sums over both ingress replicas
        versions = {
            s.labels["replica"]: s.value for s in samples if s.name == "ray_search_table_version"
        }
        assert versions == dict.fromkeys(served, version)
        assert {s.labels["deployment"] for s in samples} == {"SearchIngress"}
    finally:
        serve.delete(EXPORT_APP)
