"""`make demo`: catalog → fine-tune → index job → search service, offline, on one screen.

    python -m pipelines.demo --config configs/demo.yaml [key=value ...] [--model PATH] [--port P]
        [--no-wait]
    python -m pipelines.demo --stop --config configs/demo.yaml [key=value ...]   (make demo-stop)

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
   search page's URL, and serves until Ctrl-C or SIGTERM. ``--no-wait`` stops after the samples.

Stopping. The demo writes its pid to ``<output.dir>/demo/demo.pid`` when it starts, so
``make demo-stop`` (``--stop`` with the same config: SIGTERM to that pid, then it waits for the
demo to exit) finds it in every step. Ctrl-C (SIGINT) or SIGTERM in any step — making the catalog,
fine-tuning, indexing, starting the service, printing the samples, serving — stops the step, shuts
Serve and Ray down, removes the pid file and exits:

- 0 when the demo was serving: that is how a demo ends;
- 128 + the signal's number before that (143 for SIGTERM, 130 for Ctrl-C), as a shell reports a
  process a signal ended: the demo did not get as far as serving.

Should the shutdown hang, the demo exits anyway ``STOP_GRACE_S`` seconds after the signal; a second
signal ends it at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from pathlib import Path

from pipelines.config import (
    AppConfig,
    add_config_arguments,
    cli_config,
    write_resolved_config,
)
from pipelines.runtime.cluster import init_ray, ray_address
from pipelines.runtime.inputs import ensure_catalog as ensure_catalog_at
from pipelines.runtime.inputs import ensure_model
from pipelines.runtime.stopping import (
    SERVING,
    DemoStopped,
    StopControl,
    stop_demo,
)
from pipelines.search.samples import catalog_attributes, run_samples, sample_queries
from pipelines.training.cached import finetuned_model

logger = logging.getLogger(__name__)

DEMO_PRODUCTS = 240
DEMO_SEED = 0
PID_FILE = "demo.pid"

# The demo's steps, as the stop message names them.
CATALOG = "making the catalog"
FINETUNE = "fine-tuning"
INDEX = "indexing"
SERVE = "starting the search service"
SAMPLES = "printing the sample queries"


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


def _start_ray(cfg: AppConfig, stopper: StopControl) -> None:
    """``init_ray`` with the demo's signal handlers kept in place of Ray's."""
    with stopper.kept():
        init_ray(cfg)


def _shut_down(cfg: AppConfig, stopper: StopControl) -> None:
    """The local Ray this demo started, Serve's proxy and replicas with it; on a cluster it joined
    (as ``init_ray`` does: ``ray.address`` or ``RAY_ADDRESS``), the demo's Serve application, and
    the connection."""
    ray = sys.modules.get("ray")
    if ray is None:  # stopped before Ray was imported: nothing started
        return
    joined = ray_address(cfg)
    # Not on the local Ray: there serve.shutdown's graceful drain takes seconds (about 4 on 2 CPUs)
    # for replicas that ray.shutdown ends anyway, and nobody else is using them.
    if joined and SERVE in stopper.entered and ray.is_initialized():
        from ray import serve

        serve.shutdown()
    # Also when ray.init was broken off: it may have started processes before it connected.
    ray.shutdown()


# --------------------------------------------------------------------------- inputs


def catalog_root(cfg: AppConfig) -> Path:
    """Where the demo generates its catalog: the parent of ``source.uri``, a local .../products."""
    source = Path(cfg.source.uri)
    if source.name != "products" or "://" in cfg.source.uri:
        raise ValueError(
            "the demo generates its catalog beside a local source.uri ending in /products, "
            f"got {cfg.source.uri!r}"
        )
    return source.parent


def ensure_catalog(cfg: AppConfig, n_products: int, seed: int = DEMO_SEED) -> Path:
    """The demo catalog root (the parent of ``source.uri``), generated when absent or different."""
    root = catalog_root(cfg)
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


# --------------------------------------------------------------------------- the demo's steps


def _out_dir(cfg: AppConfig) -> Path | None:
    return Path(cfg.output.dir) / "demo" if cfg.output.dir else None


def _model_step(cfg: AppConfig, catalog: Path, stopper: StopControl) -> tuple[str, dict]:
    if not cfg.demo.finetune:
        return ensure_model(cfg.model.name_or_path), {"skipped": True}
    if cfg.finetune.workers > 1:  # Ray Train starts Ray: do it here, to take the signals back
        _start_ray(cfg, stopper)
    return finetuned_model(cfg, catalog)


def _index_step(cfg: AppConfig, catalog: Path, stopper: StopControl) -> dict:
    from pipelines.indexing.job import run_index

    model_path = cfg.model.name_or_path
    print(f"indexing {catalog / 'products'} into {cfg.index.uri} with {model_path} ...", flush=True)
    _start_ray(cfg, stopper)
    index = run_index(cfg)
    print(
        f"   {index['in']} rows: indexed {index['indexed']} (encoded now "
        f"{index['encoded_this_run']}), unchanged {index['unchanged']}, rejected "
        f"{index['rejected']}; published version {index['products_version']}"
    )
    return index


def _serve_step(cfg: AppConfig) -> str:
    from pipelines.search.deployments import start

    host, port = cfg.serve.host, cfg.serve.port
    if port and not _port_free(host, port):
        print(f"port {port} is busy: serving on a free port instead")
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": 0})})
    print("starting the search service ...", flush=True)
    return start(cfg)


def _samples_step(cfg: AppConfig, catalog: Path, url: str) -> list[dict]:
    d = cfg.demo
    queries = sample_queries(catalog, d.sample_products)
    print(f"sending {len(queries)} sample queries to {url} ...", flush=True)
    shown = run_samples(url, queries, d.k, catalog_attributes(catalog))
    print_samples(shown)
    return shown


def _summary(url: str, model: str, tuned: dict, index: dict, shown: list[dict], timer: Timer):
    return {
        "url": url,
        "model": model,
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


def _demo_steps(cfg: AppConfig, stopper: StopControl, out: Path | None) -> dict:
    """Catalog → fine-tune → index → service → samples; the summary (also written to ``out``)."""
    timer = Timer()
    stopper.enter(CATALOG)
    t = time.perf_counter()
    catalog = ensure_catalog(cfg, cfg.demo.products, cfg.demo.seed)
    timer.step("catalog", t)

    stopper.enter(FINETUNE)
    t = time.perf_counter()
    model_path, tuned = _model_step(cfg, catalog, stopper)
    timer.step("fine-tune", t)
    cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name_or_path": model_path})}
    )

    stopper.enter(INDEX)
    t = time.perf_counter()
    index = _index_step(cfg, catalog, stopper)
    timer.step("index", t)

    stopper.enter(SERVE)
    t = time.perf_counter()
    url = _serve_step(cfg)
    timer.step("serve", t)

    stopper.enter(SAMPLES)
    t = time.perf_counter()
    shown = _samples_step(cfg, catalog, url)
    timer.step("samples", t)

    summary = _summary(url, model_path, tuned, index, shown, timer)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo_summary.json").write_text(
            json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        write_resolved_config(cfg, out)
    print(f"\nsearch page: {url}/   (API: POST {url}/search, GET {url}/healthz)")
    print(f"demo ready in {summary['seconds']['total']}s: {timer.steps}")
    return summary


def run_demo(cfg: AppConfig, *, wait: bool = True) -> dict:
    """The demo's steps, then (``wait``) serving until SIGINT/SIGTERM; Serve and Ray are shut
    down and the pid file removed however it ends. A stop signal raises DemoStopped."""
    catalog_root(cfg)  # a config the demo cannot run fails before it writes anything
    out = _out_dir(cfg)
    stopper = StopControl(out / PID_FILE if out is not None else None)
    try:
        stopper.start()  # in the try: a signal right after it wrote the pid file still removes it
        summary = _demo_steps(cfg, stopper, out)
        if wait:
            stopper.enter(SERVING)
            print("serving until Ctrl-C (or `make demo-stop`) ...", flush=True)
            while True:  # short sleeps: a signal another thread took is handled within one
                time.sleep(0.5)
        return summary
    except BaseException as exc:
        stopped = stopper.stopped
        if stopped is None:
            raise
        print(f"\n{stopped}: stopping the demo ...", flush=True)
        if exc is not stopped:
            # The stop surfaced as another exception: Ray's Cython code turns one raised by a
            # signal handler while it runs into a SystemError, and whatever the stop broke off
            # may fail after it. The demo was stopped all the same.
            logger.debug("the stop surfaced as %r", exc)
            raise stopped from exc
        raise
    finally:
        stopper.begin_shutdown()
        _shut_down(cfg, stopper)
        stopper.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="stop after printing the sample queries"
    )
    parser.add_argument(
        "--stop",
        action="store_true",
        help="stop the demo running with this config (SIGTERM to the pid in "
        "<output.dir>/demo/demo.pid) and wait until it has shut down: `make demo-stop`",
    )
    add_config_arguments(parser, ("model", "port"))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = cli_config(args)
    if cfg is None:
        return 2
    if args.stop:
        if _out_dir(cfg) is None:
            print("error: output.dir is not set, so no demo wrote a pid file", file=sys.stderr)
            return 2
        return stop_demo(_out_dir(cfg) / PID_FILE)
    from blip_ops.hub import ModelUnavailableError

    try:
        run_demo(cfg, wait=not args.no_wait)
    except (ModelUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DemoStopped as stopped:
        print(f"demo stopped ({stopped}; exit {stopped.exit_code})", flush=True)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
