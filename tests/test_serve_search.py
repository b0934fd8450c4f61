"""The search service on real Ray Serve over real HTTP (127.0.0.1), on a table built by the index job.

One catalog, one index run and one Serve application are shared by the module. The ranking test
recomputes the two-stage rule offline (brute-force cosine over every stored embedding, ITM from the
stored model-resolution images) and compares orders; the error tests check every status and that
the replica stays healthy; the version-switch test republishes under client load.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.indexing import tables
from tests.conftest import SEARCH_PRODUCTS, TEST_API_KEY, TEST_API_KEY_ENV

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

N_PRODUCTS = SEARCH_PRODUCTS
LOCAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"


@pytest.fixture(scope="module")
def indexed(search_index):
    return search_index


@pytest.fixture(scope="module")
def serve_url(search_url):
    return search_url


@pytest.fixture(scope="module")
def client(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        yield c


def _deploy(cfg, name: str, prefix: str):
    from ray import serve

    from pipelines.serve_search import build_app

    serve.run(build_app(cfg), name=name, route_prefix=prefix)


# ------------------------------------------------------------------ the offline reference
def _published(cfg, version: int):
    db = tables.connect(cfg.index.uri)
    run = tables.published_run(db)
    table = db.open_table(run["products_table"])
    table.checkout(version)
    return table.to_arrow()


def _offline(model, rows, text: str, candidates: int, rerank_k: int):
    """The rule, brute force: exact cosine over all rows, ITM + ITC on the first rerank_k."""
    emb = np.stack(rows.column("image_embedding").to_numpy(zero_copy_only=False))  # (N, D)
    q = model.encode_texts([text]).numpy()[0]
    cos = emb @ q
    order = np.argsort(-cos, kind="stable")[:candidates]
    head = order[:rerank_k]
    itm = model.itm_scores(text, _head_tokens(model, rows, head)).numpy()
    score = np.concatenate([itm + cos[head], cos[order[rerank_k:]]])
    ranked = np.concatenate(
        [np.argsort(-score[:rerank_k], kind="stable"), np.arange(rerank_k, len(order))]
    )
    ids = rows.column("product_id").to_pylist()
    return [(ids[order[i]], float(score[i])) for i in ranked]


def _head_tokens(model, rows, head):
    """The rows' ITM image tokens as the service gets them: stored by the index job (float16)
    where the row has them, else recomputed from its model-resolution JPEG. (k, N, H)"""
    import torch

    from blip_ops import decode_image
    from blip_ops.token_cache import StoredTokens

    out = []
    for i in map(int, head):
        data = rows.column("itm_tokens")[i].as_py() if "itm_tokens" in rows.column_names else None
        if data is not None:
            shape = tuple(rows.column("itm_tokens_shape")[i].as_py())
            out.append(StoredTokens(data, shape).tensor())
        else:
            image = decode_image(rows.column("model_image")[i].as_py(), target_size=64)
            out.append(model.encode_images([image], return_tokens=True).tokens[0])
    return torch.stack(out) if out else torch.empty(0)


def _image_embedding(model, data: bytes) -> np.ndarray:
    from blip_ops import decode_image

    return model.encode_images(model.preprocess([decode_image(data)])).embeddings.numpy()[0]


def _same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]], tol=1e-4) -> None:
    assert len(got) == len(want)
    for (gid, gs), (wid, ws) in zip(got, want, strict=True):
        assert abs(gs - ws) < tol, (got, want)
        if gid != wid:  # only ties may swap
            assert abs(dict(want)[gid] - ws) < tol, f"{gid} vs {wid}"


# ------------------------------------------------------------------ tests
def test_ranking_equals_offline_rule(client, indexed, tiny_query_model):
    tiny_model = tiny_query_model  # loaded with the CPU settings the service uses
    cfg, root = indexed
    queries = pq.read_table(root / "catalog" / "queries.parquet")
    picked = [
        queries.filter(pc.equal(queries.column("lang"), lang)).slice(0, 2)
        for lang in ("en", "zh", "pinyin")
    ]
    texts = [t for part in picked for t in part.column("query").to_pylist()] + ["  RED   Sofa  "]
    cases = [(40, 16, 25), (20, 0, 20), (30, 30, 10)]
    rows_by_version = {}
    for text in texts:
        for candidates, rerank_k, k in cases:
            r = client.post(
                "/search",
                json={"text": text, "candidates": candidates, "rerank_k": rerank_k, "k": k},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model_id"] == tiny_model.model_id and body["request_id"]
            assert set(body["timings_ms"]) >= {"encode", "ann", "rerank", "total"}
            version = body["table_version"]
            if version not in rows_by_version:
                rows_by_version[version] = _published(cfg, version)
            want = _offline(tiny_model, rows_by_version[version], text, candidates, rerank_k)[:k]
            got = [(x["product_id"], x["score"]) for x in body["results"]]
            _same_ranking(got, want)
            for pos, x in enumerate(body["results"]):
                reranked = x["itm_score"] is not None
                assert reranked == (pos < rerank_k)
                if reranked:
                    assert abs(x["score"] - (x["itm_score"] + x["itc_score"])) < 1e-5
                else:
                    assert abs(x["score"] - x["itc_score"]) < 1e-6


def test_image_and_mixed_queries(client, indexed, tiny_model):
    cfg, _ = indexed
    r = client.get("/healthz")
    rows = _published(cfg, r.json()["table_version"])
    # Search by example photo: ITC order (no ITM), equal to brute-force cosine from the same bytes;
    # a product's own stored image finds it among the first (near-duplicates may tie with it).
    emb = np.stack(rows.column("image_embedding").to_numpy(zero_copy_only=False))
    ids = rows.column("product_id").to_pylist()
    for i in (0, 7, 33):
        pid = ids[i]
        raw = rows.column("model_image")[i].as_py()
        image = base64.b64encode(raw).decode()
        body = client.post("/search", json={"image": image, "k": 5}).json()
        assert all(x["itm_score"] is None for x in body["results"])
        q = _image_embedding(tiny_model, raw)
        cos = emb @ q
        want = [(ids[j], float(cos[j])) for j in np.argsort(-cos, kind="stable")[:5]]
        _same_ranking([(x["product_id"], x["score"]) for x in body["results"]], want)
        assert pid in [x["product_id"] for x in body["results"][:3]]
        # Text + image: ITM scores the text over candidates from the mean embedding.
        title = rows.column("title")[i].as_py()
        mixed = client.post(
            "/search", json={"image": "data:image/jpeg;base64," + image, "text": title, "k": 5}
        ).json()
        assert mixed["reranked"] > 0 and mixed["results"][0]["itm_score"] is not None
    # A metadata filter restricts the candidates.
    body = client.post(
        "/search", json={"text": "sofa", "filter": "category = 'furniture' AND price > 10", "k": 50}
    ).json()
    assert body["results"] and all(
        x["metadata"]["category"] == "furniture" and x["metadata"]["price"] > 10
        for x in body["results"]
    )


def test_products_thumbnail_and_health(client, indexed):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["rows"] == N_PRODUCTS
    assert health["model_id"].startswith("hf_blip-")
    pid = client.post("/search", json={"text": "lamp", "k": 1}).json()["results"][0]["product_id"]
    product = client.get(f"/products/{pid}").json()
    assert product["product_id"] == pid and product["table_version"] == health["table_version"]
    thumb = client.get(f"/products/{pid}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] > 0
    missing = client.get("/products/no-such-id")
    assert missing.status_code == 404 and "no-such-id" in missing.json()["error"]
    assert client.get("/products/no-such-id/thumbnail").status_code == 404
    rid = client.get("/healthz", headers={"X-Request-ID": "trace-123"})
    assert rid.headers["x-request-id"] == "trace-123" and rid.json()["request_id"] == "trace-123"


def _bomb() -> bytes:
    """A PNG whose header declares 100k x 100k pixels (the safe decoder refuses it unread)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


