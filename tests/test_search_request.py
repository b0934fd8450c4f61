"""Request parsing, the OpenAPI document, filter checking and the scorer's token cache: plain
functions and the service's FastAPI app without Serve, no Ray."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from blip_ops.token_cache import TokenCache
from pipelines.search.filters import check_filter
from pipelines.search.request import BadRequest, Limits, parse_search
from pipelines.search.schema import request_model
from pipelines.search.scorer import ItmJob, QueryScorer
from tests.conftest import draw_product, encode_image_bytes

LIMITS = Limits(k=10, candidates=100, rerank_k=32)
COLUMNS = ("product_id", "title", "category", "price", "brand")


def test_defaults_and_bounds():
    q = parse_search(b'{"text": "  red sofa "}', LIMITS)
    assert (q.text, q.k, q.candidates, q.rerank_k, q.rerank, q.filter) == (
        "red sofa",
        10,
        100,
        32,
        True,
        None,
    )
    q = parse_search({"text": "x", "candidates": 5}, LIMITS)
    assert (q.k, q.rerank_k) == (5, 5)  # defaults shrink to fit a smaller candidate list
    q = parse_search({"text": "x", "k": 3, "rerank_k": 0, "rerank": False, "filter": " "}, LIMITS)
    assert (q.k, q.rerank_k, q.rerank, q.filter) == (3, 0, False, None)


def test_image_queries_decode_with_the_safe_decoder():
    data = encode_image_bytes(draw_product(1))
    b64 = base64.b64encode(data).decode()
    assert parse_search({"image": b64}, LIMITS).image.mode == "RGB"
    assert parse_search({"image": "data:image/jpeg;base64," + b64}, LIMITS).image.size == (120, 90)
    small = Limits(max_image_bytes=100)
    with pytest.raises(BadRequest, match="the limit is 100"):
        parse_search({"image": b64}, small)


@pytest.mark.parametrize(
    "body,message",
    [
        ("not json", "not valid JSON"),
        (json.dumps("a string"), "must be a JSON object"),
        (json.dumps({"text": None, "image": None}), "give `text`, `image`"),
        (json.dumps({"text": True}), "`text` must be a string"),
        (json.dumps({"text": "x", "k": 1.5}), "`k` must be an integer"),
        (json.dumps({"text": "x", "k": True}), "`k` must be an integer"),
        (json.dumps({"text": "x", "rerank_k": -1}), "`rerank_k` must be between 0"),
        (json.dumps({"text": "x", "filter": 3}), "`filter` must be a string"),
        (json.dumps({"text": "x", "filter": "a" * 1001}), "the limit is 1000"),
        (json.dumps({"image": ""}), "`image` is empty"),
        (json.dumps({"image": 12}), "`image` must be a base64 string"),
    ],
)
def test_bad_bodies(body, message):
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace("`", "`")) as err:
        parse_search(body, LIMITS)
    assert err.value.status == 400


def test_counts_and_strings_keep_their_rules():
    """Integral floats are integers, ``k`` and ``rerank_k`` fit in ``candidates`` (a bad
    ``candidates`` is the error named), limits count stripped text, unknown fields come first."""
    q = parse_search({"text": "x", "candidates": 20.0, "k": 20, "rerank_k": 20.0}, LIMITS)
    assert (q.candidates, q.k, q.rerank_k) == (20, 20, 20)
    for body, message in [
        ({"text": "x", "candidates": 10, "k": 5000}, "`k` must be between 1 and 10, got 5000"),
        ({"text": "x", "candidates": 0, "k": 5000}, "`candidates` must be between 1 and 1000"),
        ({"text": "x", "candidates": "10"}, '`candidates` must be an integer, got "10"'),
        ({"text": "x", "rerank": None}, "`rerank` must be true or false, got null"),
        ({"text": "x", "hybrid": "yes"}, "`hybrid` must be true, false or one of"),
        ({"text": "x", "image": b"raw"}, "`image` must be a base64 string, got bytes"),
        ({"text": "x", "colour": 1, "k": 0}, "unknown field(s) ['colour']"),
        ({"text": "x" * 10, "k": 0}, "`text` has 10 characters; the limit is 5"),
    ]:
        with pytest.raises(BadRequest) as err:
            parse_search(body, Limits(max_text_chars=5))
        assert message in str(err.value), (body, str(err.value))
    assert parse_search({"text": f"  {'x' * 5}  "}, Limits(max_text_chars=5)).text == "xxxxx"


# ---- the JSON boundary: a body's bytes, before the request model sees them -------------------
DEEP = b"[" * 1000 + b"]" * 1000
NINES = b"9" * 5000
SURROGATE_HINT = "(a \\ud800-\\udfff escape must pair a high and a low surrogate)"


@pytest.mark.parametrize(
    "body,message",
    [
        (b'{"text": "lamp \\udc00"}', "`text` has a lone surrogate \\udc00 at character 5 "),
        (b'{"text": "lamp \\ud83d!"}', "`text` has a lone surrogate \\ud83d at character 5 "),
        (b'{"text": "\\ude00\\ud83d"}', "`text` has a lone surrogate \\ude00 at character 0 "),
        (b'{"text": "x", "\\udfff": 1}', "a key in the request body has a lone surrogate"),
        (b'{"text": "x", "filter": [{"a": "\\ud800"}]}', "`filter[0].a` has a lone surrogate"),
        (b'{"text": "lamp", "filter": ' + DEEP + b"}", "nests deeper than 32 levels (at byte 58)"),
        (b"\xef\xbb\xbf" + DEEP, "nests deeper than 32 levels (at byte 35)"),
        (
            b'{"text": "x", "k": ' + NINES + b"}",
            "`k` is a number with 5000 digits; the limit is 64",
        ),
        (b'{"text": "x", "k": -0.' + NINES + b"}", "`k` is a number with 5001 digits"),
        (b'{"text": "x", "k": 1e999}', "`k` is a number out of range (1e999)"),
        (b'{"text": "x", "k": -1E400}', "`k` is a number out of range (-1E400)"),
        (b'{"text": "x", "k": NaN}', "`k` is NaN, which is not a JSON number"),
        (b'{"text": "x", "filter": [Infinity]}', "`filter[0]` is Infinity, which is not a JSON"),
        (b"-Infinity", "the request body is -Infinity, which is not a JSON number"),
        (b'{"text": "lamp", "text": "sofa"}', "`text` is given more than once (an object's keys"),
        (b'{"text": "x", "filter": {"a": 1, "a": 2}}', "`filter.a` is given more than once"),
        (b'{"text": "x", "z z": {"": [1, {"b": [], "b": 0}]}}', '`["z z"][""][1].b` is given'),
        (b'{"text": "lamp\xff"}', "request body is not valid UTF-8: byte 14 (ff): invalid start"),
        (b'{"text": "\xed\xa0\x80"}', "request body is not valid UTF-8: byte 10 (ed)"),
        (b'{"text": "\xc0\x80"}', "request body is not valid UTF-8: byte 10 (c0)"),
        ('{"text": "lamp"}'.encode("utf-16"), "request body is not valid UTF-8: byte 0 (ff)"),
        (b"\xef\xbb\xbf\xef\xbb\xbf{}", "not valid JSON: Unexpected UTF-8 BOM"),  # one at most
        (b"", "request body is empty; send a JSON object"),
        (b" \r\n\t", "request body is empty"),
        (b'{"text": "la', "request body is not valid JSON: Unterminated string"),
        (b'{"text": "x"} {}', "request body is not valid JSON: Extra data"),
    ],
)
def test_json_boundary_refusals_name_the_field_or_byte(body, message):
    """What Python's json would accept, fail on with a non-client error (RecursionError,
    ValueError) or pass on to the model as a lone surrogate: each a 400 saying where."""
    with pytest.raises(BadRequest) as err:
        parse_search(body, LIMITS)
    assert err.value.status == 400 and message in str(err.value), str(err.value)
    if "surrogate \\" in message:
        assert SURROGATE_HINT in str(err.value)


def test_json_boundary_accepts_json_within_its_limits():
    """A BOM, paired surrogate escapes, \\u0000, 64-digit numbers and -0 are JSON; a nesting of
    32 levels is within the limit (the request model refuses what it does not take)."""
    assert parse_search(b'\xef\xbb\xbf{"text": "lamp"}', LIMITS).text == "lamp"
    assert parse_search(b'{"text": "lamp \\ud83d\\ude00"}', LIMITS).text == "lamp \U0001f600"
    assert parse_search(b'{"text": "a\\u0000b"}', LIMITS).text == "a\x00b"
    assert parse_search(b'{"text": "x", "k": 1e1, "candidates": 2E1}', LIMITS).k == 10
    for body, refused_by_the_model in [
        (b'{"text": "x", "k": 1' + b"0" * 63 + b"}", "`k` must be between 1 and 100, got 1000"),
        (b'{"text": "x", "k": -0}', "`k` must be between 1 and 100, got 0"),
        (b'{"text": "x", "k": -0.0}', "`k` must be between 1 and 100, got 0"),
        (b'{"text": "x", "k": 1e-999}', "`k` must be between 1 and 100, got 0"),
        (b'{"text": "x", "filter": ' + b"[" * 31 + b"]" * 31 + b"}", "`filter` must be a string"),
    ]:
        with pytest.raises(BadRequest, match=refused_by_the_model.replace("(", r"\(")):
            parse_search(body, LIMITS)


def test_json_boundary_shape_is_checked_on_the_bytes_alike_everywhere():
    """Depth and size are checked before ``json`` builds anything: brackets inside strings do not
    count, and the answer does not depend on the caller's stack (``json``'s own RecursionError
    comes at a depth that does: the raw fuzz found a body refused with two different messages)."""
    from pipelines.search.json_boundary import MAX_TOKENS

    inside = b'{"text": "[[[[' + b"[" * 40 + b'\\"{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{"}'
    assert parse_search(inside, LIMITS).text.startswith("[[[[")
    deep = b'{"text": "x", "filter": ' + b"[" * 500 + b"]" * 500 + b"}"

    def nested(levels: int) -> str:
        if levels:
            return nested(levels - 1)
        with pytest.raises(BadRequest) as err:
            parse_search(deep, LIMITS)
        return str(err.value)

    messages = {nested(0), nested(800)}
    assert messages == {"request body nests deeper than 32 levels (at byte 55)"}, messages
    many = b"[" + b"1," * MAX_TOKENS + b"1]"
    with pytest.raises(BadRequest, match=f"has more than {MAX_TOKENS} strings, brackets and comm"):
        parse_search(many, LIMITS)
    fields = {f"f{i}": "x" * 100 for i in range(MAX_TOKENS // 5)}  # keys, values and commas
    with pytest.raises(BadRequest, match="unknown field"):
        parse_search(json.dumps(fields), LIMITS)


def test_an_already_parsed_body_meets_the_same_rules():
    """The export job hands parse_search dicts: no lone surrogate, infinity or deep nesting."""
    from pipelines.search.json_boundary import check_value

    for body, message in [
        ({"text": "lamp \udc00"}, "`text` has a lone surrogate \\udc00"),
        ({"text": "x", "k": float("inf")}, "`k` is inf, which is not a JSON number"),
        ({"text": "x", "k": float("nan")}, "`k` is nan"),
    ]:
        with pytest.raises(BadRequest) as err:
            parse_search(body, LIMITS)
        assert message in str(err.value), str(err.value)
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(BadRequest, match=r"^`\[0\]\[0\]\[0\].*` is nested deeper than 32 levels$"):
        check_value(deep)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",  # curl -d without -H
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/jsonp",
        "json",
    ],
)
def test_bodies_not_declared_as_json_get_a_415(content_type):
    """The body must be declared as JSON (or not declared): a browser sends text/plain and form
    bodies across origins without asking first, and what a client did not call JSON is not read
    as JSON. The 415 comes before the body is read or checked."""
    from starlette.testclient import TestClient

    client = TestClient(_app(LIMITS))
    r = client.post(
        "/search", content=b"\xff not even JSON", headers={"content-type": content_type}
    )
    assert r.status_code == 415, r.text
    assert repr(content_type) in r.json()["error"] and "application/json" in r.json()["error"]
    assert set(r.json()) == {"error", "request_id"}


@pytest.mark.parametrize(
    "content_type",
    [
        None,  # FastAPI reads an undeclared body as JSON too
        "application/json",
        "Application/JSON; charset=UTF-8",
        'application/json;charset="utf-8"',
        "application/problem+json",
        "application/vnd.api+json",
    ],
)
def test_json_content_types_reach_the_checks(content_type):
    from starlette.testclient import TestClient

    client = TestClient(_app(LIMITS))
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post("/search", content=b'{"text": "sofa", "k": 0}', headers=headers)
    if content_type is None:  # the "no Content-Type" case really sends none
        assert "content-type" not in r.request.headers
    assert r.status_code == 400 and r.json()["error"] == "`k` must be between 1 and 100, got 0"
    r = client.post("/search", content=b'{"text": "lamp \\udc00"}', headers=headers)
    assert r.status_code == 400 and "`text` has a lone surrogate \\udc00" in r.json()["error"]


def test_an_error_quoting_unencodable_text_is_still_answered():
    """A message that quotes client input with a lone surrogate still encodes (escaped), rather
    than failing the error handler itself with a 500."""
    from types import SimpleNamespace

    from pipelines.search.http import _error

    reply = _error(SimpleNamespace(scope={"state": {"request_id": "r1"}}), 400, "bad \udc00 x")
    assert json.loads(reply.body) == {"error": "bad \\udc00 x", "request_id": "r1"}


# ---- the OpenAPI document: the models, the errors, the API key -------------------------------
def _app(limits: Limits, api_key: str | None = None):
    """The service's ASGI app (its Guard and FastAPI routes) with no index, model or Serve: enough
    for the document, the key check and the request's 400s."""
    from types import SimpleNamespace

    from pipelines.search.http import build_http_app

    service = SimpleNamespace(limits=limits, api_key=api_key, max_body_bytes=100_000, metrics=None)
    return build_http_app(service)


