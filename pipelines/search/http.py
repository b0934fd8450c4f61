"""The search service's HTTP side: routes, the ASGI guard in front of them, errors as JSON.

:func:`build_http_app` builds the FastAPI app of one ingress replica (``/search``, ``/facets``,
``/products/{id}``, ``/products/{id}/thumbnail``, ``/healthz``, ``/metrics`` and the search page
at ``/``) behind :class:`Guard` (request id, API key, body size limit, access log and request
metrics). Every error answers ``{"error": …, "request_id": …}``: a client's mistake its 4xx, a
lost model replica a 503 with Retry-After, anything else a 500 that names the request id.

No Ray at import: the routes reach the model through the service's scorer, and Ray's exception
types are imported only to classify an error (:func:`_replica_lost`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Protocol

from fastapi import Request  # route signatures are resolved from module globals

from pipelines.search.json_boundary import MAX_DEPTH, MAX_NUMBER_DIGITS, MAX_TOKENS
from pipelines.search.metrics import access_log, log_json, route_of
from pipelines.search.request import BadRequest

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_THUMBNAIL = re.compile(r"^/products/[^/]+/thumbnail$")
PAGE = Path(__file__).parent / "static" / "index.html"
# FastAPI's defaults: the OpenAPI document, Swagger UI (and its OAuth2 redirect page), ReDoc
DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class SearchService(Protocol):
    """What the routes need of an ingress replica."""

    versions: object  # PinnedVersions: .snapshot (the served version), .describe_refusal()
    limits: object  # request.Limits
    metrics: object  # metrics.SearchMetrics
    api_key: str | None
    max_body_bytes: int

    def scorer(self, snap, request_id: str): ...  # the engine's scorer for one request


def _json_bytes(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, default=str).encode()


# ------------------------------------------------------------------------------ the guard
class BodyTooLarge(BadRequest):
    """A streamed body went past the limit; the routes' BadRequest handler answers 413."""

    def __init__(self, message: str):
        super().__init__(message, status=413)


def _relative_path(scope) -> str:
    """The request path below the application's route prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _public(scope) -> bool:
    """Routes that need no API key: health probes, the search page itself (static HTML; its
    searches send the key), product thumbnails (public catalog images an <img> tag loads) and the
    API's description with its pages (no data; their "Try it out" sends the key)."""
    path = _relative_path(scope)
    return path in ("/healthz", "/") or (
        scope.get("method") == "GET" and (path in DOC_PATHS or bool(_THUMBNAIL.match(path)))
    )


class Guard:
    """Pure ASGI middleware in front of every route: request id, API key, body size limit.

    Serve's proxy passes the client's ``X-Request-ID`` (or one it generates) and echoes it on the
    response; the guard makes it available to the routes (``scope["state"]["request_id"]``).

    The size check reads the Content-Length header (413 before any of the body is read) and also
    counts a streamed body, so a chunked upload cannot get past it either.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics=None):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def _reply(self, send, status: int, body: dict, extra=()) -> None:
        data = _json_bytes(body)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def recorded_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, recorded_send)
        finally:
            self._record(scope, status["code"], time.perf_counter() - started)

    def _record(self, scope, status: int, seconds: float) -> None:
        route = route_of(_relative_path(scope))
        if self.metrics is not None:
            self.metrics.observe_request(route, status, seconds)
        state = scope.get("state", {})
        log_json(
            access_log,
            "request",
            request_id=state.get("request_id"),
            method=scope.get("method"),
            route=route,
            status=status,
            ms=round(seconds * 1000, 3),
            **state.get("log", {}),
        )

    def _authorized(self, scope, headers: dict[str, str]) -> bool:
        if self.api_key is None or _public(scope):
            return True
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        if not self._authorized(scope, headers):
            body = {"error": "missing or invalid API key (send it as X-API-Key)", "request_id": rid}
            return await self._reply(send, 401, body, [(b"www-authenticate", b"ApiKey")])
        length = headers.get("content-length")
        too_large = {"error": f"request body over {self.max_body_bytes} bytes", "request_id": rid}
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._reply(send, 413, too_large)

        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(too_large["error"])
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:  # raised where no route handled it (routes answer it as a 413)
            if not started:
                await self._reply(send, 413, too_large)


# ------------------------------------------------------------------------------ errors
def _replica_lost(err: BaseException) -> bool:
    """A request failed because a model replica died or became unreachable (not the client's
    fault and not a bug: a retry reaches a live replica)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    lost = (
        ActorDiedError,
        ActorUnavailableError,
        RayActorError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )
    return isinstance(err, lost) or isinstance(getattr(err, "cause", None), lost)


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def _error(request: Request, status: int, message: str):
    from fastapi.responses import JSONResponse

    # a message may quote what the client sent: one that cannot be UTF-8 must still be answered
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message, "request_id": _rid(request)}, status_code=status)


