"""Shared fixtures: one tiny BLIP checkpoint per test session (built offline, in seconds)."""

from __future__ import annotations

import os

# Never reach for the hub from tests; fail at once instead (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray exports custom metrics every 10 s by default; the metrics test waits for an export.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")

import io  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

# The demo catalog's titles in English, 汉字 and pinyin (its configs name them the same way).
DEMO_TITLE_COLUMNS = "source.title_columns=[title_en,title_zh,title_pinyin]"


def demo_config(*overrides: str):
    """The default configuration with the demo catalog's title columns, plus ``overrides``."""
    from pipelines.config import load_config

    return load_config(None, [DEMO_TITLE_COLUMNS, *overrides])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from blip_ops.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from blip_ops import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="float32", attention="sdpa")


@pytest.fixture(scope="session")
def tiny_query_model(tiny_model_dir):
    """The tiny model as the service, the search export and evaluation load it: the default
    config's CPU settings (``model.cpu_bf16: auto`` multiplies in bfloat16 where the CPU can)."""
    from blip_ops import load_model
    from pipelines.config import load_config

    return load_model(tiny_model_dir, **load_config(None, []).model.query_load_args())


@pytest.fixture(scope="session")
def eager_reference(tiny_model_dir):
    """transformers' own BlipForImageTextRetrieval, untouched (eager attention, its forward)."""
    import torch
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def draw_product(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A small synthetic 'product photo': background, a coloured shape and a stripe, by seed."""
    rng = random.Random(seed)
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    w, h = size
    box = (
        rng.randrange(w // 3),
        rng.randrange(h // 3),
        rng.randrange(w // 2, w),
        rng.randrange(h // 2, h),
    )
    fill = tuple(rng.randrange(256) for _ in range(3))
    (d.ellipse if seed % 2 else d.rectangle)(box, fill=fill)
    d.line(
        (0, rng.randrange(h), w, rng.randrange(h)),
        fill=(255 - fill[0], fill[1], 255 - fill[2]),
        width=6,
    )
    return im


def encode_image_bytes(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def product_images():
    return [draw_product(i) for i in range(8)]


# ---- S3: moto's server mode on 127.0.0.1, one per test session ----------------------------------
@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server on loopback (what MinIO or AWS would be in production)."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


# The test S3 server's credentials, through the standard AWS variables only. Ray workers get them
# from the environment the local Ray was started in (see ray_local), as a node's AWS chain would.
TEST_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket; test credentials through the standard AWS environment variables."""
    import uuid

    import boto3

    for name, value in TEST_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


TEST_API_KEY_ENV = "BLIP_TEST_SEARCH_API_KEY"
TEST_API_KEY = "test-search-key-0123456789"


# ---- Ray: one local Ray per test session (~3 s to start, ~1 GB idle) -----------------
@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with the CI machine's 2 CPUs; jobs under test reuse it."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # Ray workers (Serve replicas included) inherit this process's environment at ray.init: the
    # API-key test points serve.api_key_env at this variable.
    os.environ[TEST_API_KEY_ENV] = TEST_API_KEY
    os.environ.update(TEST_AWS_ENV)
    ray.init(
        num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, logging_level="ERROR"
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def index_config(source_uri, index_uri, model_dir, *overrides):
    """The index job's config: configs/local.yaml with the test's folders and the tiny model."""
    from pathlib import Path

    from pipelines.config import load_config

    local = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"
    return load_config(
        local,
        [
            f"source.uri={source_uri}",
            f"index.uri={index_uri}",
            f"model.name_or_path={model_dir}",
            *overrides,
        ],
    )


# ---- the search service: one catalog, one index run and one Serve app per session -------------
SEARCH_PRODUCTS = 120
# No CPU reservations for the suite's Serve apps: a session app that held even 0.2 of the 2 CPUs
# starved the Ray Data tasks of the tests that run after it (a Ray Train test with 2 x 0.5-CPU
# workers then waited forever for a whole CPU for its read tasks).
SEARCH_LIGHT = [
    "serve.ingress.num_cpus=0",
    "serve.model.num_cpus=0",
    "serve.refresh_seconds=0.5",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def search_index(tmp_path_factory, tiny_model_dir, ray_local):
    """The demo catalog (120 products) indexed by the real index job: (config, root folder)."""
    from pipelines.catalog.writer import make_catalog
    from pipelines.indexing.job import run_index

    root = tmp_path_factory.mktemp("search")
    make_catalog(str(root / "catalog"), SEARCH_PRODUCTS, seed=3, workers=1)
    cfg = index_config(root / "catalog" / "products", root / "db", tiny_model_dir, *SEARCH_LIGHT)
    summary = run_index(cfg)
    assert summary["indexed"] == SEARCH_PRODUCTS
    return cfg, root


@pytest.fixture(scope="session")
def search_url(search_index):
    """The search service on real Ray Serve over HTTP on 127.0.0.1 (app "search" at /)."""
    from ray import serve

    from pipelines.serve_search import build_app

    cfg, _ = search_index
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="search", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
