"""A raw-bytes fuzz of the running search service: what a hostile client can put on the wire.

Schemathesis (``tests/test_fuzz_http.py``) generates from the OpenAPI document, so its bodies are
JSON that a JSON library wrote. Here the test writes the bytes itself, against the session's
shared Serve app (``search_url``):

- ``POST /search`` bodies: arbitrary bytes; JSON-ish text with deep nesting, huge and special
  numbers (``1e999``, ``-0``, 5,000-digit integers, ``NaN``, ``Infinity``), every escape (``\\u0000``,
  lone high and low surrogates, valid pairs, invalid escapes), duplicate keys, then encoded as
  UTF-8, UTF-16/32 or Latin-1, with byte order marks, truncated, or with invalid UTF-8 spliced
  in; every field with every wrong type, every escape in the text and filter and every special
  number in the counts, each in an otherwise valid body; arbitrary ``Content-Type`` headers (and
  none); and valid bodies whose text is unusual but valid Unicode (with the matrix's valid ones,
  the only cases that reach the model);
- ``GET /?q=…``: arbitrary strings and bytes, percent-encoded;
- ``GET /products/{id}``: arbitrary ids, percent-encoded.

Every answer is below 500 and one of the statuses the route documents; every error is an
``ErrorBody`` with the response's request id. ``/search`` answers exactly what the service's own
parser says of the same bytes (``check_media_type`` then ``parse_search``: the same 415 or 400
message), and a 200 whenever the parser accepts the body (a 400 only for a filter the table
refuses). Afterwards the app's replicas are the same processes, ``/healthz`` is 200 and a normal
search works. Each test prints its case count, time and status histogram.

Deterministic (``derandomize``, no example database), bounded by the counts below (2,000+
requests, most of them cheap 4xx).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from urllib.parse import quote, quote_from_bytes, unquote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.search.json_boundary import check_media_type
from pipelines.search.request import BadRequest, Limits, parse_search
from tests.test_fuzz_http import FUZZ_SETTINGS as RAW_SETTINGS  # reproducible in CI
from tests.test_fuzz_http import replica_pids

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
logger = logging.getLogger(__name__)

APP = "search"  # the suite's shared app (tests/conftest.py: search_url)
FIELDS = ("text", "image", "candidates", "k", "rerank_k", "rerank", "filter", "hybrid")
EXAMPLES = {"bytes": 300, "jsonish": 1000, "content_type": 150, "valid_text": 100}
PAGE_EXAMPLES = 300
PRODUCT_EXAMPLES = 300
SEARCH_STATUSES = {200, 400, 415}


# ------------------------------------------------------------------------------ the service
@pytest.fixture(scope="module")
def service(search_url, search_index):
    """A client of the shared app, its limits, some real product ids and its replicas' pids
    (after a warm-up search, so that the model replica exists)."""
    cfg, _ = search_index
    with httpx.Client(base_url=search_url, timeout=60) as client:
        found = client.post("/search", json={"text": "sofa", "k": 20, "rerank_k": 0})
        assert found.status_code == 200, found.text
        ids = [r["product_id"] for r in found.json()["results"]]
        pids = replica_pids(APP)
        assert set(pids) == {"SearchIngress", "QueryModel"}, pids
        yield client, Limits.from_config(cfg.serve), ids, pids


def _assert_alive(client: httpx.Client, pids: dict) -> None:
    """No replica died (and was replaced) and the app still answers health and a search."""
    assert replica_pids(APP) == pids, "a replica died and was replaced during the fuzz"
    assert client.get("/healthz").status_code == 200
    ok = client.post("/search", json={"text": "red wooden chair", "k": 3})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 3, ok.text


def _assert_error_body(response: httpx.Response, where: str) -> dict:
    body = response.json()
    assert set(body) == {"error", "request_id"}, where
    assert body["request_id"] == response.headers["x-request-id"], where
    return body


def _report(capsys, name: str, statuses: Counter, seconds: float) -> None:
    line = (
        f"raw fuzz {name}: {sum(statuses.values())} cases in {seconds:.1f} s, statuses "
        f"{dict(sorted(statuses.items()))}"
    )
    logger.info(line)
    with capsys.disabled():
        print(f"\n{line}")


# ------------------------------------------------------------------------------ /search bodies
ESCAPES = [  # JSON escapes: valid JSON, whatever the parser then makes of them
    "\\u0000",
    "\\u001f",
    "\\ud800",  # lone high
    "\\udbff",
    "\\udc00",  # lone low
    "\\udfff",
    "\\ud83d\\ude00",  # a valid pair
    "\\udbff\\udfff",  # U+10FFFF
    "\\ude00\\ud83d",  # a pair the wrong way round
    "\\ud800\\ud800",
    "\\uFFFF",
    "\\uFEFF",
    "\\u202e",
    '\\n\\r\\t\\b\\f\\/\\\\\\"',
]
BAD_ESCAPES = [  # not JSON escapes
    "\\x41",
    "\\u",
    "\\u12",
    "\\uZZZZ",
    "\\U0001F600",
    "\\'",
    "\\0",
    "\\",
]
SPECIAL_NUMBERS = [
    *("0", "-0", "-0.0", "0.0", "5", "1", "100", "1001", "10.0", "1.5", "-1", "1e2", "2E1"),
    *("1e999", "-1e999", "1e-999", "1E400", "9007199254740993", "1" + "0" * 63, "1" + "0" * 64),
    *("NaN", "Infinity", "-Infinity"),
]
BAD_NUMBERS = ["-NaN", "nan", "inf", "+1", "01", "1.", ".5", "0x10", "1e", "1e+", "--1", "1_000"]
LITERALS = ["true", "false", "null", "true", "false", "null", "tru", "None"]
INVALID_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\x80",  # a lone continuation byte
    b"\xc0\x80",  # overlong NUL
    b"\xe0\x80\xaf",  # overlong '/'
    b"\xed\xa0\x80",  # an encoded surrogate (CESU-8)
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",  # truncated sequence
]
BOMS = [b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff"]
ENCODINGS = ["utf-8"] * 36 + ["utf-16", "utf-16-be", "utf-32", "latin-1"]


def _long_number(digits: int, kind: int) -> str:
    return ["9" * digits, "-1" + "0" * digits, "0." + "1" * digits, "1" * digits + "e5"][kind]


def _escape_plain(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


NUMBERS = st.one_of(
    st.sampled_from(SPECIAL_NUMBERS),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds(_long_number, st.integers(60, 6000), st.integers(0, 3)),
)
STRING_PARTS = st.one_of(st.sampled_from(ESCAPES), st.text(max_size=8).map(_escape_plain))
BAD_STRING_PARTS = st.one_of(
    st.sampled_from(BAD_ESCAPES),
    st.text(max_size=4),  # unescaped: quotes, backslashes and control characters as they are
)


def _string(parts: list[str]) -> str:
    return '"' + "".join(parts) + '"'


STRINGS = st.lists(STRING_PARTS, max_size=5).map(_string)
# rarer than valid strings: one bad string is enough to make the whole body a syntax error
BAD_STRINGS = st.lists(st.one_of(STRING_PARTS, BAD_STRING_PARTS), min_size=1, max_size=5)
KEYS = st.one_of(st.sampled_from(FIELDS).map(json.dumps), STRINGS)
SCALARS = st.one_of(
    NUMBERS,
    STRINGS,
    STRINGS,
    st.sampled_from(LITERALS),
    st.one_of(BAD_STRINGS.map(_string), st.sampled_from(BAD_NUMBERS)),
)


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:  # keys may repeat: duplicates are a case
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(_array),
        st.lists(st.tuples(KEYS, inner), max_size=4).map(_object),
    ),
    max_leaves=8,
)


@st.composite
def _deep(draw) -> str:
    """Nesting from a few levels to thousands, closed or not."""
    depth = draw(st.integers(1, 3000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"b":', "}]")]))
    closed = draw(st.sampled_from([True, True, True, False]))
    return opener * depth + draw(SCALARS) + (closer * depth if closed else "")


@st.composite
def _document(draw) -> str:
    """Mostly an object with some of the request's fields (text first: the other fields' errors
    then show), sometimes any value or a deep nesting at the top."""
    kind = draw(st.sampled_from(["object"] * 6 + ["value", "deep"]))
    if kind == "value":
        return draw(VALUES)
    if kind == "deep":
        return draw(_deep())
    pairs = draw(st.lists(st.tuples(KEYS, st.one_of(VALUES, VALUES, VALUES, _deep())), max_size=4))
    if draw(st.booleans()):
        pairs.insert(0, ('"text"', '"lamp"'))
    return _object(pairs)


@st.composite
def jsonish_bodies(draw) -> bytes:
    """A JSON-ish document as bytes: encoded, then perhaps given a BOM, truncated or spliced."""
    raw = draw(_document()).encode(draw(st.sampled_from(ENCODINGS)), "replace")
    edit = draw(st.sampled_from(["none"] * 8 + ["bom", "truncate", "splice", "overwrite"]))
    at = draw(st.integers(0, len(raw)))
    if edit == "bom":
        raw = draw(st.sampled_from(BOMS)) + raw
    elif edit == "truncate":
        raw = raw[:at]
    elif edit == "splice":
        raw = raw[:at] + draw(st.sampled_from(INVALID_UTF8)) + raw[at:]
    elif edit == "overwrite" and raw:
        at = min(at, len(raw) - 1)
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    return raw


CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "application/problem+json",
            "text/plain",
            "text/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            "application/octet-stream",
            "*/*",
            "application/*",
            ";",
            "application/json;;;charset",
        ]
    ),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),
)
VALID_TEXTS = st.text(
    st.one_of(
        st.characters(codec="utf-8"),  # no lone surrogates: valid Unicode of every category
        st.sampled_from(["\x00", "\ufeff", "\u202e", "\U0010ffff", "\U0001f600", "\u0301", "\n"]),
    ),
    min_size=1,
    max_size=40,
)


@st.composite
def valid_text_bodies(draw) -> bytes:
    """Bodies the parser accepts, their text unusual (astral characters escaped as pairs when
    ``ensure_ascii``), re-ranking few candidates to keep the model's work small."""
    body = {"text": draw(VALID_TEXTS), "k": 3, "rerank_k": draw(st.integers(0, 2))}
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode()