ERROR_CASES = [
    # (body as raw bytes or JSON object, expected status, text the error must contain)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({}, 400, "give `text`, `image`"),
    ({"text": "   "}, 400, "`text` is empty"),
    ({"text": "x" * 513}, 400, "the limit is 512"),
    ({"text": 5}, 400, "`text` must be a string"),
    ({"text": "sofa", "colour": "red"}, 400, "unknown field"),
    ({"image": "***not base64***"}, 400, "not valid base64"),
    ({"image": _b64(b"GIF89a" + b"\0" * 40)}, 400, "could not be decoded"),
    ({"image": _b64(b"plain text, not an image")}, 400, "could not be decoded"),
    ({"image": _b64(_bomb())}, 400, "could not be decoded (too_many_pixels)"),
    ({"text": "sofa", "k": 0}, 400, "`k` must be between 1 and"),
    ({"text": "sofa", "k": "ten"}, 400, "`k` must be an integer"),
    ({"text": "sofa", "candidates": 5000}, 400, "`candidates` must be between 1 and 1000"),
    ({"text": "sofa", "candidates": 10, "k": 11}, 400, "`k` must be between 1 and 10"),
    (
        {"text": "sofa", "candidates": 10, "rerank_k": 11},
        400,
        "`rerank_k` must be between 0 and 10",
    ),
    ({"text": "sofa", "rerank": "yes"}, 400, "`rerank` must be true or false"),
    ({"text": "sofa", "filter": "image_embedding IS NULL"}, 400, "not a metadata column"),
    ({"text": "sofa", "filter": "price < 'cheap'"}, 400, "`filter` is not valid"),
    ({"text": "sofa", "filter": "price <"}, 400, "`filter` is not valid"),
    ({"text": "sofa", "hybrid": "rrf", "filter": "price < 'x'"}, 400, "`filter` is not valid"),
    ({"text": "sofa", "filter": "category = 'a'; DROP TABLE products"}, 400, "unexpected text"),
    ({"text": "sofa", "filter": "(price > 1"}, 400, "unmatched '('"),
    ({"text": "sofa", "filter": "lower(category) = 'x'"}, 400, "not a metadata column"),
]


