"""``POST /search`` bodies → a checked :class:`SearchQuery`, or a :class:`BadRequest` saying why.

Everything a client sends is checked here, before any model or table work: JSON shape, unknown
fields, types, ranges, text length, base64, and the image itself (``blip_ops``' safe decoder, which
refuses decompression bombs). The service turns a ``BadRequest`` into a 400 with its message.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image


class BadRequest(ValueError):
    """A client error; ``str(err)`` is the message the client gets (status 400 unless set)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Defaults and bounds for search requests (``serve.*`` config keys)."""

    k: int = 10
    candidates: int = 100
    rerank_k: int = 32
    max_candidates: int = 1000
    max_rerank_k: int = 256
    max_text_chars: int = 512
    max_image_bytes: int = 5_000_000
    max_image_pixels: int = 40_000_000
    max_filter_chars: int = 1000
    hybrid: str = "off"  # default fusion mode (serve.hybrid)
    hybrid_rrf_k: float = 60.0
    hybrid_weight: float = 0.5
    itm_weight: float = 1.0  # re-rank: cosine + itm_weight * ITM logit (serve.itm_weight)

    @classmethod
    def from_config(cls, serve) -> Limits:
        return cls(
            k=serve.k,
            candidates=serve.candidates,
            rerank_k=serve.rerank_k,
            max_candidates=serve.max_candidates,
            max_rerank_k=serve.max_rerank_k,
            max_text_chars=serve.max_text_chars,
            max_image_bytes=serve.max_image_bytes,
            max_image_pixels=serve.max_image_pixels,
            hybrid=serve.hybrid,
            hybrid_rrf_k=serve.hybrid_rrf_k,
            hybrid_weight=serve.hybrid_weight,
            itm_weight=serve.itm_weight,
        )


@dataclass(frozen=True)
class SearchQuery:
    text: str | None
    image: Image.Image | None  # decoded RGB
    k: int
    candidates: int
    rerank_k: int
    rerank: bool
    filter: str | None
    hybrid: str = "off"  # "off" | "rrf" | "weighted": BM25 fused with the vector candidates
    rrf_k: float = 60.0
    hybrid_weight: float = 0.5
    itm_weight: float = 1.0


FIELDS = ("text", "image", "k", "candidates", "rerank_k", "rerank", "filter", "hybrid")
HYBRID_MODES = ("off", "rrf", "weighted")
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _int(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        value = default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 10.0 is an integer in JSON (and JSON Schema); some clients send it
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"`{name}` must be an integer, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise BadRequest(f"`{name}` must be between {low} and {high}, got {value}")
    return value


def _text(body: dict, limits: Limits) -> str | None:
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, str):
        raise BadRequest(f"`text` must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise BadRequest("`text` is empty")
    if len(text) > limits.max_text_chars:
        raise BadRequest(f"`text` has {len(text)} characters; the limit is {limits.max_text_chars}")
    return text


def decode_query_image(data: Any, limits: Limits) -> Image.Image:
    """A base64 string (optionally a ``data:image/…;base64,`` URL) → RGB image, or BadRequest."""
    from blip_ops.decode import ImageDecodeError, decode_image

    if not isinstance(data, str):
        raise BadRequest(f"`image` must be a base64 string, got {type(data).__name__}")
    data = _DATA_URL.sub("", data, count=1)
    # 4 base64 characters carry 3 bytes: refuse oversized images before decoding anything.
    if len(data) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
        raise BadRequest(
            f"`image` is about {len(data) * 3 // 4} bytes; the limit is {limits.max_image_bytes}"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"`image` is not valid base64: {err}") from None
    if not raw:
        raise BadRequest("`image` is empty")
    try:
        return decode_image(
            raw, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes
        )
    except ImageDecodeError as err:
        detail = _OBJECT_REPR.sub("the image", str(err))  # PIL names its in-memory file object
        raise BadRequest(f"`image` could not be decoded ({err.reason}): {detail}") from None


_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "request_id": {"type": "string"}},
    "required": ["error"],
}


def search_openapi(limits: Limits) -> dict:
    """The OpenAPI of ``POST /search`` that :func:`parse_search` enforces (the route reads the raw
    body itself, so FastAPI cannot infer it): the request body's JSON schema and the error
    responses. For the service's ``/openapi.json`` and ``/docs``, and the HTTP fuzz test.
    Cross-field rules (``k`` and ``rerank_k`` at most ``candidates``, a non-blank ``text``) are
    in the descriptions: requests that break them get a 400."""
    text = "the query: a product title in any language, or pinyin"
    body = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "text": {
                "type": ["string", "null"],
                "maxLength": limits.max_text_chars,
                "pattern": r"\S",  # not blank
                "description": text,
            },
            "image": {
                "type": ["string", "null"],
                "minLength": 1,
                "contentEncoding": "base64",
                "description": f"JPEG/PNG/WebP/GIF bytes in base64 (or a data: URL), at most "
                f"{limits.max_image_bytes} bytes and {limits.max_image_pixels} pixels",
            },
            "k": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": limits.max_candidates,
                "description": f"results returned, at most `candidates` (default {limits.k})",
            },
            "candidates": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": limits.max_candidates,
                "description": f"ANN candidates, stage 1 (default {limits.candidates})",
            },
            "rerank_k": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": limits.max_rerank_k,
                "description": "candidates re-scored by ITM, at most `candidates` "
                f"(default {limits.rerank_k})",
            },
            "rerank": {"type": "boolean", "description": "ITM re-rank (default true)"},
            "filter": {
                "type": ["string", "null"],
                "maxLength": limits.max_filter_chars,
                "description": "SQL expression over the metadata columns, e.g. category = 'sofa'",
            },
            "hybrid": {
                "anyOf": [{"type": ["boolean", "null"]}, {"enum": list(HYBRID_MODES)}],
                "description": f"BM25 fused with the vector candidates (default {limits.hybrid!r})",
            },
        },
        "anyOf": [  # a text, an image or both (null counts as absent)
            {"required": ["text"], "properties": {"text": {"type": "string"}}},
            {"required": ["image"], "properties": {"image": {"type": "string"}}},
        ],
    }
    errors = {
        "400": "bad request: JSON, fields, ranges, base64, an undecodable image, a bad filter",
        "401": "missing or invalid API key (when the service has one)",
        "413": "request body over serve.max_body_bytes",
    }
    responses: dict = {
        status: {"description": why, "content": {"application/json": {"schema": _ERROR}}}
        for status, why in errors.items()
    }
    # Answered by Serve's proxy, before the application (its body is not ours)
    responses["503"] = {"description": "overloaded: past max_ongoing + max_queued requests"}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": responses,
    }


def parse_search(body: bytes | str | dict, limits: Limits) -> SearchQuery:
    """Parse and check a search request body."""
    if not isinstance(body, dict):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; expected some of {list(FIELDS)}")
    text = _text(body, limits)
    image = decode_query_image(body["image"], limits) if body.get("image") is not None else None
    if text is None and image is None:
        raise BadRequest("give `text`, `image` (base64) or both")
    candidates = _int(body, "candidates", limits.candidates, 1, limits.max_candidates)
    k = _int(body, "k", min(limits.k, candidates), 1, candidates)
    rerank_k = _int(
        body, "rerank_k", min(limits.rerank_k, candidates), 0, min(candidates, limits.max_rerank_k)
    )
    rerank = body.get("rerank", True)
    if not isinstance(rerank, bool):
        raise BadRequest(f"`rerank` must be true or false, got {json.dumps(rerank)[:40]}")
    flt = body.get("filter")
    if flt is not None:
        if not isinstance(flt, str):
            raise BadRequest(f"`filter` must be a string, got {type(flt).__name__}")
        flt = flt.strip() or None
        if flt is not None and len(flt) > limits.max_filter_chars:
            raise BadRequest(
                f"`filter` has {len(flt)} characters; the limit is {limits.max_filter_chars}"
            )
    hybrid = body.get("hybrid")
    if hybrid is None:
        hybrid = limits.hybrid
    elif isinstance(hybrid, bool):
        hybrid = ("rrf" if limits.hybrid == "off" else limits.hybrid) if hybrid else "off"
    elif hybrid not in HYBRID_MODES:
        raise BadRequest(
            f"`hybrid` must be true, false or one of {list(HYBRID_MODES)}, got {json.dumps(hybrid)[:40]}"
        )
    return SearchQuery(
        text,
        image,
        k,
        candidates,
        rerank_k,
        rerank,
        flt,
        hybrid,
        limits.hybrid_rrf_k,
        limits.hybrid_weight,
        limits.itm_weight,
    )
