"""Metrics and structured access logs of the search service.

Every observation goes to two sinks, both built from one table (:data:`METRICS`):

- Ray's metrics (:mod:`ray.serve.metrics`): Ray's metrics agent exports them on every node's
  metrics export port (``ray start --metrics-export-port``; 8080 in infra/kuberay), prefixed
  ``ray_`` and tagged with the replica's deployment, replica and application by Serve. These are
  the series to scrape and sum across replicas; docs/metrics.md lists the exported names.
- a prometheus_client registry of this replica, rendered at ``GET /metrics``: handy for a local
  run, but one replica's view only (a scrape through the Serve proxy reaches one at random).

Recorded: requests by route and status, latency histograms per stage (encode, ann, lexical,
rerank, total) and per request, the sizes of the model deployment's ``@serve.batch`` calls,
image-token cache hits and misses, and the served table version and its rows.

Access logs are one JSON object per line: request id, route, status, duration, table version and
stage timings. Never the request body, the query text or the image.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)
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
# Ray's agent prefixes every application metric with its namespace on export.
RAY_PREFIX = "ray_"
# Ray 2.60 exports a gauge only in the report interval it was set in, and its agent drops a
# series not refreshed for two intervals (>= 1 s each): gauges are re-sent this often.
GAUGE_RESEND_S = 1.0


def route_of(path: str) -> str:
    """A bounded route label for a request path (ids never become label values)."""
    if path in KNOWN:
        return path
    for pattern, label in _ROUTES:
        if pattern.match(path):
            return label
    return "other"


@dataclass(frozen=True)
class MetricSpec:
    """One metric, as both sinks define it (``kind``: counter, histogram or gauge)."""

    name: str
    kind: str
    help: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def exported(self) -> list[str]:
        """The series names Ray's metrics export port serves for this metric."""
        base = RAY_PREFIX + self.name
        if self.kind == "counter":
            return [base + "_total"]
        if self.kind == "histogram":
            return [base + "_bucket", base + "_count", base + "_sum"]
        return [base]


METRICS = {
    "requests": MetricSpec(
        "search_requests", "counter", "HTTP requests by route and status", ("route", "status")
    ),
    "stage_seconds": MetricSpec(
        "search_stage_seconds",
        "histogram",
        "Server-side latency per search stage",
        ("stage",),
        _LATENCY_BUCKETS_S,
    ),
    "request_seconds": MetricSpec(
        "search_http_request_seconds",
        "histogram",
        "Latency of every HTTP request in the ingress, by route",
        ("route",),
        _LATENCY_BUCKETS_S,
    ),
    "batch_size": MetricSpec(
        "search_model_batch_size",
        "histogram",
        "Requests per model call (@serve.batch), by kind",
        ("kind",),
        (1, 2, 4, 8, 16, 32, 64, 128),
    ),
    "cache": MetricSpec(
        "search_image_token_cache", "counter", "ITM image-token cache lookups", ("result",)
    ),
    "table_version": MetricSpec(
        "search_table_version", "gauge", "Version of the products table being served"
    ),
    "table_rows": MetricSpec("search_table_rows", "gauge", "Rows of the served version"),
}


class _Metric:
    """One metric, recorded in both sinks."""

    _RECORD = {"counter": "inc", "histogram": "observe", "gauge": "set"}

    def __init__(self, spec: MetricSpec, registry: CollectorRegistry):
        from ray.serve import metrics as ray_metrics  # imported here: no Ray at module import

        kind = spec.kind.capitalize()
        buckets = {"buckets": spec.buckets} if spec.buckets else {}
        boundaries = {"boundaries": [float(b) for b in spec.buckets]} if spec.buckets else {}
        self.spec = spec
        self.method = self._RECORD[spec.kind]
        self.local = getattr(prometheus_client, kind)(
            spec.name, spec.help, spec.tags, registry=registry, **buckets
        )
        # Outside a Serve replica (or without Ray) Ray's metrics record nothing, silently.
        self.ray = getattr(ray_metrics, kind)(
            spec.name, description=spec.help, tag_keys=spec.tags or None, **boundaries
        )
        self.last: dict[tuple, float] = {}  # gauges: the last value per tag set, to re-send

    def record(self, value: float, **tags: str) -> None:
        if self.spec.kind == "counter" and value <= 0:
            return  # Ray's counters refuse 0; nothing to count anyway
        local = self.local.labels(**tags) if tags else self.local
        getattr(local, self.method)(value)
        getattr(self.ray, self.method)(value, tags=dict(tags))
        if self.spec.kind == "gauge":
            self.last[tuple(sorted(tags.items()))] = value

    def resend(self) -> None:
        for tags, value in self.last.items():
            self.ray.set(value, tags=dict(tags))


class SearchMetrics:
    """The service's metrics in one replica: Ray's metrics (exported by the node's agent) plus a
    registry of its own for ``/metrics`` (not the process-global one: a Serve worker process may
    host several apps). The ingress records requests, stages, model calls and the version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._metrics = {key: _Metric(spec, self.registry) for key, spec in METRICS.items()}

    def record(self, key: str, value: float, **tags: str) -> None:
        self._metrics[key].record(value, **tags)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.record("requests", 1, route=route, status=str(status))
        self.record("request_seconds", seconds, route=route)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.record("stage_seconds", ms / 1000.0, stage=stage)

    def observe_model_call(self, kind: str, stats: dict) -> None:
        if stats.get("batch"):
            self.record("batch_size", stats["batch"], kind=kind)
        self.record("cache", stats.get("hits") or 0, result="hit")
        self.record("cache", stats.get("misses") or 0, result="miss")

    def set_version(self, version: int, rows: int) -> None:
        self.record("table_version", version)
        self.record("table_rows", rows)

    def resend_gauges(self) -> None:
        for metric in self._metrics.values():
            metric.resend()

    async def keep_gauges_exported(self, every_s: float = GAUGE_RESEND_S) -> None:
        """Re-send the gauges to Ray forever (see GAUGE_RESEND_S); run as a task of the replica."""
        while True:
            try:
                self.resend_gauges()
            except Exception:  # noqa: BLE001 - a metrics hiccup must never end the loop
                logger.exception("re-sending gauges to Ray failed")
            await asyncio.sleep(every_s)

    def render(self) -> bytes:
        """This replica's metrics in the Prometheus text format (``GET /metrics``)."""
        return generate_latest(self.registry)


def exported_names() -> dict[str, MetricSpec]:
    """Every series name Ray's metrics export port serves for the service, with its metric."""
    return {name: spec for spec in METRICS.values() for name in spec.exported()}


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