@pytest.mark.parametrize("body,status,message", ERROR_CASES, ids=[c[2][:30] for c in ERROR_CASES])
def test_bad_requests_get_clear_errors(client, body, status, message):
    if isinstance(body, bytes):
        r = client.post("/search", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/search", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_body_limits_and_health_after_errors(client, indexed):
    cfg, _ = indexed
    limit = cfg.serve.max_body_bytes
    big = b'{"text": "' + b"x" * (limit + 10) + b'"}'
    r = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"text": "'
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # after every error above, the replica answers normally
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/search", json={"text": "chair"}).status_code == 200


def test_api_key_and_overload(serve_url, indexed):
    """A second app: API key from an environment variable, and tight admission limits."""
    cfg, _ = indexed
    guarded = cfg.model_copy(
        update={
            "serve": cfg.serve.model_copy(
                update={
                    "api_key_env": TEST_API_KEY_ENV,
                    "ingress": cfg.serve.ingress.model_copy(
                        update={"max_ongoing_requests": 2, "max_queued_requests": 2}
                    ),
                }
            )
        }
    )
    _deploy(guarded, "guarded", "/guarded")
    url = serve_url + "/guarded"
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/search", json={"text": "sofa"}).status_code == 401
        wrong = c.post("/search", json={"text": "sofa"}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
        ok = c.post("/search", json={"text": "sofa"}, headers={"X-API-Key": TEST_API_KEY})
        assert ok.status_code == 200 and ok.json()["results"]
        bearer = c.post(
            "/search", json={"text": "sofa"}, headers={"Authorization": f"Bearer {TEST_API_KEY}"}
        )
        assert bearer.status_code == 200
        assert c.get("/healthz").status_code == 200  # probes need no key
        # nor the page (static HTML; its searches send the key) or public product thumbnails
        assert c.get("/").status_code == 200
        pid = ok.json()["results"][0]["product_id"]
        assert c.get(f"/products/{pid}/thumbnail").status_code == 200
        assert c.get(f"/products/{pid}").status_code == 401
        assert c.get("/metrics").status_code == 401

    heavy = {"text": "red wooden chair", "candidates": N_PRODUCTS, "rerank_k": N_PRODUCTS, "k": 10}

    def one(_):
        with httpx.Client(base_url=url, timeout=60) as c:
            t = time.perf_counter()
            r = c.post("/search", json=heavy, headers={"X-API-Key": TEST_API_KEY})
            return r.status_code, time.perf_counter() - t, r

    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(one, range(24)))
    statuses = Counter(s for s, _, _ in outcomes)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 1 and statuses[200] >= 4, statuses
    for status, _seconds, r in outcomes:
        if status == 200:  # every accepted request completes, with its full answer
            assert len(r.json()["results"]) == 10
    slowest_200 = max(s for st, s, _ in outcomes if st == 200)
    fastest_reject = min(s for st, s, _ in outcomes if st == 503)
    assert fastest_reject < slowest_200  # refused fast instead of waiting in line
    from ray import serve

    serve.delete("guarded")


def cfg_model_id(cfg) -> str:
    return tables.published_run(tables.connect(cfg.index.uri))["model_id"]


def test_model_id_mismatch_is_refused(indexed, tmp_path, serve_url):
    from blip_ops.tiny_model import write_tiny_model

    cfg, _ = indexed
    other = write_tiny_model(tmp_path / "other", seed=99)
    # serve.follow_model off: the service serves its own checkpoint's versions only (with it on,
    # it would load the checkpoint the published run recorded: tests/test_publish.py).
    wrong = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"name_or_path": str(other)}),
            "serve": cfg.serve.model_copy(
                update={
                    "follow_model": False,
                    "ingress": cfg.serve.ingress.model_copy(
                        update={"max_constructor_retry_count": 1}
                    ),
                }
            ),
        }
    )
    from ray import serve

    from pipelines.search.deployments import deployment_errors

    with pytest.raises(RuntimeError, match="mismatch failed"):
        _deploy(wrong, "mismatch", "/mismatch")
    why = deployment_errors("mismatch")
    assert "REFUSED" in why and "was encoded by model" in why and cfg_model_id(cfg) in why

    serve.delete("mismatch")