def add_error_handlers(app) -> None:
    """Every error as ``{"error", "request_id"}`` with its status (see the module docstring)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, err: BadRequest):
        logger.info("request %s: %d %s", _rid(request), err.status, err)
        return _error(request, err.status, str(err))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return _error(request, err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return _error(request, 400, f"invalid request: {err.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        if _replica_lost(err):  # the model replica died under the request: Serve replaces it
            logger.warning("request %s: model replica unavailable (%s)", _rid(request), err)
            reply = _error(request, 503, "the model replica restarted; retry the request")
            reply.headers["Retry-After"] = "1"
            return reply
        logger.exception("request %s failed", _rid(request))
        return _error(
            request, 500, f"internal error ({type(err).__name__}); request id {_rid(request)}"
        )


# ------------------------------------------------------------------------------ the OpenAPI document
ERRORS = {
    400: f"bad request: JSON (UTF-8, nested at most {MAX_DEPTH} levels, at most {MAX_TOKENS} "
    f"strings, brackets and commas, numbers of at most {MAX_NUMBER_DIGITS} digits, no NaN or "
    "Infinity, no repeated keys, no lone surrogates), fields, ranges, base64, an undecodable "
    "image, a bad filter",
    401: "missing or invalid API key",
    404: "not in the served version",
    413: "request body over serve.max_body_bytes",
    415: "a Content-Type other than application/json, application/*+json (UTF-8) or none",
    500: "a server error; the message names the request id",
}
# Serve's proxy answers an overload before the application (its body is not an ErrorBody)
UNAVAILABLE = {
    "description": "overloaded (past max_ongoing + max_queued requests), or the model replica "
    "restarted under the request (an ErrorBody with Retry-After: retry)"
}


def _errors(service: SearchService, *statuses: int, public: bool = False) -> dict:
    """A route's error responses, each an ErrorBody (401 where the service's key is needed)."""
    from pipelines.search.schema import ErrorBody

    keyed = (401,) if service.api_key is not None and not public else ()
    return {s: {"model": ErrorBody, "description": ERRORS[s]} for s in sorted({*statuses, *keyed})}


def _key_schemes(service: SearchService) -> list:
    """The API key as the document's security schemes, so that /docs sends it; none when the
    service has no key. They only describe the key: the Guard checks it (these refuse nothing)."""
    if service.api_key is None:
        return []
    from fastapi import Security
    from fastapi.security import APIKeyHeader, HTTPBearer

    header = APIKeyHeader(
        name="X-API-Key", scheme_name="ApiKey", auto_error=False, description="the API key"
    )
    bearer = HTTPBearer(
        scheme_name="Bearer", auto_error=False, description="the API key as a bearer token"
    )
    return [Security(header), Security(bearer)]


def document_request_model(app, model) -> None:
    """FastAPI documents only the bodies it parses; ``/search`` parses its own (for its 400s), so
    its model joins the document's components here (the route's requestBody refers to it)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = generate().setdefault("components", {}).setdefault("schemas", {})
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi


def _request_body(model) -> dict:
    from pipelines.search.schema import REQUEST_EXAMPLES

    media = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    return {
        "required": True,
        "content": {"application/json": {**media, "examples": REQUEST_EXAMPLES}},
    }