WRONG_VALUES = [
    "[]",
    "{}",
    '"x"',
    '""',
    "0",
    "-1",
    "1.5",
    "true",
    "null",
    '"10"',
    "[1]",
    '{"a": 1}',
    "1e999",
    "9" * 100,
    '"\\udc00"',
    '"' + "x" * 2000 + '"',
]


def _matrix() -> list[bytes]:
    """Every field with every wrong value, every escape in the text and the filter, every
    special number in every count: each beside an otherwise valid body (so the one value is
    what the service answers about; the valid ones reach the model)."""
    cases = [(field, value) for field in FIELDS for value in WRONG_VALUES]
    cases += [(field, f'"lamp {e}"') for field in ("text", "filter") for e in ESCAPES + BAD_ESCAPES]
    numbers = [*SPECIAL_NUMBERS, *BAD_NUMBERS, *(_long_number(5000, kind) for kind in range(4))]
    cases += [(field, n) for field in ("candidates", "k", "rerank_k") for n in numbers]
    base = {"text": '"lamp"', "k": "3", "rerank_k": "0"}
    bodies = ({**base, field: value} for field, value in cases)
    return [_object([(json.dumps(k), v) for k, v in body.items()]).encode() for body in bodies]


MATRIX = _matrix()


def _expected(body: bytes, content_type: str | None, limits: Limits) -> tuple[int, str | None]:
    """What the service must answer: the parser's own verdict on the same bytes (status, error),
    or (200, None) for a body it accepts."""
    try:
        check_media_type(content_type)
        query = parse_search(body, limits)
    except BadRequest as err:
        return err.status, str(err)
    return 200, "filter" if query.filter is not None else None