def test_new_version_is_picked_up_under_load(client, indexed, serve_url):
    """Republish with changed titles while clients query: no failed request, and every response
    is wholly from the old or wholly from the new version."""
    from pipelines.indexing.job import run_index

    cfg, root = indexed
    before = client.get("/healthz").json()["table_version"]
    part = sorted((root / "catalog" / "products").glob("*.parquet"))[0]
    catalog = pq.read_table(part)
    titles = catalog.column("title").to_pylist()
    changed = {
        catalog.column("product_id")[i].as_py(): f"{titles[i]} v2" for i in range(0, N_PRODUCTS, 10)
    }
    body = {"text": "lamp", "candidates": N_PRODUCTS, "k": N_PRODUCTS, "rerank_k": 8}
    stop = threading.Event()
    responses: list[httpx.Response] = []
    errors: list[str] = []

    def load():
        with httpx.Client(base_url=serve_url, timeout=60) as c:
            while not stop.is_set():
                try:
                    responses.append(c.post("/search", json=body))
                except httpx.HTTPError as err:  # a dropped connection counts as a failure
                    errors.append(repr(err))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        new_titles = [
            changed.get(p, t)
            for p, t in zip(catalog.column("product_id").to_pylist(), titles, strict=True)
        ]
        pq.write_table(
            catalog.set_column(catalog.schema.get_field_index("title"), "title", [new_titles]), part
        )
        summary = run_index(cfg)
        assert summary["indexed"] == len(changed)
        deadline = time.time() + 30
        while time.time() < deadline and client.get("/healthz").json()["table_version"] == before:
            time.sleep(0.2)
        time.sleep(1.0)  # keep the load on after the switch
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert responses and all(r.status_code == 200 for r in responses), Counter(
        r.status_code for r in responses
    )
    versions = Counter(r.json()["table_version"] for r in responses)
    assert before in versions and summary["products_version"] in versions, versions
    for r in responses:
        data = r.json()
        new = data["table_version"] != before
        for x in data["results"]:
            if x["product_id"] in changed:
                assert x["title"].endswith(" v2") == new, (data["table_version"], x["title"])


