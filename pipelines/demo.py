"""`make demo`: catalog → fine-tune → index job → search service, offline, on one screen.

    python -m pipelines.demo --config configs/demo.yaml [key=value ...] [--model PATH] [--port P]
        [--no-wait]

1. Generates the demo catalog (``pipelines.make_catalog``, ``demo.products`` at ``demo.seed``) beside
   ``source.uri`` unless that catalog is already there.
2. Builds the base model ``model.name_or_path`` when it is a missing folder under ``.data/models``:
   the compact pretrained model (``blip_ops.compact_model``) for a name starting with ``compact``,
   the tiny random one (``blip_ops.tiny_model``) for ``tiny``.
3. Fine-tunes it on the catalog's ``train`` split (``pipelines.finetune`` with ``finetune.*``) into
   ``finetune.out_dir``. Cached: skipped when ``out_dir/best`` was trained from the same catalog,
   base model and settings (``out_dir/demo_cache.json``). ``demo.finetune=false`` skips it.
4. Indexes the catalog with the fine-tuned model (``pipelines.index_catalog``) into ``index.uri``.
5. Starts the search service (``pipelines.serve_search``) on ``serve.host:serve.port``, prints the
   top results of held-out shopper queries in English, 汉字 and pinyin (over real HTTP) and the
   search page's URL, and serves until Ctrl-C or SIGTERM (``make demo-stop`` sends it, by the pid
   in ``<output.dir>/demo.pid``). ``--no-wait`` stops after the samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from pipelines.config import (
    AppConfig,
    add_config_arguments,
    cli_config,
    write_resolved_config,
)
from pipelines.runtime.cluster import init_ray
from pipelines.runtime.inputs import ensure_catalog as ensure_catalog_at
from pipelines.runtime.inputs import ensure_model
from pipelines.search.samples import catalog_attributes, run_samples, sample_queries
from pipelines.training.cached import finetuned_model

logger = logging.getLogger(__name__)

DEMO_PRODUCTS = 240
DEMO_SEED = 0
PID_FILE = "demo.pid"


class Timer:
    """Wall time per demo step, printed as it goes and kept for the summary."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.steps: dict[str, float] = {}

    def step(self, name: str, since: float) -> None:
        self.steps[name] = round(time.perf_counter() - since, 1)
        print(f"   [{name}: {self.steps[name]}s]", flush=True)

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


# --------------------------------------------------------------------------- inputs


def ensure_catalog(cfg: AppConfig, n_products: int, seed: int = DEMO_SEED) -> Path:
    """The demo catalog root (the parent of ``source.uri``), generated when absent or different."""
    source = Path(cfg.source.uri)
    if source.name != "products" or "://" in cfg.source.uri:
        raise ValueError(
            "the demo generates its catalog beside a local source.uri ending in /products, "
            f"got {cfg.source.uri!r}"
        )
    root = source.parent
    manifest, generated = ensure_catalog_at(
        root, n_products, seed, label="demo catalog", announce=print
    )
    if generated:
        print(
            f"   done in {manifest['seconds']['total']}s: {manifest['splits']}, "
            f"title languages {manifest['title_langs']}"
        )
    else:
        print(f"demo catalog at {root}: {manifest['splits']} (cached)")
    return root


# --------------------------------------------------------------------------- serve + samples


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _relevance_line(s: dict) -> str:
    flags = [r.get("relevant") for r in s["results"]]
    if not flags or any(f is None for f in flags):
        return ""
    first = "relevant" if flags[0] else "NOT relevant"
    return f"; top hit {first}, {sum(flags)} of {len(flags)} hits relevant"


def print_samples(shown: list[dict]) -> None:
    for s in shown:
        where = f"at rank {s['rank']}" if s["rank"] else "not in the top results"
        print(
            f"\n[{s['lang']}] {s['query']!r}: labelled product {s['product_id']} {where}"
            + _relevance_line(s)
        )
        print(f"  {'#':>2}  {'product':<9} {'rel':>3} {'itc':>6} {'itm':>7} {'score':>7}  title")
        for i, r in enumerate(s["results"], 1):
            itm = "-" if r.get("itm_score") is None else f"{r['itm_score']:7.2f}"
            mark = "*" if r["product_id"] == s["product_id"] else " "
            rel = {True: "yes", False: "no", None: "?"}[r.get("relevant")]
            print(
                f" {mark}{i:>2}  {r['product_id']:<9} {rel:>3} {r['itc_score']:6.3f} {itm:>7} "
                f"{r['score']:7.2f}  {r['title'][:70]}"
            )


def run_demo(cfg: AppConfig, *, wait: bool = True) -> dict:
    from pipelines.indexing.job import run_index
    from pipelines.search.deployments import start

    timer = Timer()
    d = cfg.demo
    t = time.perf_counter()
    catalog = ensure_catalog(cfg, d.products, d.seed)
    timer.step("catalog", t)

    t = time.perf_counter()
    model_path, tuned = (
        finetuned_model(cfg, catalog) if d.finetune else (ensure_model(cfg.model.name_or_path), {"skipped": True})
    )
    timer.step("fine-tune", t)
    cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name_or_path": model_path})}
    )

    t = time.perf_counter()
    print(f"indexing {catalog / 'products'} into {cfg.index.uri} with {model_path} ...", flush=True)
    init_ray(cfg)
    index = run_index(cfg)
    print(
        f"   {index['in']} rows: indexed {index['indexed']} (encoded now "
        f"{index['encoded_this_run']}), unchanged {index['unchanged']}, rejected "
        f"{index['rejected']}; published version {index['products_version']}"
    )
    timer.step("index", t)

    t = time.perf_counter()
    host, port = cfg.serve.host, cfg.serve.port
    if port and not _port_free(host, port):
        print(f"port {port} is busy: serving on a free port instead")
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": 0})})
    url = start(cfg)
    timer.step("serve", t)

    t = time.perf_counter()
    shown = run_samples(
        url, sample_queries(catalog, d.sample_products), d.k, catalog_attributes(catalog)
    )
    print_samples(shown)
    timer.step("samples", t)
    summary = {
        "url": url,
        "model": model_path,
        "fine_tune": tuned,
        "index": {
            k: index[k]
            for k in ("run_id", "in", "indexed", "encoded_this_run", "rejected", "products_version")
        },
        "samples": [
            {
                **{k: s[k] for k in ("lang", "query", "product_id", "rank")},
                "relevant": [r.get("relevant") for r in s["results"]],
            }
            for s in shown
        ],
        "seconds": {**timer.steps, "total": timer.total()},
    }
    out = Path(cfg.output.dir) / "demo" if cfg.output.dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo_summary.json").write_text(
            json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        write_resolved_config(cfg, out)
    print(f"\nsearch page: {url}/   (API: POST {url}/search, GET {url}/healthz)")
    print(f"demo ready in {summary['seconds']['total']}s: {timer.steps}")
    if wait:
        serve_until_stopped(out)
    return summary


def serve_until_stopped(out: Path | None) -> None:
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    pid_file = out / PID_FILE if out is not None else None
    if pid_file is not None:
        pid_file.write_text(str(os.getpid()))
    print("serving until Ctrl-C (or `make demo-stop`) ...", flush=True)
    try:
        stop.wait()
    finally:
        print("stopping the search service ...", flush=True)
        serve.shutdown()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="stop after printing the sample queries"
    )
    add_config_arguments(parser, ("model", "port"))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    from blip_ops.hub import ModelUnavailableError

    try:
        run_demo(cfg, wait=not args.no_wait)
    except (ModelUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