def _post_search(service, body: bytes, content_type: str | None, statuses: Counter) -> None:
    client, limits, _, _ = service
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post("/search", content=body, headers=headers)
    where = f"POST /search {body[:200]!r} ({content_type!r}) -> {r.status_code}: {r.text[:300]!r}"
    statuses[r.status_code] += 1
    assert r.status_code in SEARCH_STATUSES, where
    status, message = _expected(body, content_type, limits)
    error = None if r.status_code == 200 else _assert_error_body(r, where)["error"]
    if status == 200 and message == "filter":  # a filter the table may refuse (its own 400)
        assert r.status_code in (200, 400), where
    elif status == 200:
        assert r.status_code == 200 and "results" in r.json(), where
    else:
        assert (r.status_code, error) == (status, message), where


def _fuzz(strategy, n: int, send) -> None:
    @settings(RAW_SETTINGS, max_examples=n)
    @given(case=strategy)
    def run(case):
        send(case)

    run()


def test_search_bodies_raw(service, capsys):
    started = time.perf_counter()
    by_kind: dict[str, Counter] = {kind: Counter() for kind in (*EXAMPLES, "matrix")}

    def post(kind: str, content_type: str | None = "application/json"):
        return lambda body: _post_search(service, body, content_type, by_kind[kind])

    _fuzz(st.binary(max_size=300), EXAMPLES["bytes"], post("bytes"))
    _fuzz(jsonish_bodies(), EXAMPLES["jsonish"], post("jsonish"))
    _fuzz(
        st.tuples(st.sampled_from([b'{"text": "lamp", "k": 0}', b"\xff"]), CONTENT_TYPES),
        EXAMPLES["content_type"],
        lambda case: _post_search(service, case[0], case[1].strip(), by_kind["content_type"]),
    )
    _post_search(service, b'{"text": "lamp", "k": 0}', None, by_kind["content_type"])
    _fuzz(valid_text_bodies(), EXAMPLES["valid_text"], post("valid_text"))
    for body in MATRIX:
        post("matrix")(body)
    seconds = time.perf_counter() - started

    client, _, _, pids = service
    _assert_alive(client, pids)
    total: Counter = sum(by_kind.values(), Counter())
    _report(capsys, "POST /search", total, seconds)
    with capsys.disabled():
        print("  by kind: " + str({k: dict(sorted(c.items())) for k, c in by_kind.items()}))
    assert by_kind["valid_text"][200] >= EXAMPLES["valid_text"] // 2, by_kind
    assert by_kind["content_type"][415] > 0 and total[400] > total[200], by_kind
    assert sum(total.values()) >= 1500, total


