"""Fuzzing the search service's HTTP API with Schemathesis, from the service's own OpenAPI.

An application of its own ("fuzz" at /fuzz, on the session's index and Serve) with an API key, so
the fuzz cannot disturb the shared app and its replicas' memory is its own. Schemathesis loads
``/fuzz/openapi.json`` (``POST /search``'s body and responses are the models of
``pipelines.search.schema``) and generates cases for every operation: schema-conforming ones
(positive) and schema-breaking ones (negative) with the key, which reach the handlers, and a few
without it, which must get a 401 on every route that is not public. Checked on every response:
never a 5xx (a 503 only as Serve's own overload answer), and the body matches the schema the
document gives its status (``/search``'s 200 a ``SearchResponse``, errors an ``ErrorBody``) and
the status is one ``/search`` documents; afterwards the application is RUNNING, both replicas are
the same processes (none died and was replaced), ``/healthz`` answers 200 and a real search still
works, and the ingress and model replicas' resident memory grew by less than a bound, and the API
key every case sent is nowhere in the Ray logs the fuzz produced. A key sent as the document's
security schemes declare it is accepted.

A second test, without Ray, checks that the service's published ``/search`` schema and
``parse_search`` agree, so that the generated cases mean what they claim (schema-valid: accepted
unless a documented cross-field rule says otherwise; schema-breaking: a 400).

Deterministic (``derandomize``, no example database) and bounded by the counts below; the tests
print what they ran.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import response_schema_conformance, status_code_conformance

from pipelines.search.request import BadRequest, Limits, parse_search
from pipelines.search.schema import REQUEST_EXAMPLES
from tests.conftest import TEST_API_KEY, TEST_API_KEY_ENV
from tests.test_search_request import credentials, openapi_document
from tests.test_security import ray_log_growth, ray_log_sizes

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

APP = "fuzz"
# Positive cases fitted to the rule the schema cannot express (k and rerank_k at most candidates),
# without a filter or an image (random strings: 400s), so that they reach the search engine.
FITTED = "fitted"
KEY = {"X-API-Key": TEST_API_KEY}
# Examples per (operation, mode). /search gets more: it parses everything a client sends.
SEARCH_EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 200, FITTED: 150}
OTHER_EXAMPLES = {GenerationMode.POSITIVE: 30}  # string path parameters: no negative cases
NO_KEY_EXAMPLES = 8
MAX_RSS_GROWTH_MB = 150  # per replica, over the whole fuzz (after a warm-up)
BACKPRESSURE = "Request dropped due to backpressure"  # Serve's own 503 (documented overload)
PUBLIC = {("GET", "/healthz"), ("GET", "/products/{product_id}/thumbnail")}
# Every response's body matches its status's schema; /search answers only statuses it documents
# (other routes may see Serve's undocumented overload 503, which _check allows).
CONFORMANCE = [response_schema_conformance]
SEARCH_CONFORMANCE = [response_schema_conformance, status_code_conformance]

FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_url(search_url, search_index):
    from ray import serve

    from pipelines.serve_search import build_app

    cfg, _ = search_index
    keyed = cfg.model_copy(
        update={"serve": cfg.serve.model_copy(update={"api_key_env": TEST_API_KEY_ENV})}
    )
    serve.run(build_app(keyed), name=APP, route_prefix=f"/{APP}")
    yield f"{search_url}/{APP}"
    serve.delete(APP)


def replica_pids(app: str = APP) -> dict[str, int]:
    """An app's replica processes by deployment (Ray titles them ``ray::ServeReplica:APP:…``)."""
    found: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for deployment in ("SearchIngress", "QueryModel"):
            if f"ServeReplica:{app}:{deployment}" in cmdline:
                found[deployment] = int(proc.name)
    return found


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _check(response, case, keyed: bool) -> None:
    where = (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]!r}"
    )
    if response.status_code == 503:
        assert BACKPRESSURE in response.text, where
    else:
        assert response.status_code < 500, where
    if keyed:
        assert response.status_code != 401, where
    elif (case.method.upper(), case.path) not in PUBLIC:
        assert response.status_code == 401, where
    if response.status_code in (400, 401, 404, 413):  # the service's own errors are JSON
        assert "error" in response.json(), where


