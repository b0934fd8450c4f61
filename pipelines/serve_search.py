"""The search service: Ray Serve, FastAPI ingress (ANN recall) + model deployment (encode, ITM).

    serve run pipelines.serve_search:app_builder config=configs/local.yaml [key=value ...]
    serve deploy configs/serve_local.yaml        # or: serve run configs/serve_local.yaml
    python -m pipelines.serve_search --config configs/local.yaml [--index-uri …] [--model …] [--host …] [--port …]

Two deployments composed with ``.bind()``: ``SearchIngress`` (CPU) parses and checks requests,
runs stage 1 (ANN on its pinned table version) and builds responses; ``QueryModel`` (GPU when
``serve.model.num_gpus`` > 0) encodes queries and ITM-scores candidates, batching concurrent
requests with ``@serve.batch``. The logic lives in ``pipelines/search/``; nothing heavy happens at
import: models and tables load in the replicas.

Index versions: each ingress replica serves one pinned version of the published products table
and checks every ``serve.refresh_seconds`` for a newer one; it opens the new version beside the old
and swaps the reference, so a request is answered wholly from one version and none is dropped. A
published version whose model_id differs from the model deployment's is refused (logged as an
error, reported by ``/healthz``; at startup the replica fails to start).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/serve_search.py` as well as -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import Request  # route signatures are resolved from module globals
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from pipelines.config import AppConfig, add_config_arguments, cli_config, load_config
from pipelines.search.metrics import (
    SearchMetrics,
    access_log,
    log_json,
    route_of,
    setup_json_logging,
)
from pipelines.search.request import BadRequest

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "search"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# ------------------------------------------------------------------------------ model deployment
@serve.deployment
class QueryModel:
    """Query encoders + ITM re-rankers: the configured checkpoint, and the one each published
    version names (:mod:`pipelines.search.models`); image tokens cached per model and replica."""

    def __init__(self, config: dict):
        from blip_ops import load_model
        from pipelines.search.models import QueryModels

        setup_json_logging()
        cfg = AppConfig.model_validate(config)

        def load(path: str):
            return load_model(
                path, device=cfg.model.device, dtype=cfg.model.dtype, attention=cfg.model.attention
            )

        self.models = QueryModels(
            load,
            cfg.model.name_or_path,
            max_models=cfg.serve.max_models,
            cache_items=cfg.serve.token_cache_items,
            decode_threads=cfg.serve.decode_threads,
        )
        self.batching = cfg.serve.batching
        self.batch_wait_s = cfg.serve.batch_wait_timeout_s
        self.adaptive_wait = cfg.serve.adaptive_batch_wait
        self.in_flight = 0  # model calls this replica is answering (the event loop's thread only)
        for method in (self._text_batch, self._image_batch, self._itm_batch):
            method.set_max_batch_size(cfg.serve.max_batch_size)
            method.set_batch_wait_timeout_s(self.batch_wait_s)
        default = self.models.get()
        logger.info("query model %s ready on %s", default.model_id, default.model.device)

    def _seen(self, kind: str, request_ids: list[str], started: float, **extra) -> dict:
        """Stats for one model call: batch size (+ cache counts), logged with the request ids."""
        n = len(request_ids)
        ms = round((time.perf_counter() - started) * 1000, 3)
        log_json(logger, "model_call", kind=kind, batch=n, ms=ms, request_ids=request_ids, **extra)
        return {"batch": n, "ms": ms, **extra}

    def info(self, model=None) -> dict:
        """The model ``model`` (a ``ModelRef``; None: the configured one), loaded if needed."""
        scorer = self.models.get(model)
        cache = scorer.cache
        return {
            "model_id": scorer.model_id,
            "text_settings": scorer.model.text_settings.to_dict(),
            "batching": self.batching,
            "loaded": self.models.loaded,
            "cache_items": len(cache),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
        }

    async def load(self, model) -> dict:
        """Load ``model`` (``(model_id, checkpoint path)``) off the event loop; its :meth:`info`."""
        return await asyncio.to_thread(self.info, model)

    # Each call returns {"value": …, "batch": n, "ms": …} so the ingress can record batch sizes
    # (and, for ITM, image-token cache hits) in its metrics. `model` names the published
    # version's model (None: the configured one).
    async def encode_text(self, text: str, request_id: str = "", model=None) -> dict:
        if self.batching:
            return await self._batched(self._text_batch, text, request_id, model)
        return self._texts([text], [request_id], [model])[0]

    async def encode_image(self, image, request_id: str = "", model=None) -> dict:
        if self.batching:
            return await self._batched(self._image_batch, image, request_id, model)
        return self._images([image], [request_id], [model])[0]

    async def itm(self, job, request_id: str = "", model=None) -> dict:
        if self.batching:
            return await self._batched(self._itm_batch, job, request_id, model)
        return self._itms([job], [request_id], [model])[0]

    async def _batched(self, method, item, request_id: str, model) -> dict:
        """Queue ``item`` for ``method``'s next batch. With ``serve.adaptive_batch_wait`` a batch
        waits ``batch_wait_timeout_s`` to fill only while other calls are in flight here: a lone
        request would wait for nobody (5 ms on each of a query's two calls), while under load the
        wait lets the requests that arrived during the last batch join the next one."""
        self.in_flight += 1
        try:
            if self.adaptive_wait:
                method.set_batch_wait_timeout_s(self.batch_wait_s if self.in_flight > 1 else 0.0)
            return await method(item, request_id, model)
        finally:
            self.in_flight -= 1

    @serve.batch
    async def _text_batch(self, texts: list[str], request_ids: list[str], models: list):
        return self._texts(texts, request_ids, models)

    @serve.batch
    async def _image_batch(self, images: list, request_ids: list[str], models: list):
        return self._images(images, request_ids, models)

    @serve.batch
    async def _itm_batch(self, jobs: list, request_ids: list[str], models: list):
        return self._itms(jobs, request_ids, models)

    def _by_model(self, items: list, models: list, run) -> list:
        """``run(scorer, items)`` once per model among the batch's requests (one model but during
        a switch), results in the requests' order."""
        groups: dict = {}
        for i, model in enumerate(models):
            groups.setdefault(None if model is None else tuple(model), []).append(i)
        out: list = [None] * len(items)
        for model, idx in groups.items():
            values = run(self.models.get(model), [items[i] for i in idx])
            for i, v in zip(idx, values, strict=True):
                out[i] = v
        return out

    def _texts(self, texts: list[str], request_ids: list[str], models: list) -> list[dict]:
        t = time.perf_counter()
        values = self._by_model(texts, models, lambda s, xs: list(s.encode_texts(xs)))
        stats = self._seen("text", request_ids, t)
        return [{"value": v, **stats} for v in values]

    def _images(self, images: list, request_ids: list[str], models: list) -> list[dict]:
        t = time.perf_counter()
        values = self._by_model(images, models, lambda s, xs: list(s.encode_images(xs)))
        stats = self._seen("image", request_ids, t)
        return [{"value": v, **stats} for v in values]

    def _itms(self, jobs: list, request_ids: list[str], models: list) -> list[dict]:
        t = time.perf_counter()
        counts = {"hits": 0, "misses": 0}

        def run(scorer, batch):
            hits, misses = scorer.cache.hits, scorer.cache.misses
            values = scorer.itm(batch)
            counts["hits"] += scorer.cache.hits - hits
            counts["misses"] += scorer.cache.misses - misses
            return values

        values = self._by_model(jobs, models, run)
        stats = self._seen("itm", request_ids, t, **counts)
        # the batch's cache counts go with its first request only, so they are never summed twice
        rest = {k: v for k, v in stats.items() if k not in ("hits", "misses")}
        return [{"value": v, **(stats if i == 0 else rest)} for i, v in enumerate(values)]


