"""The search service's Ray Serve deployments, and starting them.

Two deployments composed with ``.bind()`` (:func:`build_app`): :class:`SearchIngress` (CPU) parses
and checks requests, runs stage 1 (ANN on its pinned table version) and builds responses;
:class:`QueryModel` (GPU when ``serve.model.num_gpus`` > 0) encodes queries and ITM-scores
candidates, batching concurrent requests with ``@serve.batch``. With ``serve.colocate_model``
(small CPU deployments) the ingress builds the same model class in its own process and calls it
there (:mod:`pipelines.search.colocated`), without a handle hop. The ingress's HTTP routes are
:mod:`pipelines.search.http`, its index versions :mod:`pipelines.search.versions`; nothing heavy
happens at import: models and tables load in the replicas.

:func:`start` deploys the application in the connected Ray (the ``serve_search`` command, the
demo); :func:`deployment_errors` explains a failed deployment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from pipelines.config import AppConfig, ServingConfig, serving_config
from pipelines.search.colocated import LocalModel
from pipelines.search.http import build_http_app
from pipelines.search.metrics import SearchMetrics, log_json, setup_json_logging
from pipelines.search.versions import PinnedVersions

logger = logging.getLogger(__name__)

APP_NAME = "search"


# ------------------------------------------------------------------------------ model deployment
@serve.deployment
class QueryModel:
    """Query encoders + ITM re-rankers: the configured checkpoint, and the one each published
    version names (:mod:`pipelines.search.models`); image tokens cached per model and replica."""

    def __init__(self, config: dict):
        from blip_ops import load_model
        from pipelines.runtime.threads import configure_torch_threads, ray_reserved_cpus
        from pipelines.search.models import QueryModels

        setup_json_logging()
        cfg = ServingConfig.model_validate(config)
        # torch sizes its pool from the node's cores, not from this replica's reservation.
        configure_torch_threads(ray_reserved_cpus())

        def load(path: str):
            return load_model(path, **cfg.model.query_load_args())

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
        warm = default.warm_up(cfg.serve.rerank_k) if cfg.serve.warm_up else 0.0
        logger.info(
            "query model %s ready on %s (warm-up %.0f ms)",
            default.model_id, default.model.device, warm * 1000,
        )  # fmt: skip

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


# ------------------------------------------------------------------------------ ingress
@serve.deployment
@serve.ingress()
class SearchIngress:
    """HTTP API (:mod:`pipelines.search.http`): /search, /facets, /products/{id},
    /products/{id}/thumbnail, /healthz, /metrics, over the pinned index version
    (:class:`~pipelines.search.versions.PinnedVersions`)."""

    def __init__(self, config: dict, model: DeploymentHandle | None = None):
        from pipelines.search.request import Limits
        from pipelines.search.snapshot import published_pointer
        from pipelines.storage import S3Settings

        self.cfg = ServingConfig.model_validate(config)
        setup_json_logging()
        self.model = model if model is not None else _in_process_model(config)
        self.metrics = SearchMetrics()
        self.limits = Limits.from_config(self.cfg.serve)
        self.s3 = S3Settings.from_config(self.cfg.s3)
        self.api_key = os.environ.get(self.cfg.serve.api_key_env) or None
        self.max_body_bytes = self.cfg.serve.max_body_bytes
        self.versions = PinnedVersions(
            published=lambda: published_pointer(self.cfg.index.uri, self.s3),
            open_version=self._open,
            load_model=self._load_model,
            follow_model=self.cfg.serve.follow_model,
            index_uri=self.cfg.index.uri,
            model_path=self.cfg.model.name_or_path,
            metrics=self.metrics,
        )

    def _open(self, pointer: dict):
        from pipelines.search.snapshot import ann_settings, open_snapshot

        snap = open_snapshot(
            self.cfg.index.uri,
            self.s3,
            cache_dir=self.cfg.serve.cache_dir,
            pointer=pointer,
            ann=ann_settings(self.cfg.index),
        )
        if not self.cfg.serve.warm_up:
            return snap
        try:  # before the version is served, so its first query reads warm files
            warm = snap.warm_up(self.cfg.serve.candidates, self.cfg.serve.rerank_k)
        except Exception as err:  # a query would fail the same way, with the client's 500
            logger.warning(
                "warm-up of %s version %s failed: %r", snap.products_table, snap.version, err
            )
        else:
            logger.info(
                "%s version %s warmed up in %.0f ms", snap.products_table, snap.version, warm * 1000
            )
        return snap

    def _load_model(self, ref):
        """Text settings of model ``ref``, loaded in the model deployment before a switch."""
        from blip_ops.text import TextSettings

        # A blocking wait in the refresh thread, never on the event loop.
        info = self.model.load.remote(tuple(ref)).result(timeout_s=600)
        return TextSettings.from_dict(info["text_settings"])

    def scorer(self, snap, request_id: str) -> HandleScorer:
        """The engine's scorer for one request on ``snap`` (the model that encoded it)."""
        return HandleScorer(
            self.model, snap.text_settings, self.metrics, request_id, snap.model_ref
        )

    def check_health(self) -> None:
        if self.versions.snapshot is None:
            raise RuntimeError("no index version loaded")

    # The ASGI app, built in the replica after the constructor: the configured model's id and
    # text settings are known only once the model replica answers.
    async def __serve_build_asgi_app__(self):
        from blip_ops.text import TextSettings

        loop = asyncio.get_running_loop()
        if isinstance(self.model, LocalModel):
            self.model.bind_loop(loop)
        info = await self.model.info.remote()
        settings = TextSettings.from_dict(info["text_settings"])
        await asyncio.to_thread(self.versions.start, info["model_id"], settings)
        watch = self.versions.watch(self.cfg.serve.refresh_seconds)
        self._watcher = loop.create_task(watch)
        # The served version's gauges stay on Ray's metrics export port only while re-sent.
        self._gauges = loop.create_task(self.metrics.keep_gauges_exported())
        return build_http_app(self)


# ------------------------------------------------------------------------------ application
def _options(d) -> dict:
    return {
        "num_replicas": d.num_replicas,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "max_constructor_retry_count": d.max_constructor_retry_count,
    }


def _in_process_model(config: dict) -> LocalModel:
    """``serve.colocate_model``: the model deployment's class built in the ingress replica."""
    return LocalModel(QueryModel.func_or_class(config))


def build_app(cfg: AppConfig) -> Application:
    """The Serve application for ``cfg``: ingress bound to the model deployment, or the ingress
    alone holding the model (``serve.colocate_model``). The replicas get the serving sections
    only (``ServingConfig``), not the job and tool sections."""
    config = serving_config(cfg).model_dump(mode="python")
    if cfg.serve.colocate_model:
        return SearchIngress.options(**_options(cfg.serve.ingress)).bind(config)
    model = QueryModel.options(**_options(cfg.serve.model)).bind(config)
    return SearchIngress.options(**_options(cfg.serve.ingress)).bind(config, model)


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