def _has_body(op) -> bool:
    """Negative cases need something schema-typed to break: a string path parameter has nothing."""
    return len(op.body) > 0


def _fit(case):
    body = case.body
    if isinstance(body, dict):
        body.pop("filter", None)
        if body.pop("image", None) is not None and not isinstance(body.get("text"), str):
            body["text"] = "chair"
        candidates = body.get("candidates") or Limits().candidates
        for name in ("k", "rerank_k"):
            if isinstance(body.get(name), (int, float)):
                body[name] = min(body[name], candidates)
    return case


def _strategy(op, mode):
    if mode == FITTED:
        return op.as_strategy(generation_mode=GenerationMode.POSITIVE).map(_fit)
    return op.as_strategy(generation_mode=mode)


def _fuzz(op, mode, n: int, base_url: str, headers: dict, statuses: Counter, label=None) -> int:
    ran = 0

    @settings(FUZZ_SETTINGS, max_examples=n)
    @given(case=_strategy(op, mode))
    def run(case):
        nonlocal ran
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        _check(response, case, keyed=bool(headers))
        checks = SEARCH_CONFORMANCE if op.path == "/search" else CONFORMANCE
        case.validate_response(response, checks=checks, headers=headers)
        ran += 1
        statuses[(op.method.upper(), op.path, label or str(mode), response.status_code)] += 1

    run()
    return ran


def test_schemathesis_finds_no_server_error(fuzz_url, capsys):
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json", headers=KEY, timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    names = {(op.method.upper(), op.path) for op in operations}
    assert ("POST", "/search") in names and ("GET", "/products/{product_id}") in names, names
    search_op = next(op for op in operations if op.path == "/search")
    assert search_op.body, "the OpenAPI describes the /search body (its request model)"

    ray_logs = ray_log_sizes()
    with httpx.Client(base_url=fuzz_url, timeout=60, headers=KEY) as c:  # warm-up
        for text in ("sofa", "儿童滑行车", "red wooden chair"):
            assert c.post("/search", json={"text": text}).status_code == 200
        # the document's examples (which the fuzz draws on) use hybrid recall and a filter: the
        # full-text index loads once, before the memory baseline
        for example in REQUEST_EXAMPLES.values():
            assert c.post("/search", json=example["value"]).status_code == 200
    pids = replica_pids()
    assert set(pids) == {"SearchIngress", "QueryModel"}, pids
    rss_before = {name: _rss_mb(pid) for name, pid in pids.items()}

    started = time.perf_counter()
    statuses: Counter = Counter()
    cases = 0
    for op in operations:
        counts = SEARCH_EXAMPLES if op.path == "/search" else OTHER_EXAMPLES
        for mode, n in counts.items():
            if mode == GenerationMode.NEGATIVE and not _has_body(op):
                continue
            cases += _fuzz(op, mode, n, fuzz_url, KEY, statuses)
        no_key = GenerationMode.POSITIVE
        cases += _fuzz(op, no_key, NO_KEY_EXAMPLES, fuzz_url, {}, statuses, label="no key")
    seconds = time.perf_counter() - started

    # no dead replica: the same processes, the app RUNNING, health and a real search fine
    from ray import serve

    assert replica_pids() == pids, "a replica died and was replaced during the fuzz"
    assert serve.status().applications[APP].status == "RUNNING"
    with httpx.Client(base_url=fuzz_url, timeout=60, headers=KEY) as c:
        assert c.get("/healthz").status_code == 200
        ok = c.post("/search", json={"text": "sofa", "k": 3})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 3
    growth = {name: _rss_mb(pid) - rss_before[name] for name, pid in pids.items()}
    # every case sent the key; the replicas' logs (access log, model calls) never show it
    logged = ray_log_growth(ray_logs)
    assert sum(map(len, logged.values())) > 0
    assert not [name for name, data in logged.items() if TEST_API_KEY.encode() in data]

    by_status: Counter = Counter()
    search_by_mode: dict = {}
    for (_method, path, mode, status), n in statuses.items():
        by_status[status] += n
        if path == "/search":
            search_by_mode.setdefault(mode, Counter())[status] += n
    with capsys.disabled():
        print(
            f"\nhttp fuzz: {cases} cases over {len(operations)} operations in {seconds:.1f} s, "
            f"statuses {dict(sorted(by_status.items()))}, /search by mode "
            + str({m: dict(sorted(c.items())) for m, c in sorted(search_by_mode.items())})
            + ", replica RSS "
            + ", ".join(f"{k} {rss_before[k]:.0f} MB {growth[k]:+.0f} MB" for k in sorted(growth))
        )
    search_statuses = {s for (_m, p, _mode, s) in statuses if p == "/search"}
    assert {200, 400, 401} <= search_statuses, statuses  # cases reached the handler and its checks
    for name, mb in growth.items():
        assert mb < MAX_RSS_GROWTH_MB, f"{name} replica RSS grew by {mb:.0f} MB"