class HandleScorer:
    """The engine's scorer interface over the model deployment's handle, for one request: it
    passes the request id along (the model replica logs it) and records batch sizes and cache
    counts in the ingress's metrics."""

    def __init__(
        self,
        handle: DeploymentHandle,
        text_settings,
        metrics=None,
        request_id: str = "",
        model=None,
    ):
        self.handle = handle
        self.text_settings = text_settings
        self.metrics = metrics
        self.request_id = request_id
        self.model = model  # the pinned version's ModelRef (None: the configured model)

    def normalize_text(self, text: str) -> str:
        from blip_ops.text import normalize_text

        return normalize_text(text, self.text_settings)

    async def _call(self, kind: str, method, arg):
        out = await method.remote(arg, self.request_id, self.model)
        if self.metrics is not None:
            self.metrics.observe_model_call(kind, out)
        return out["value"]

    async def encode_text(self, text):
        return await self._call("text", self.handle.encode_text, text)

    async def encode_image(self, image):
        return await self._call("image", self.handle.encode_image, image)

    async def itm(self, job):
        return await self._call("itm", self.handle.itm, job)


# ------------------------------------------------------------------------------ HTTP guard
def _json_bytes(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, default=str).encode()


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

    async def _reply(self, send, status: int, body: dict, rid: str, extra=()) -> None:
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

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        if self.api_key is not None and not _public(scope):
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix(
                "Bearer "
            )
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await self._reply(
                    send,
                    401,
                    {
                        "error": "missing or invalid API key (send it as X-API-Key)",
                        "request_id": rid,
                    },
                    rid,
                    [(b"www-authenticate", b"ApiKey")],
                )
        length = headers.get("content-length")
        too_large = {
            "error": f"request body over {self.max_body_bytes} bytes",
            "request_id": rid,
        }
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._reply(send, 413, too_large, rid)

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
                await self._reply(send, 413, too_large, rid)


