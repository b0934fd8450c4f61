"""``POST /search`` bodies → a checked :class:`SearchQuery`, or a :class:`BadRequest` saying why.

Everything a client sends is checked here, before any model or table work: the JSON itself (its
encoding, depth, numbers, keys and strings: ``pipelines.search.json_boundary``), its shape, then the
request model of ``pipelines.search.schema`` (unknown fields, types, ranges, text length; the same
model is the OpenAPI document's), then the image itself (``blip_ops``' safe decoder, which refuses
decompression bombs). The service turns a ``BadRequest`` into a 400 with its message.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import ValidationError

from pipelines.search.json_boundary import BadRequest, check_value, load_json
from pipelines.search.schema import HYBRID_MODES, Limits, client_message, request_model

__all__ = [
    "HYBRID_MODES",
    "BadRequest",
    "Limits",
    "SearchQuery",
    "decode_query_image",
    "parse_search",
]


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


_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


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


def _json_object(body: bytes | str | dict) -> dict:
    """The body as a dict; an already parsed one (the export job's query records) meets the same
    rules as the bytes a client sends."""
    if isinstance(body, dict):
        check_value(body)
    else:
        body = load_json(body)
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _hybrid(value: bool | str | None, limits: Limits) -> str:
    """The fusion mode: ``true`` is the configured mode, or rrf when the configured one is off."""
    if value is None:
        return limits.hybrid
    if isinstance(value, bool):
        return ("rrf" if limits.hybrid == "off" else limits.hybrid) if value else "off"
    return value


def parse_search(body: bytes | str | dict, limits: Limits) -> SearchQuery:
    """Parse and check a search request body."""
    body = _json_object(body)
    try:
        request = request_model(limits).model_validate(body)
    except ValidationError as err:
        raise BadRequest(client_message(err, body, limits)) from None
    # decoded last: a body refused for another reason costs no decoding
    image = decode_query_image(request.image, limits) if request.image is not None else None
    candidates = limits.candidates if request.candidates is None else request.candidates
    k = min(limits.k, candidates) if request.k is None else request.k
    rerank_k = min(limits.rerank_k, candidates) if request.rerank_k is None else request.rerank_k
    return SearchQuery(
        request.text,
        image,
        k,
        candidates,
        rerank_k,
        request.rerank,
        request.filter,
        _hybrid(request.hybrid, limits),
        limits.hybrid_rrf_k,
        limits.hybrid_weight,
        limits.itm_weight,
    )