def openapi_document(limits: Limits, api_key: str | None = None) -> dict:
    """The service's ``/openapi.json``, built without Serve."""
    return _app(limits, api_key).app.openapi()


def credentials(scheme: dict, key: str) -> dict[str, str]:
    """The headers that send ``key`` the way an OpenAPI security scheme declares it."""
    if scheme["type"] == "apiKey" and scheme["in"] == "header":
        return {scheme["name"]: key}
    if scheme["type"] == "http" and scheme["scheme"].lower() == "bearer":
        return {"Authorization": f"Bearer {key}"}
    raise AssertionError(f"a security scheme the tests cannot fill: {scheme}")


def test_openapi_documents_the_models_errors_and_api_key():
    limits = Limits(max_text_chars=64, max_candidates=500)
    doc = openapi_document(limits, api_key="s3cret")
    ref = "#/components/schemas/"
    search = doc["paths"]["/search"]["post"]
    body = search["requestBody"]["content"]["application/json"]
    assert search["requestBody"]["required"] and body["schema"] == {"$ref": ref + "SearchRequest"}
    responses = {
        s: r.get("content", {}).get("application/json") for s, r in search["responses"].items()
    }
    assert responses["200"]["schema"] == {"$ref": ref + "SearchResponse"}
    assert {s for s, r in responses.items() if r == {"schema": {"$ref": ref + "ErrorBody"}}} == {
        "400",
        "401",
        "413",
        "415",
        "500",
    }
    schemas = doc["components"]["schemas"]
    assert schemas["SearchRequest"] == request_model(limits).model_json_schema()
    props = schemas["SearchRequest"]["properties"]
    assert props["text"]["anyOf"][0]["maxLength"] == 64 and props["k"]["anyOf"][0]["maximum"] == 500
    assert schemas["SearchResponse"]["properties"]["results"]["items"] == {
        "$ref": ref + "SearchResult"
    }
    for name in ("SearchRequest", "SearchResponse", "SearchResult", "StageTimings", "ErrorBody"):
        undocumented = [
            f for f, p in schemas[name]["properties"].items() if not p.get("description")
        ]
        assert not undocumented, (name, undocumented)
    # the key, as the Guard takes it: X-API-Key or a bearer token, on every route that needs it
    schemes = doc["components"]["securitySchemes"]
    assert credentials(schemes["ApiKey"], "k") == {"X-API-Key": "k"}
    assert credentials(schemes["Bearer"], "k") == {"Authorization": "Bearer k"}
    secured = {
        (p, m) for p, ops in doc["paths"].items() for m, op in ops.items() if "security" in op
    }
    assert secured == {("/search", "post"), ("/facets", "get"), ("/products/{product_id}", "get")}
    assert search["security"] == [{"ApiKey": []}, {"Bearer": []}]  # either one
    # without a key the service is open, and its document says so
    open_doc = openapi_document(limits)
    assert "securitySchemes" not in open_doc["components"]
    assert not [
        op for ops in open_doc["paths"].values() for op in ops.values() if "401" in op["responses"]
    ]