# ------------------------------------------------------------------------------ routes
def add_search_route(app, service: SearchService) -> None:
    """``POST /search``: one query, answered wholly from the version served at its start."""
    from fastapi.responses import Response

    from pipelines.search.engine import search
    from pipelines.search.json_boundary import check_media_type
    from pipelines.search.request import parse_search
    from pipelines.search.schema import SearchResponse, request_model

    model = request_model(service.limits)
    document_request_model(app, model)

    @app.post(
        "/search",
        summary="Search the catalog",
        response_model=SearchResponse,
        response_description="the results, best first",
        responses={**_errors(service, 400, 413, 415, 500), 503: UNAVAILABLE},
        dependencies=_key_schemes(service),
        openapi_extra={"requestBody": _request_body(model)},
    )
    async def search_route(request: Request):
        """Stage 1 finds `candidates` by ITC cosine (fused with BM25 hits when hybrid), stage 2
        re-ranks the first `rerank_k` by ITM; the answer is wholly from one table version."""
        check_media_type(request.headers.get("content-type"))  # 415 before reading the body
        body = await request.body()  # parsed here, not by FastAPI: errors are 400s naming the field
        query = await asyncio.to_thread(parse_search, body, service.limits)
        snap = service.versions.snapshot  # pinned for this request: one version, start to end
        result = await search(query, snap, service.scorer(snap, _rid(request)))
        result["request_id"] = _rid(request)
        service.metrics.observe_stages(result["timings_ms"])
        # what the access log adds for a search (never the query itself)
        request.scope["state"]["log"] = {
            "table_version": snap.version,
            "timings_ms": result["timings_ms"],
            "results": len(result["results"]),
            "reranked": result["reranked"],
            "query_kind": "+".join(
                k for k, v in (("text", query.text), ("image", query.image)) if v is not None
            ),
        }
        return Response(_json_bytes(result), media_type="application/json")


def add_product_routes(app, service: SearchService) -> None:
    """``GET /products/{id}`` (the row, no vectors) and its thumbnail, from the served version."""
    from fastapi.responses import Response

    @app.get(
        "/products/{product_id}",
        responses=_errors(service, 404),
        dependencies=_key_schemes(service),
    )
    async def product(request: Request, product_id: str):
        snap = service.versions.snapshot
        row = await asyncio.to_thread(snap.product, product_id)
        if row is None:
            return _error(request, 404, f"no product {product_id!r} in version {snap.version}")
        row.update(table_version=snap.version, request_id=_rid(request))
        return Response(_json_bytes(row), media_type="application/json")

    jpeg = {200: {"description": "the product's thumbnail", "content": {"image/jpeg": {}}}}

    @app.get(
        "/products/{product_id}/thumbnail",
        response_class=Response,
        responses={**jpeg, **_errors(service, 404, public=True)},
    )
    async def thumbnail(request: Request, product_id: str):
        snap = service.versions.snapshot
        row = await asyncio.to_thread(snap.product, product_id, ["thumbnail"])
        if row is None or not row["thumbnail"]:
            return _error(request, 404, f"no thumbnail for product {product_id!r}")
        return Response(row["thumbnail"], media_type="image/jpeg")


def add_service_routes(app, service: SearchService) -> None:
    """``/healthz``, ``/facets``, ``/metrics`` and the search page at ``/``."""
    from fastapi.responses import Response

    page = PAGE.read_bytes()

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index_page():
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/facets", responses=_errors(service), dependencies=_key_schemes(service))
    async def facets(request: Request):
        """Filter choices for clients such as the search page (per served version)."""
        snap = service.versions.snapshot
        values = await asyncio.to_thread(snap.facets)
        return {"table_version": snap.version, "facets": values, "request_id": _rid(request)}

    @app.get("/healthz")
    async def healthz(request: Request):
        snap = service.versions.snapshot
        body = {"status": "ok", **snap.describe(), "request_id": _rid(request)}
        refused = service.versions.describe_refusal()
        if refused is not None:
            body["status"] = "refusing_published_version"
            body["refused"] = refused
        return body


def build_http_app(service: SearchService) -> Guard:
    """The replica's FastAPI app behind :class:`Guard`."""
    from fastapi import FastAPI

    app = FastAPI(title="blip-catalog-search", version="0.1.0")
    add_error_handlers(app)
    add_search_route(app, service)
    add_service_routes(app, service)
    add_product_routes(app, service)
    return Guard(
        app,
        api_key=service.api_key,
        max_body_bytes=service.max_body_bytes,
        metrics=service.metrics,
    )
