"""Prometheus metrics and structured access logs of the search service (per ingress replica).

``GET /metrics`` renders :class:`SearchMetrics` in the Prometheus text format: requests by route and
status, latency histograms per stage (encode, ann, lexical, rerank, total), the sizes of the model
deployment's ``@serve.batch`` calls, image-token cache hits and misses, and the served table
version. Ray Serve's own metrics (``ray_serve_*``) stay on Ray's metrics endpoint.

Access logs are one JSON object per line: request id, route, status, duration, table version and
stage timings. Never the request body, the query text or the image.
"""

from __future__ import annotations

import json
import logging
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

access_log = logging.getLogger("blip_search.access")

STAGES = ("encode", "ann", "lexical", "rerank", "total")
_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_ROUTES = (
    (re.compile(r"^/products/[^/]+/thumbnail$"), "/products/{id}/thumbnail"),
    (re.compile(r"^/products/[^/]+$"), "/products/{id}"),
)
KNOWN = {"/", "/search", "/healthz", "/metrics", "/facets", "/docs", "/openapi.json"}


def route_of(path: str) -> str:
    """A bounded route label for a request path (ids never become label values)."""
    if path in KNOWN:
        return path
    for pattern, label in _ROUTES:
        if pattern.match(path):
            return label
    return "other"


class SearchMetrics:
    """One registry per replica (not the process-global one: Serve may host several apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "search_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.stage_seconds = Histogram(
            "search_stage_seconds",
            "Server-side latency per search stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.request_seconds = Histogram(
            "search_http_request_seconds",
            "Latency of every HTTP request in the ingress, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "search_model_batch_size",
            "Requests per model call (@serve.batch), by kind",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.cache = Counter(
            "search_image_token_cache", "ITM image-token cache lookups", ["result"], registry=r
        )
        self.table_version = Gauge(
            "search_table_version", "Version of the products table being served", registry=r
        )
        self.table_rows = Gauge("search_table_rows", "Rows of the served version", registry=r)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(ms / 1000.0)

    def observe_model_call(self, kind: str, stats: dict) -> None:
        if stats.get("batch"):
            self.batch_size.labels(kind).observe(stats["batch"])
        if stats.get("hits"):
            self.cache.labels("hit").inc(stats["hits"])
        if stats.get("misses"):
            self.cache.labels("miss").inc(stats["misses"])

    def set_version(self, version: int, rows: int) -> None:
        self.table_version.set(version)
        self.table_rows.set(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def log_json(logger: logging.Logger, event: str, **fields) -> None:
    """One JSON object per line (request id, status, timings, …; never request contents)."""
    logger.info(json.dumps({"event": event, **fields}, ensure_ascii=False, default=str))


class JsonFormatter(logging.Formatter):
    """Log records as JSON lines: time, level, logger, the request id Serve is handling (when
    there is one) and the message's fields (a message that is a JSON object is merged as is)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields: dict = {}
        if message.startswith("{"):
            try:
                fields = json.loads(message)
            except json.JSONDecodeError:
                fields = {}
        if not fields:
            fields = {"message": message}
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
        }
        rid = _serve_request_id()
        if rid and "request_id" not in fields and "request_ids" not in fields:
            out["request_id"] = rid
        out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _serve_request_id() -> str | None:
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - outside a Serve request (or another Ray version)
        return None


def setup_json_logging(names: tuple[str, ...] = ("blip_search", "pipelines")) -> None:
    """Send these loggers' INFO+ records to stderr as JSON lines (once per process); in a Serve
    replica stderr lands in Ray's worker log files and the driver's console."""
    import sys

    for name in names:
        logger = logging.getLogger(name)
        if any(getattr(h, "_blip_json", False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._blip_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