def test_the_document_is_public_and_the_declared_key_passes_the_guard():
    """/docs loads without the key (its "Try it out" then sends it as the security schemes say);
    each scheme gets a request past the Guard, to the body's own 400 in the usual error body."""
    from starlette.testclient import TestClient

    client = TestClient(_app(LIMITS, api_key="s3cret"))
    doc = client.get("/openapi.json")
    assert doc.status_code == 200 and client.get("/docs").status_code == 200
    bad = {"text": "sofa", "k": 0}
    refused = client.post("/search", json=bad)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert client.get("/facets").status_code == 401 and client.post("/docs").status_code == 401
    for name, scheme in doc.json()["components"]["securitySchemes"].items():
        rid = {"X-Request-ID": f"try-{name}"}  # (Serve's proxy sets one when a client does not)
        r = client.post("/search", json=bad, headers={**credentials(scheme, "s3cret"), **rid})
        assert r.status_code == 400, (name, r.text)
        assert r.json() == {
            "error": "`k` must be between 1 and 100, got 0",
            "request_id": f"try-{name}",
        }
        wrong = client.post("/search", json=bad, headers=credentials(scheme, "nope"))
        assert wrong.status_code == 401, name


@pytest.mark.parametrize(
    "expr",
    [
        "category = 'sofa'",
        "price >= 10 AND price < 99.5 OR NOT (brand IN ('Kido', 'O''Neil'))",
        "title LIKE '%lamp%' AND brand IS NOT NULL",
        "price BETWEEN 1 AND 2e3",
        "`category` != 'x'",
        "price > -1",  # a minus sign, not a comment
    ],
)
def test_filters_over_metadata_pass(expr):
    assert check_filter(expr, COLUMNS) == expr