_THUMBNAIL = re.compile(r"^/products/[^/]+/thumbnail$")


def _public(scope) -> bool:
    """Routes that need no API key: health probes, the search page itself (static HTML; its
    searches send the key) and product thumbnails (public catalog images an <img> tag loads)."""
    path = _relative_path(scope)
    return path in ("/healthz", "/") or (
        scope.get("method") == "GET" and bool(_THUMBNAIL.match(path))
    )


def _relative_path(scope) -> str:
    """The request path below the application's route prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class BodyTooLarge(BadRequest):
    """A streamed body went past the limit; the routes' BadRequest handler answers 413."""

    def __init__(self, message: str):
        super().__init__(message, status=413)


# ------------------------------------------------------------------------------ ingress
@serve.deployment
@serve.ingress()
class SearchIngress:
    """HTTP API: /search, /products/{id}, /products/{id}/thumbnail, /healthz."""

    def __init__(self, config: dict, model: DeploymentHandle):
        from pipelines.search.request import Limits
        from pipelines.storage import S3Settings

        self.cfg = AppConfig.model_validate(config)
        from blip_ops.text import TextSettings

        setup_json_logging()
        self.model = model
        self.text_settings = TextSettings()  # replaced by the model's own at replica start
        self.metrics = SearchMetrics()
        self.limits = Limits.from_config(self.cfg.serve)
        self.s3 = S3Settings.from_config(self.cfg.s3)
        self.api_key = os.environ.get(self.cfg.serve.api_key_env) or None
        self.snapshot = None
        self.retired: list = []  # replaced snapshots, kept while requests may still use them
        self.refused: dict | None = None  # a published version refused for its model_id
        self.model_id: str | None = None
        self._lock = threading.Lock()

    # ---- index versions ---------------------------------------------------------------------
    def _open(self, pointer: dict | None = None):
        from pipelines.search.snapshot import ann_settings, open_snapshot

        return open_snapshot(
            self.cfg.index.uri,
            self.s3,
            cache_dir=self.cfg.serve.cache_dir,
            pointer=pointer,
            ann=ann_settings(self.cfg.index),
        )

    def _mismatch_message(
        self, pointer_model: str, products_table: str, version: int, why: str = ""
    ) -> str:
        why = why or (
            f"this service loaded {self.model_id} ({self.cfg.model.name_or_path}) and "
            f"serve.follow_model is off"
        )
        return (
            f"REFUSED: published table {products_table} version {version} was encoded by model "
            f"{pointer_model}, but {why}; deploy the matching checkpoint or move the published "
            f"tag back"
        )

    def _query_model(self, pointer: dict):
        """``(ModelRef or None, TextSettings)`` of the model that encoded ``pointer``'s version:
        the configured one, or (``serve.follow_model``) the checkpoint its run recorded, loaded in
        the model deployment before the switch. Raises ModelMismatchError when it cannot be had."""
        from blip_ops.text import TextSettings
        from pipelines.search.models import ModelMismatchError, ModelRef

        if pointer["model_id"] == self.model_id:
            return None, self.text_settings
        if not self.cfg.serve.follow_model:
            raise ModelMismatchError("")
        ref = ModelRef(pointer["model_id"], pointer.get("model_path"))
        # A blocking wait in the refresh thread, never on the event loop.
        info = self.model.load.remote(tuple(ref)).result(timeout_s=600)
        return ref, TextSettings.from_dict(info["text_settings"])

    def refresh(self) -> bool:
        """Swap in a newly published version (and its model); True when the served version changed."""
        from pipelines.search.models import ModelMismatchError
        from pipelines.search.snapshot import published_pointer

        with self._lock:
            pointer = published_pointer(self.cfg.index.uri, self.s3)
            if pointer is None:
                return False
            key = (pointer["products_table"], int(pointer["products_version"]))
            if self.snapshot is not None and key == self.snapshot.key:
                self.refused = None
                return False
            try:
                model_ref, text_settings = self._query_model(pointer)
            except Exception as err:  # noqa: BLE001 - refuse the version, keep serving the pinned one
                cause = getattr(err, "cause", None) or err  # a RayTaskError wraps the replica's
                why = (
                    str(cause)
                    if isinstance(cause, ModelMismatchError)
                    else f"its model could not be loaded ({type(cause).__name__}: {cause})"
                )
                if self.refused is None or any(
                    self.refused.get(k) != v for k, v in pointer.items()
                ):
                    logger.error(self._mismatch_message(pointer["model_id"], *key, why))
                self.refused = {**pointer, "why": why}
                return False
            new = self._open(pointer)
            new.model_ref, new.text_settings = model_ref, text_settings
            old, self.snapshot, self.refused = self.snapshot, new, None
            self.metrics.set_version(new.version, new.rows)
            if old is not None:
                self.retired.append(old)
                while len(self.retired) > 2:  # two refresh periods: no request lives that long
                    self.retired.pop(0).close()
            logger.info(
                "now serving %s version %d (model %s)",
                new.products_table,
                new.version,
                new.model_id,
            )
            return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serve.refresh_seconds)
            try:
                await asyncio.to_thread(self.refresh)
            except RuntimeError as err:
                if "shutdown" in str(err):  # the replica is stopping
                    return
                logger.exception("looking for a newly published version failed")
            except Exception:  # noqa: BLE001 - keep serving the pinned version; retry next period
                logger.exception("looking for a newly published version failed")

    def check_health(self) -> None:
        if self.snapshot is None:
            raise RuntimeError("no index version loaded")

    # ---- the ASGI app, built in the replica after the constructor ---------------------------
    async def __serve_build_asgi_app__(self):
        from blip_ops.text import TextSettings

        info = await self.model.info.remote()
        self.model_id = info["model_id"]
        self.text_settings = TextSettings.from_dict(info["text_settings"])
        await asyncio.to_thread(self.refresh)
        if self.snapshot is None:
            if self.refused is not None:
                from pipelines.search.models import ModelMismatchError

                p = self.refused
                raise ModelMismatchError(
                    self._mismatch_message(
                        p["model_id"], p["products_table"], int(p["products_version"]), p["why"]
                    )
                )
            from pipelines.search.snapshot import NoPublishedIndex

            raise NoPublishedIndex(
                f"no published index at {self.cfg.index.uri}: run the index job first"
            )
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return build_http_app(self)


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


