"""The search service: Ray Serve, FastAPI ingress (ANN recall) + model deployment (encode, ITM).

    serve run pipelines.serve_search:app_builder config=configs/local.yaml [key=value ...]
    serve deploy configs/serve_local.yaml        # or: serve run configs/serve_local.yaml
    python -m pipelines.serve_search --config configs/local.yaml [--index-uri …] [--model …] [--host …] [--port …]

This module is the command: the typed application builder that ``serve run`` / ``serve
deploy`` and the KubeRay manifests name (:func:`app_builder`, :class:`ServeArgs`; :func:`build_app`
for a parsed config) and the command line (:func:`main`). The deployments and :func:`start` are
:mod:`pipelines.search.deployments`, the HTTP routes :mod:`pipelines.search.http`, and the rest of
the search (engine, snapshot, scorer) :mod:`pipelines.search`.

Index versions (:mod:`pipelines.search.versions`): each ingress replica serves one pinned version of the published products table
and checks every ``serve.refresh_seconds`` for a newer one; it opens the new version beside the old
and swaps the reference, so a request is answered wholly from one version and none is dropped. A
published version whose model_id differs from the model deployment's is refused (logged as an
error, reported by ``/healthz``; at startup the replica fails to start).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/serve_search.py` as well as -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from pipelines.config import AppConfig, add_config_arguments, cli_config, load_config
from pipelines.search.deployments import build_app, deployment_errors, start

__all__ = ["ServeArgs", "app_builder", "build_app", "main"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ application
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
def _nothing_published(cfg: AppConfig) -> str | None:
    """Why there is nothing to serve at ``index.uri`` (None: a published run exists)."""
    from pipelines.search.snapshot import published_pointer
    from pipelines.storage import S3Settings

    try:
        pointer = published_pointer(cfg.index.uri, S3Settings.from_config(cfg.s3))
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return "no published run" if pointer is None else None


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

    reason = _nothing_published(cfg)
    if reason is not None:
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
    try:
        url = start(cfg)
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