@pytest.mark.parametrize(
    "expr,message",
    [
        ("image_embedding IS NULL", "not a metadata column"),
        ("thumbnail = 'x'", "not a metadata column"),
        ("upper(category) = 'X'", "not a metadata column"),
        ("category = 'a'; DROP TABLE products", "unexpected text"),
        ('category = "a"', "unexpected text"),
        ("price > 1 -- comment", "may not contain comments"),
        ("price > 1 /* x */", "may not contain comments"),
        ("(price > 1", "unmatched '('"),
        ("price > 1)", "unmatched ')'"),
        ("category = 'unterminated", "unexpected text"),
    ],
)
def test_filters_refused(expr, message):
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_filter(expr, COLUMNS)


def test_token_cache_is_a_bounded_lru():
    cache = TokenCache(2)
    a, b, c = (torch.full((3, 4), float(i)) for i in range(3))
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recent
    cache.put("c", c)  # evicts b
    assert cache.get("b") is None and cache.get("c") is c and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 1)
    off = TokenCache(0)
    off.put("a", a)
    assert off.get("a") is None


def test_token_cache_bounds_bytes_and_computes_each_miss_once():
    """The byte bound evaluation uses; ``fetch`` computes a missing key once, in batches."""
    cache = TokenCache(max_bytes=2 * 3 * 4 * 4)  # room for two (3, 4) float32 token sets
    calls: list[list[int]] = []

    def compute(keys):
        calls.append(list(keys))
        return torch.stack([torch.full((3, 4), float(k)) for k in keys])

    out = cache.fetch([1, 2, 1], compute, batch_size=1)
    assert out.shape == (3, 3, 4) and calls == [[1], [2]] and torch.equal(out[0], out[2])
    assert cache.nbytes == 96 and not cache.has_room()
    cache.fetch([3], compute)  # evicts 1, the least recently used
    assert cache.get(1) is None and cache.get(2) is not None and len(cache) == 2
    cache.fetch([1, 2], compute)
    assert calls[-1] == [1]  # only the evicted one is computed again
    cache.put("huge", torch.zeros(10, 10))  # larger than the bound: not kept, nothing evicted
    assert len(cache) == 2 and cache.get("huge") is None
    assert cache.fetch([], compute).numel() == 0
    with pytest.raises(ValueError, match="compute gave 1 token sets for 2 keys"):
        TokenCache(4).fetch(["a", "b"], lambda keys: torch.zeros(1, 3, 4))