def test_serve_config_file_and_typed_builder(serve_url, indexed, tiny_model_dir):
    """configs/serve_local.yaml is a valid Serve config whose builder deploys with overrides."""
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve_search import ServeArgs, app_builder

    cfg, _ = indexed
    spec = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs" / "serve_local.yaml").read_text()
    )
    schema = ServeDeploySchema.model_validate(spec)
    (app,) = schema.applications
    assert app.import_path == "pipelines.serve_search:app_builder"
    assert schema.http_options.host == "127.0.0.1"
    args = ServeArgs.model_validate(
        {
            **app.args,
            "index.uri": cfg.index.uri,
            "model.name_or_path": str(tiny_model_dir),
            "serve.ingress.num_cpus": "0.1",
            "serve.model.num_cpus": "0.1",
            "serve.k": "3",
        }
    )
    serve.run(app_builder(args), name="built", route_prefix="/built")
    r = httpx.post(serve_url + "/built/search", json={"text": "sofa"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["results"]) == 3  # the override took effect
    serve.delete("built")


def test_cli_refuses_an_index_with_nothing_published(tmp_path, capsys):
    from pipelines.serve_search import main

    assert main(["--config", str(LOCAL_CONFIG), "--index-uri", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "nothing to serve" in err and str(tmp_path / "empty") in err


def test_hybrid_finds_model_numbers_that_vectors_miss(client, indexed):
    """A bare model number ("DV67"-style code in a title): BM25 on the normalised title finds the
    product; the (random tiny) embedding space does not."""
    import re

    from pipelines.search.schema import SearchResponse

    cfg, _ = indexed
    rows = _published(cfg, client.get("/healthz").json()["table_version"])
    codes: dict[str, set[str]] = {}
    for pid, title in zip(
        rows.column("product_id").to_pylist(), rows.column("title").to_pylist(), strict=True
    ):
        for code in re.findall(r"\b[A-Z]{2}\d{2}\b", title):
            codes.setdefault(code, set()).add(pid)
    shown = 0
    for code, owners in sorted(codes.items())[:25]:
        plain = client.post("/search", json={"text": code, "k": 10, "rerank": False}).json()
        if owners & {x["product_id"] for x in plain["results"]}:
            continue  # the vectors found it by chance: not the case this test is about
        fused = client.post(
            "/search", json={"text": code, "k": 10, "rerank": False, "hybrid": "rrf"}
        ).json()
        assert fused["hybrid"] == "rrf" and "lexical" in fused["timings_ms"]
        SearchResponse.model_validate(fused)  # the documented 200, with BM25 scores and timing
        assert owners & {x["product_id"] for x in fused["results"]}, (code, fused["results"][:2])
        # when the vector list holds every product, the exact match is in both lists: it leads
        everything = client.post(
            "/search",
            json={
                "text": code,
                "k": 10,
                "candidates": N_PRODUCTS,
                "rerank": False,
                "hybrid": "rrf",
            },
        ).json()
        assert everything["results"][0]["product_id"] in owners
        assert everything["results"][0]["lexical_score"] > 0
        # with the ITM re-rank on, the product is still among the re-ranked candidates
        reranked = client.post(
            "/search", json={"text": code, "k": 32, "rerank_k": 32, "hybrid": "rrf"}
        ).json()
        assert owners & {x["product_id"] for x in reranked["results"] if x["itm_score"] is not None}
        shown += 1
    assert shown >= 3, f"only {shown} codes where vector search missed: {sorted(codes)[:25]}"
    bad = client.post("/search", json={"text": "sofa", "hybrid": "bm99"})
    assert bad.status_code == 400 and "`hybrid` must be" in bad.json()["error"]


def test_metrics_and_json_logs_carry_the_request_id(client, serve_url):
    """/metrics in Prometheus format; one JSON access-log line per request and the model replica's
    JSON lines name the request id; the query text never reaches a log."""
    import json
    import re

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    secret_query = "zebra-quilt-7731 unusual words"
    rid = "metrics-test-0001"
    assert (
        client.post(
            "/search", json={"text": secret_query}, headers={"X-Request-ID": rid}
        ).status_code
        == 200
    )
    assert client.post("/search", json={"text": ""}).status_code == 400
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("search_requests_total", (("route", "/search"), ("status", "200")))] >= 1
    assert samples[("search_requests_total", (("route", "/search"), ("status", "400")))] >= 1
    for stage in ("encode", "ann", "rerank", "total"):
        assert samples[("search_stage_seconds_count", (("stage", stage),))] >= 1
    assert samples[("search_model_batch_size_count", (("kind", "itm"),))] >= 1
    # No search_image_token_cache_total sample here: the session index stores its ITM tokens
    # (index.store_itm_tokens=auto), so its re-ranks never consult the token cache
    # (tests/test_metrics.py checks the counting).
    health = client.get("/healthz").json()
    assert samples[("search_table_version", ())] == health["table_version"]

    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.time() + 20
    access = model_calls = None
    while time.time() < deadline:
        lines = []
        for path in logs_dir.glob("worker-*"):
            lines += [ln for ln in path.read_text(errors="replace").splitlines() if rid in ln]
        records = [json.loads(ln[ln.index("{") :]) for ln in lines if "{" in ln]
        access = [x for x in records if x.get("event") == "request" and x.get("request_id") == rid]
        model_calls = [
            x for x in records if x.get("event") == "model_call" and rid in x.get("request_ids", [])
        ]
        if access and {m["kind"] for m in model_calls} >= {"text", "itm"}:
            break
        time.sleep(0.5)
    assert access and access[0]["status"] == 200 and access[0]["route"] == "/search"
    assert set(access[0]["timings_ms"]) >= {"encode", "ann", "rerank", "total"}
    assert {m["kind"] for m in model_calls} >= {"text", "itm"}
    everything = "".join(p.read_text(errors="replace") for p in logs_dir.glob("worker-*"))
    assert "zebra-quilt" not in everything and re.search(r'"event": "request"', everything)


def test_a_lost_model_replica_is_a_503_not_a_500():
    """A request whose model replica died answers 503 + Retry-After (tests/test_faults.py kills
    one under load); other server errors stay 500."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from pipelines.search.http import _replica_lost

    assert _replica_lost(ActorDiedError())
    wrapped = RayTaskError("f", "traceback", ActorDiedError())
    assert _replica_lost(wrapped)
    assert not _replica_lost(RuntimeError("bug")) and not _replica_lost(ValueError("x"))