def test_the_key_sent_as_the_document_declares_is_accepted(fuzz_url):
    """What /docs's "Try it out" does: read the document (public), send the key as each of
    /search's security schemes declares it; the answer is a SearchResponse with exactly the
    documented fields (a field the engine adds must be documented first)."""
    from pipelines.search.schema import SearchResponse, SearchResult

    with httpx.Client(base_url=fuzz_url, timeout=60) as c:
        doc = c.get("/openapi.json")
        assert doc.status_code == 200 and c.get("/docs").status_code == 200
        schemes = doc.json()["components"]["securitySchemes"]
        requirements = doc.json()["paths"]["/search"]["post"]["security"]
        assert len(requirements) == len(schemes) == 2, requirements
        for requirement in requirements:
            (name,) = requirement
            headers = credentials(schemes[name], TEST_API_KEY)
            r = c.post("/search", json={"text": "sofa", "k": 3}, headers=headers)
            assert r.status_code == 200, (name, r.text)
            body = r.json()
            assert SearchResponse.model_validate(body).request_id == r.headers["x-request-id"]
            assert set(body) == set(SearchResponse.model_fields)
            assert {frozenset(x) for x in body["results"]} == {frozenset(SearchResult.model_fields)}
        assert c.post("/search", json={"text": "sofa"}).status_code == 401


# ------------------------------------------------------------------ the schema matches the parser
CONFORMANCE_EXAMPLES = 200


def _expected_ok(body: dict, limits: Limits) -> bool:
    """What parse_search accepts, by the documented rules (images left out: see the decode fuzz)."""
    text = body.get("text")
    if not (isinstance(text, str) and text.strip()):
        return False
    candidates = body.get("candidates") or limits.candidates
    k = body.get("k") or min(limits.k, candidates)
    rerank_k = body.get("rerank_k")
    rerank_k = min(limits.rerank_k, candidates) if rerank_k is None else rerank_k
    return k <= candidates and rerank_k <= min(candidates, limits.max_rerank_k)


def test_search_schema_and_parser_agree(capsys):
    """Every body the published schema allows is accepted by ``parse_search`` unless it breaks a
    documented cross-field rule, and every body it forbids is a 400: the fuzz above generates from
    this schema, so a schema looser or stricter than the parser would make its cases miss."""
    limits = Limits()
    spec = openapi_document(limits)  # the service's own /openapi.json, built without Serve
    schema = schemathesis.openapi.from_dict(spec)
    op = next(r.ok() for r in schema.get_all_operations() if r.ok().path == "/search")
    seen: Counter = Counter()

    @settings(FUZZ_SETTINGS, max_examples=CONFORMANCE_EXAMPLES)
    @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def positive(case):
        body = dict(case.body)
        body.pop("image", None)
        want = _expected_ok(body, limits)
        try:
            parse_search(json.dumps(body), limits)
        except BadRequest as err:
            assert not want, f"schema-valid body refused: {body!r}: {err}"
            seen["refused"] += 1
        else:
            assert want, f"accepted a body the rules refuse: {body!r}"
            seen["accepted"] += 1

    @settings(FUZZ_SETTINGS, max_examples=CONFORMANCE_EXAMPLES)
    @given(case=op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    def negative(case):
        body = case.body
        raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
        with pytest.raises(BadRequest):
            parse_search(raw, limits)
        seen["negative refused"] += 1

    positive()
    negative()
    with capsys.disabled():
        print(f"\n/search schema vs parser: {dict(seen)}")
    assert seen["accepted"] >= CONFORMANCE_EXAMPLES // 4, seen