def test_rerank_job_is_blips_rule_on_the_scorers_logits(tiny_model):
    """The engine's re-rank: the scorer's ITM logits, combined by ``blip_ops.rerank.rerank`` (the
    same numbers as ``combine_scores`` on them); no candidates, no model call."""
    import asyncio

    from blip_ops.rerank import combine_scores
    from pipelines.search.engine import LocalScorer
    from pipelines.search.scorer import rerank_job

    images = tuple(encode_image_bytes(draw_product(s)) for s in range(4))
    job = ItmJob("red sofa", tuple(f"p{s}:h{s}" for s in range(4)), images)
    itc = np.linspace(0.9, 0.3, 7).astype(np.float32)
    got = asyncio.run(
        rerank_job(LocalScorer(QueryScorer(tiny_model)), job, itc, itm_weight=0.5, k=5)
    )
    want = combine_scores(itc, QueryScorer(tiny_model).itm([job])[0], 0.5).head(5)
    assert list(got.order) == list(want.order)
    np.testing.assert_allclose(got.score, want.score, atol=1e-6)
    np.testing.assert_allclose(got.itm, want.itm, atol=1e-6)

    class NoModel:
        async def itm(self, job):
            raise AssertionError("no candidates to re-rank: no model call")

    plain = asyncio.run(rerank_job(NoModel(), ItmJob("x", (), ()), itc, itm_weight=1.0, k=3))
    assert list(plain.order) == [0, 1, 2] and np.isnan(plain.itm).all()