def build_http_app(self: SearchIngress):
    """The ingress's FastAPI app behind :class:`Guard`. Module-level on purpose: Serve pickles the
    ingress class by value, and routes defined here resolve their annotations in this module."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    from pipelines.search.engine import search
    from pipelines.search.request import BadRequest, parse_search, search_openapi

    app = FastAPI(title="blip-catalog-search", version="0.1.0")

    def rid(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id", "")

    def error(request: Request, status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message, "request_id": rid(request)}, status_code=status)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, err: BadRequest):
        logger.info("request %s: %d %s", rid(request), err.status, err)
        return error(request, err.status, str(err))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return error(request, err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return error(request, 400, f"invalid request: {err.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        if _replica_lost(err):  # the model replica died under the request: Serve replaces it
            logger.warning("request %s: model replica unavailable (%s)", rid(request), err)
            reply = error(request, 503, "the model replica restarted; retry the request")
            reply.headers["Retry-After"] = "1"
            return reply
        logger.exception("request %s failed", rid(request))
        return error(
            request, 500, f"internal error ({type(err).__name__}); request id {rid(request)}"
        )

    @app.post("/search", openapi_extra=search_openapi(self.limits))
    async def search_route(request: Request):
        body = await request.body()
        query = await asyncio.to_thread(parse_search, body, self.limits)
        snap = self.snapshot  # pinned for this request: one version, start to end
        scorer = HandleScorer(
            self.model, snap.text_settings, self.metrics, rid(request), snap.model_ref
        )
        result = await search(query, snap, scorer)
        result["request_id"] = rid(request)
        self.metrics.observe_stages(result["timings_ms"])
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

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    page = (Path(__file__).parent / "search" / "static" / "index.html").read_bytes()

    @app.get("/", include_in_schema=False)
    async def index_page():
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/facets")
    async def facets(request: Request):
        """Filter choices for clients such as the search page (per served version)."""
        snap = self.snapshot
        values = await asyncio.to_thread(snap.facets)
        return {"table_version": snap.version, "facets": values, "request_id": rid(request)}

    @app.get("/healthz")
    async def healthz(request: Request):
        snap = self.snapshot
        body = {"status": "ok", **snap.describe(), "request_id": rid(request)}
        if self.refused is not None:
            body["status"] = "refusing_published_version"
            body["refused"] = {
                "products_table": self.refused["products_table"],
                "table_version": int(self.refused["products_version"]),
                "model_id": self.refused["model_id"],
                "why": self.refused["why"],
            }
        return body

    @app.get("/products/{product_id}")
    async def product(request: Request, product_id: str):
        snap = self.snapshot
        row = await asyncio.to_thread(snap.product, product_id)
        if row is None:
            return error(request, 404, f"no product {product_id!r} in version {snap.version}")
        row.update(table_version=snap.version, request_id=rid(request))
        return Response(_json_bytes(row), media_type="application/json")

    @app.get("/products/{product_id}/thumbnail")
    async def thumbnail(request: Request, product_id: str):
        snap = self.snapshot
        row = await asyncio.to_thread(snap.product, product_id, ["thumbnail"])
        if row is None or not row["thumbnail"]:
            return error(request, 404, f"no thumbnail for product {product_id!r}")
        return Response(row["thumbnail"], media_type="image/jpeg")

    return Guard(
        app,
        api_key=self.api_key,
        max_body_bytes=self.cfg.serve.max_body_bytes,
        metrics=self.metrics,
    )


# ------------------------------------------------------------------------------ application
def _options(d) -> dict:
    return {
        "num_replicas": d.num_replicas,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "max_constructor_retry_count": d.max_constructor_retry_count,
    }


def build_app(cfg: AppConfig) -> Application:
    """The Serve application for ``cfg``: ingress bound to the model deployment."""
    config = cfg.model_dump(mode="python")
    model = QueryModel.options(**_options(cfg.serve.model)).bind(config)
    return SearchIngress.options(**_options(cfg.serve.ingress)).bind(config, model)


class ServeArgs(BaseModel):
    """Arguments of ``serve run pipelines.serve_search:app_builder config=FILE [key=value ...]``:
    ``config`` names the YAML file; every other key is a config override (``serve.rerank_k=16``)."""

    model_config = ConfigDict(extra="allow")
    config: str | None = None


def _config_path(path: str | None) -> str | None:
    """A relative path is looked up from the working directory, then from the repository root
    (a Serve config deployed to a cluster runs the builder in another working directory)."""
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.exists() else path


def app_builder(args: ServeArgs) -> Application:
    if not isinstance(args, ServeArgs):  # a plain dict from an older Serve or a direct call
        args = ServeArgs.model_validate(args)
    extra = args.model_extra or {}
    overrides = [f"{k}={v}" for k, v in extra.items()]
    return build_app(load_config(_config_path(args.config), overrides))


# Serve validates builder arguments against the annotation only when it is a class, not the
# string that `from __future__ import annotations` leaves.
app_builder.__annotations__["args"] = ServeArgs


# ------------------------------------------------------------------------------ CLI
def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(cfg: AppConfig, *, blocking_ready: bool = True) -> str:
    """Start Serve on ``serve.host:serve.port`` in the connected Ray and deploy the app;
    returns the base URL."""
    host = cfg.serve.host
    port = cfg.serve.port or _free_port(host)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def deployment_errors(app_name: str = APP_NAME) -> str:
    """Why an application's deployments failed (the replicas' last error lines), for messages."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception as err:  # noqa: BLE001 - only used to explain another failure
        return f"(no status: {err})"
    if app is None:
        return ""
    lines = []
    for name, dep in app.deployments.items():
        if dep.message:
            last = [ln for ln in dep.message.strip().splitlines() if ln.strip()]
            lines.append(f"{name}: {last[-1] if last else dep.message}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.serve_search", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("index_uri", "model", "host", "port"))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    from pipelines.runtime.cluster import init_ray
    from pipelines.search.snapshot import published_pointer
    from pipelines.storage import S3Settings

    try:
        pointer = published_pointer(cfg.index.uri, S3Settings.from_config(cfg.s3))
    except (OSError, ValueError) as err:
        pointer, reason = None, f"{type(err).__name__}: {err}"
    else:
        reason = "no published run"
    if pointer is None:
        print(
            f"error: nothing to serve at {cfg.index.uri} ({reason}): run "
            f"`python -m pipelines.index_catalog --config …` first",
            file=sys.stderr,
        )
        return 2
    init_ray(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Deploy the classes of the importable module, not of __main__ (`python -m` runs this file
    # as __main__, whose classes would be pickled by value without their module's globals).
    from pipelines import serve_search

    try:
        url = serve_search.start(cfg)
    except RuntimeError as err:
        print(
            f"error: the search service did not start: {err}\n{deployment_errors()}",
            file=sys.stderr,
        )
        serve.shutdown()
        return 2
    print(
        f"serving {cfg.index.uri} on {url}  (POST /search, GET /healthz, /docs); Ctrl-C stops",
        flush=True,
    )
    started = time.time()
    stop.wait()
    logger.info("stopping after %.0f s", time.time() - started)
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