# ------------------------------------------------------------------------------ the page, products
PATH_TEXT = st.one_of(
    st.text(max_size=60).map(lambda s: quote(s, safe="")),
    st.binary(max_size=60).map(lambda b: quote_from_bytes(b, safe="")),
    st.sampled_from(
        ["", ".", "..", "%25", "%zz", "%", "%00", "%2F", "a%2Fb", "%2E%2E", "'%20OR%20'1'='1"]
    ),
    st.sampled_from(["x" * 5000, "%ED%A0%80", "%C0%80", "%FF%FE", "a%2Fthumbnail", "%3F", "%23"]),
)


def test_page_query_strings_raw(service, capsys):
    """The page is static (its script reads ``q``): every query string gets it, nothing else."""
    client, _, _, pids = service
    statuses: Counter = Counter()

    def get(query: str) -> None:
        r = client.get(f"/?q={query}")
        statuses[r.status_code] += 1
        assert r.status_code == 200 and b"<html" in r.content[:200].lower(), (query, r.status_code)

    started = time.perf_counter()
    _fuzz(st.tuples(PATH_TEXT, PATH_TEXT).map("&q=".join), PAGE_EXAMPLES, get)
    seconds = time.perf_counter() - started
    _assert_alive(client, pids)
    _report(capsys, "GET /?q=", statuses, seconds)
    assert sum(statuses.values()) >= PAGE_EXAMPLES // 2, statuses


def test_product_ids_raw(service, capsys):
    """Any id is a 404 naming it, a real one its row; ids with a slash reach another route or
    none (a 404 as well), and a trailing slash is Starlette's redirect."""
    client, _, ids, pids = service
    statuses: Counter = Counter()

    def get(encoded: str) -> None:
        r = client.get(f"/products/{encoded}")
        statuses[r.status_code] += 1
        where = f"GET /products/{encoded[:200]} -> {r.status_code}: {r.text[:200]!r}"
        assert r.status_code in (200, 307, 404), where
        if r.status_code == 404:
            _assert_error_body(r, where)
        elif r.status_code == 200 and r.headers["content-type"] == "application/json":
            assert r.json()["product_id"] == unquote(encoded) in ids, where

    real = st.sampled_from(ids)
    cases = st.one_of(
        PATH_TEXT,
        real.map(lambda i: quote(i, safe="")),
        real.map(lambda i: quote(i.upper() + "'", safe="")),
        real.map(lambda i: quote(i, safe="") + "/thumbnail"),
    )
    started = time.perf_counter()
    _fuzz(cases, PRODUCT_EXAMPLES, get)
    seconds = time.perf_counter() - started
    _assert_alive(client, pids)
    _report(capsys, "GET /products/{id}", statuses, seconds)
    assert statuses[200] > 0 and statuses[404] > 0, statuses