def test_scorer_batches_equal_single_requests_and_cache_tokens(tiny_model):
    images = [encode_image_bytes(draw_product(s)) for s in range(6)]
    keys = [f"p{s}:h{s}" for s in range(6)]
    jobs = [
        ItmJob("red sofa", tuple(keys[:4]), tuple(images[:4])),
        ItmJob("blue lamp", tuple(keys[2:]), tuple(images[2:])),
        ItmJob("empty", (), ()),
    ]
    single = [QueryScorer(tiny_model).itm([job])[0] for job in jobs]
    scorer = QueryScorer(tiny_model, cache_items=100)
    batched = scorer.itm(jobs)
    for s, b in zip(single, batched, strict=True):
        np.testing.assert_allclose(b, s, atol=1e-5)
    assert len(batched[2]) == 0
    assert scorer.cache.misses == 6 and len(scorer.cache) == 6  # shared products encoded once
    again = scorer.itm(jobs[:1])[0]
    np.testing.assert_allclose(again, single[0], atol=1e-5)
    assert scorer.cache.hits == 4
    # the rule's reference: ITM of the same pairs straight from the model
    from blip_ops import decode_image

    decoded = [decode_image(d) for d in images[:4]]
    tokens = tiny_model.encode_images(decoded, return_tokens=True).tokens
    np.testing.assert_allclose(
        single[0], tiny_model.itm_scores("red sofa", tokens).numpy(), atol=1e-5
    )
    texts = scorer.encode_texts(["red sofa", "蓝色台灯"])
    assert texts.shape == (2, tiny_model.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_candidates_decode_on_threads_like_one_at_a_time():
    """The re-ranker decodes cache misses on a thread pool: the same images, in order, and a bad
    JPEG still fails with the decoder's own error."""
    from concurrent.futures import ThreadPoolExecutor

    from blip_ops.decode import ImageDecodeError
    from pipelines.search.scorer import POOL_MIN_SIDE, decode_candidates

    class CountingPool(ThreadPoolExecutor):
        calls = 0

        def map(self, *a, **kw):
            CountingPool.calls += 1
            return super().map(*a, **kw)

    side = POOL_MIN_SIDE
    blobs = [encode_image_bytes(draw_product(s, (side + 8 * s, side))) for s in range(9)]
    serial = decode_candidates(blobs, side)
    with CountingPool(3) as pool:
        pooled = decode_candidates(blobs, side, pool)
        assert CountingPool.calls == 1
        assert [im.size for im in pooled] == [im.size for im in serial]
        for a, b in zip(serial, pooled, strict=True):
            assert a.tobytes() == b.tobytes()
        with pytest.raises(ImageDecodeError):
            decode_candidates([*blobs[:2], b"\xff\xd8 truncated"], side, pool)
        small = [encode_image_bytes(draw_product(s, (64, 64))) for s in range(4)]
        assert len(decode_candidates(small, 64, pool)) == 4
        assert CountingPool.calls == 2  # small images decode on the caller's thread


def test_batched_itm_tokenises_each_query_once(tiny_model, monkeypatch):
    """itm_scores gets one text per (query, candidate) pair; only the distinct texts reach the
    tokenizer, and the scores equal one query at a time."""
    tokens = tiny_model.encode_images(
        [draw_product(s) for s in range(5)], return_tokens=True
    ).tokens  # (5, N, H)
    texts = ["red sofa"] * 3 + ["蓝色台灯"] * 2
    seen: list[int] = []
    tokenizer = tiny_model.tokenizer

    def counting(batch, **kw):
        seen.append(len(batch))
        return tokenizer(batch, **kw)

    monkeypatch.setattr(tiny_model, "tokenizer", counting)
    pairs = tiny_model.itm_scores(texts, tokens)
    assert seen == [2]
    one = torch.cat(
        [
            tiny_model.itm_scores("red sofa", tokens[:3]),
            tiny_model.itm_scores("蓝色台灯", tokens[3:]),
        ]
    )
    torch.testing.assert_close(pairs, one, atol=1e-5, rtol=0)
    enc = tiny_model._tokenize(texts)
    monkeypatch.setattr(tiny_model, "tokenizer", tokenizer)
    direct = tokenizer(
        [tiny_model.normalize_text(t) for t in texts],
        padding="longest",
        truncation=True,
        max_length=tiny_model.text_settings.max_length,
        return_tensors="pt",
    )
    assert torch.equal(enc["input_ids"], direct["input_ids"])
    assert torch.equal(enc["attention_mask"], direct["attention_mask"])


def test_fusion_rules():
    from pipelines.search.hybrid import fused_order, rrf_scores, weighted_scores

    fused = rrf_scores([["a", "b", "c"], ["c", "d"]], k=60)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["a"] == pytest.approx(1 / 61) and fused["d"] == pytest.approx(1 / 62)
    order = fused_order(["a", "b", "c"], [0.9, 0.8, 0.7], ["c", "d"], [5.0, 1.0], mode="rrf", n=3)
    # c is in both lists; b ties d on rank (2nd in its list): the vector list's item first
    assert order == ["c", "a", "b"]
    w = weighted_scores({"a": 0.9, "c": 0.5}, {"c": 4.0, "d": 2.0}, weight=0.5)
    assert w == pytest.approx({"a": 0.45, "c": 0.75, "d": 0.25})
    assert fused_order(["a", "c"], [0.9, 0.5], ["c", "d"], [4.0, 2.0], mode="weighted", n=2) == [
        "c",
        "a",
    ]
    with pytest.raises(ValueError, match="hybrid mode"):
        fused_order(["a"], [1.0], [], [], mode="bm25", n=1)
    assert parse_search({"text": "x", "hybrid": True}, LIMITS).hybrid == "rrf"
    assert parse_search({"text": "x"}, Limits(hybrid="weighted")).hybrid == "weighted"
    with pytest.raises(BadRequest, match="`hybrid` must be"):
        parse_search({"text": "x", "hybrid": "bm25"}, LIMITS)


# ---- the query models of one model replica (rollout / rollback) ------------------------------
def test_query_models_load_check_and_evict(tmp_path, tiny_model_dir):
    import shutil

    from blip_ops import load_model
    from blip_ops.tiny_model import write_tiny_model
    from pipelines.search.models import ModelMismatchError, ModelRef, QueryModels

    loads: list[str] = []

    def load(path: str):
        loads.append(path)
        return load_model(path, device="cpu")

    b_dir = write_tiny_model(tmp_path / "b", seed=5)
    c_dir = write_tiny_model(tmp_path / "c", seed=6)
    models = QueryModels(load, str(tiny_model_dir), max_models=2, cache_items=8)
    a_id = models.default_id
    b_id, c_id = load_model(b_dir).model_id, load_model(c_dir).model_id
    assert models.get().model_id == a_id and models.get(None) is models.get(ModelRef(a_id, None))
    assert models.get((b_id, str(b_dir))).model_id == b_id
    assert models.get((b_id, "/elsewhere")).model_id == b_id  # loaded once, by id
    assert loads == [str(tiny_model_dir), str(b_dir)]
    # Encodings are the loaded model's own.
    text = models.get((b_id, str(b_dir))).encode_texts(["sofa"])
    assert np.allclose(text, load_model(b_dir).encode_texts(["sofa"]).numpy(), atol=1e-6)
    # A third model evicts the least recently used (A: B was used last).
    models.get((c_id, str(c_dir)))
    assert models.loaded == [b_id, c_id]
    # No recorded checkpoint: refused with the reason.
    with pytest.raises(ModelMismatchError, match="recorded no checkpoint path"):
        models.get(ModelRef("model-x", None))
    # A checkpoint overwritten since the run: its id differs, refused, never used.
    moved = tmp_path / "moved"
    shutil.copytree(c_dir, moved)
    with pytest.raises(ModelMismatchError, match=f"is now model {c_id}.*encoded by {b_id}"):
        QueryModels(load, str(tiny_model_dir), max_models=2).get(ModelRef(b_id, str(moved)))
    with pytest.raises(ModelMismatchError, match="could not load the checkpoint"):
        models.get(ModelRef("model-y", str(tmp_path / "missing")))
    assert models.loaded == [b_id, c_id]
    with pytest.raises(ValueError, match="max_models must be at least 1, got 0"):
        QueryModels(load, str(tiny_model_dir), max_models=0)


def test_batch_wait_only_while_other_calls_are_in_flight():
    """QueryModel._batched: a lone call is batched with no wait; a call that arrives while
    another is in flight waits batch_wait_timeout_s for company (and 'false' always waits)."""
    import asyncio
    from types import SimpleNamespace

    from pipelines.search.deployments import QueryModel

    batched = QueryModel.func_or_class._batched

    class Method:
        def __init__(self):
            self.waits: list[float] = []
            self.release = asyncio.Event()

        def set_batch_wait_timeout_s(self, s: float) -> None:
            self.waits.append(s)

        async def __call__(self, item, request_id, model):
            if item == "hold":
                await self.release.wait()
            return {"value": item}

    async def scenario(adaptive: bool) -> list[float]:
        state = SimpleNamespace(in_flight=0, adaptive_wait=adaptive, batch_wait_s=0.005)
        method = Method()
        assert await batched(state, method, "alone", "r0", None) == {"value": "alone"}
        held = asyncio.ensure_future(batched(state, method, "hold", "r1", None))
        await asyncio.sleep(0)
        assert state.in_flight == 1
        await batched(state, method, "second", "r2", None)
        method.release.set()
        await held
        assert state.in_flight == 0
        return method.waits

    assert asyncio.run(scenario(True)) == [0.0, 0.0, 0.005]
    assert asyncio.run(scenario(False)) == []  # the configured wait, set once at start
