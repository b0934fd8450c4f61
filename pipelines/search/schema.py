"""The search API's bodies as pydantic models: the source of ``/openapi.json`` for ``POST /search``.

:func:`request_model` is the request body under one service's :class:`Limits` (its bounds are
``serve.*`` config, so each configuration has its own model; :data:`SearchRequest` is the default
one). The model checks everything but the image's content, which ``request.parse_search`` decodes
once the rest of the body is valid; :func:`client_message` words the model's refusals as the 400
messages clients get (pydantic's own messages never reach a client). :class:`SearchResponse` is
the 200 body and :class:`ErrorBody` the body of every error the service itself answers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

HybridMode = Literal["off", "rrf", "weighted"]
HYBRID_MODES = get_args(HybridMode)
COUNTS = ("candidates", "k", "rerank_k")
REFUSED = "search_request"  # the error type of the model's own rules (their msg is the 400's)


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


# ------------------------------------------------------------------------------ the request
def _refusal(message: str) -> PydanticCustomError:
    """A validation error whose message is the client's 400 (a ``{`` in it is no template)."""
    return PydanticCustomError(REFUSED, "{message}", {"message": message})


def _whole_number(value: Any) -> Any:
    """10.0 is an integer in JSON (and JSON Schema); some clients send it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def count_bounds(name: str, candidates: int, limits: Limits) -> tuple[int, int]:
    """The range of a count once ``candidates`` is known: ``k`` and ``rerank_k`` fit in it."""
    if name == "candidates":
        return 1, limits.max_candidates
    if name == "k":
        return 1, candidates
    return 0, min(candidates, limits.max_rerank_k)


def _string(**schema: Any) -> Any:
    """A JSON string or null, never coerced from another type; ``schema`` states its bounds for
    the document (the rules below check them: text and filter limits count the stripped string)."""
    return Annotated[StrictStr, WithJsonSchema({"type": "string", **schema})] | None


Count = Annotated[StrictInt | None, BeforeValidator(_whole_number)]
_TEXT_OR_IMAGE = [  # null counts as absent
    {"required": ["text"], "properties": {"text": {"type": "string"}}},
    {"required": ["image"], "properties": {"image": {"type": "string"}}},
]
REQUEST_EXAMPLES = {  # the request body's examples in the document ("Try it out" offers them)
    "text": {"summary": "a text query", "value": {"text": "red wooden chair", "k": 10}},
    "filtered": {
        "summary": "filtered, with hybrid recall",
        "value": {"text": "儿童滑行车", "filter": "price < 300", "hybrid": "rrf", "k": 5},
    },
}
_SCHEMA_EXTRA = {
    "anyOf": _TEXT_OR_IMAGE,
    "examples": [example["value"] for example in REQUEST_EXAMPLES.values()],
}


class _RequestRules(BaseModel):
    """The rules a JSON schema cannot state, shared by every :func:`request_model`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_SCHEMA_EXTRA)
    limits: ClassVar[Limits] = Limits()

    @field_validator("text", "filter", check_fields=False)
    @classmethod
    def _stripped(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        name, value = info.field_name, value.strip()
        if name == "text" and not value:
            raise _refusal("`text` is empty")
        limit = cls.limits.max_text_chars if name == "text" else cls.limits.max_filter_chars
        if len(value) > limit:
            raise _refusal(f"`{name}` has {len(value)} characters; the limit is {limit}")
        return value or None  # a blank filter is no filter

    @field_validator("image", check_fields=False)
    @classmethod
    def _text_or_image(cls, image: str | None, info: ValidationInfo) -> str | None:
        if image == "":
            raise _refusal("`image` is empty")
        # "text" is missing from info.data when it failed: that is the error to report
        if image is None and "text" in info.data and info.data["text"] is None:
            raise _refusal("give `text`, `image` (base64) or both")
        return image

    @field_validator("k", "rerank_k", check_fields=False)
    @classmethod
    def _within_candidates(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None or "candidates" not in info.data:  # a bad `candidates` is reported
            return value
        candidates = info.data["candidates"] or cls.limits.candidates
        low, high = count_bounds(info.field_name, candidates, cls.limits)
        if not low <= value <= high:
            raise _refusal(f"`{info.field_name}` must be between {low} and {high}, got {value}")
        return value


@functools.lru_cache(maxsize=8)
def request_model(limits: Limits) -> type[_RequestRules]:
    """The ``POST /search`` body under ``limits`` (one class per configuration). Fields are in
    the order they are checked: the first problem is the one a 400 names."""
    query_text = _string(maxLength=limits.max_text_chars, pattern=r"\S")
    base64 = _string(minLength=1, contentEncoding="base64")
    sql = _string(maxLength=limits.max_filter_chars)

    class SearchRequest(_RequestRules):
        """A search: a text, an image or both. Counts left out (or null) take the service's
        defaults; `k` and `rerank_k` may not exceed `candidates`."""

        text: query_text = Field(
            None,
            description="the query: a product title or words from one, in any language or "
            f"pinyin; at most {limits.max_text_chars} characters once stripped, not blank",
            examples=["red wooden chair"],
        )
        image: base64 = Field(
            None,
            description="a photo to search by example: JPEG/PNG/WebP/GIF bytes in base64 (or a "
            f"data: URL), at most {limits.max_image_bytes} bytes and "
            f"{limits.max_image_pixels} pixels",
            validate_default=True,  # its rule checks that the body has a text or an image
        )
        candidates: Count = Field(
            None,
            ge=1,
            le=limits.max_candidates,
            description=f"stage 1: nearest neighbours by ITC cosine (default {limits.candidates})",
        )
        k: Count = Field(
            None,
            ge=1,
            le=limits.max_candidates,
            description=f"results returned, at most `candidates` (default {limits.k}, or "
            "`candidates` when that is smaller)",
        )
        rerank_k: Count = Field(
            None,
            ge=0,
            le=limits.max_rerank_k,
            description="stage 2: the first candidates re-scored by ITM, at most `candidates` "
            f"(default {limits.rerank_k}, or `candidates` when that is smaller; 0: none)",
        )
        rerank: StrictBool = Field(True, description="the ITM re-rank of text queries")
        filter: sql = Field(
            None,
            description="an SQL expression over the metadata columns; at most "
            f"{limits.max_filter_chars} characters",
            examples=["category = 'sofa' AND price < 300"],
        )
        hybrid: StrictBool | HybridMode | None = Field(
            None,
            description="BM25 on the title fused with the vector candidates: a mode, true (the "
            f"configured mode, or rrf when that is off) or false (default {limits.hybrid!r})",
        )

    SearchRequest.limits = limits
    return SearchRequest


SearchRequest = request_model(Limits())
_HYBRID = f"true, false or one of {list(HYBRID_MODES)}"


def _shown(value: Any) -> str:
    """A received value as JSON, cut short."""
    return json.dumps(value, default=str)[:40]


def client_message(err: ValidationError, body: dict, limits: Limits) -> str:
    """The 400 message for a body the request model refused: its first problem, in the order
    the fields are checked, saying what was received."""
    fields = list(request_model(limits).model_fields)
    errors = err.errors(include_url=False)
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"unknown field(s) {unknown}; expected some of {fields}"
    first = min(errors, key=lambda e: fields.index(e["loc"][0]) if e["loc"] else len(fields))
    if first["type"] == REFUSED:
        return first["msg"]
    name, value = str(first["loc"][0]), first["input"]
    if name in COUNTS and first["type"] in ("greater_than_equal", "less_than_equal"):
        candidates = _whole_number(body.get("candidates")) or limits.candidates  # valid if given
        low, high = count_bounds(name, candidates, limits)
        return f"`{name}` must be between {low} and {high}, got {value}"
    if name in COUNTS:
        return f"`{name}` must be an integer, got {_shown(value)}"
    kind = {"image": "a base64 string", "rerank": "true or false", "hybrid": _HYBRID}.get(name)
    if name in ("text", "image", "filter"):
        return f"`{name}` must be {kind or 'a string'}, got {type(value).__name__}"
    return f"`{name}` must be {kind}, got {_shown(value)}"


# ------------------------------------------------------------------------------ the responses
class SearchResult(BaseModel):
    """One product, best first."""

    product_id: str = Field(description="the product's id (`GET /products/{product_id}`)")
    title: str = Field(description="the product's title in the served version")
    score: float = Field(
        description="the ranking score: ITC cosine + itm_weight × ITM logit for re-ranked "
        "results, the ITC cosine for the rest (which follow in candidate order)"
    )
    itc_score: float = Field(description="cosine of the query and product embeddings (ITC)")
    itm_score: float | None = Field(
        description="the ITM (image-text matching) logit; null where the product was not re-ranked"
    )
    lexical_score: float | None = Field(
        description="BM25 score of the title when hybrid recall found it; null otherwise"
    )
    metadata: dict[str, Any] = Field(
        description="the served table's metadata columns (category, brand, price, …)",
        examples=[{"category": "furniture", "brand": "Kido", "price": 129.0}],
    )


class StageTimings(BaseModel):
    """Milliseconds per stage of this request."""

    encode: float = Field(description="query encoding (text and/or image)")
    ann: float = Field(description="stage 1: the nearest-neighbour candidates")
    lexical: float | None = Field(
        None, description="BM25 recall and fusion; present only when hybrid recall ran"
    )
    rerank: float = Field(description="stage 2: the ITM re-rank")
    total: float = Field(description="the whole search")


class SearchResponse(BaseModel):
    """The results of one search, all from one served table version."""

    results: list[SearchResult] = Field(description="at most `k` products, best first")
    reranked: int = Field(ge=0, description="candidates re-scored by ITM (0: none)")
    hybrid: HybridMode = Field(description="the fusion that ran (off for image-only queries)")
    candidates: int = Field(ge=0, description="candidates found in stage 1 (after fusion)")
    timings_ms: StageTimings = Field(description="milliseconds per stage")
    table_version: int = Field(description="the products table version that answered")
    products_table: str = Field(description="the products table that answered")
    model_id: str = Field(description="the model that encoded the query and the table")
    request_id: str = Field(description="the request's id (its X-Request-ID header)")


class ErrorBody(BaseModel):
    """Every error the service answers itself (4xx, 500, and 503 when a model replica died)."""

    error: str = Field(description="what was wrong, naming the field and what was received")
    request_id: str = Field(description="the request's id, also in the X-Request-ID header")
