"""Typed configuration shared by every ``pipelines`` command.

Layers, lowest precedence first: built-in defaults < YAML file (``--config``) < ``key=value``
overrides (dotted keys, values parsed as YAML) < flags (``--source``, ``--index-uri``, ``--model``,
``--host``, ``--port``; a flag left at None is ignored).

Relative local paths are resolved once, at load time: those written in a YAML file against the
file's directory (a config must not depend on the working directory), those given on the command
line against the working directory (what a shell user expects). URIs (``s3://…``) and hub ids
(``Salesforce/blip-itm-base-coco``) are never touched.

``python -m pipelines.config --config FILE [key=value ...]`` prints the resolved config.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger(__name__)

# Laptop defaults live in the checkout's .data/ folder (absolute, so they never depend on the cwd).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / ".data"

# Flag name (argparse dest) -> config key it is an alias of.
FLAG_ALIASES: dict[str, str] = {
    "source": "source.uri",
    "index_uri": "index.uri",
    "model": "model.name_or_path",
    "host": "serve.host",
    "port": "serve.port",
}

# Keys holding a local path or a URI; relative local paths are resolved against the layer's base.
PATH_KEYS = (
    "source.uri",
    "index.uri",
    "output.dir",
    "serve.cache_dir",
    "finetune.catalog",
    "finetune.out_dir",
    "finetune.mined_negatives",
    "finetune.feature_cache",
    "mine.out",
)
# Holds a path *or* a hub id; only treated as a path when it clearly is one (see _resolve_model).
MODEL_PATH_KEY = "model.name_or_path"

_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_CREDENTIAL_RE = re.compile(r"(access|secret|token|password|credential|session_key)", re.I)


class ConfigError(ValueError):
    """Bad configuration; the message names the offending key and where it came from."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key  # dotted config key at fault, when there is one
        self.source = source  # file path, "command-line override '…'", "flag --…"


class _Section(BaseModel):
    # strict: YAML already types its values, so "8" for an int is a mistake, not a conversion.
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "Salesforce/blip-itm-base-coco", description="local checkpoint dir or hub id"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="attention kernel; sdpa is ~2.3x faster"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not _DEVICE_RE.match(v):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v


class SourceColumns(_Section):
    product_id: str = Field(
        "product_id", min_length=1, description="catalog column with the product id"
    )
    title: str = Field(
        "title", min_length=1, description="catalog column with the title (any language)"
    )
    image: str = Field("image", min_length=1, description="catalog column with inline image bytes")
    image_uri: str = Field(
        "image_uri", min_length=1, description="catalog column with an image path/URI"
    )


class SourceConfig(_Section):
    uri: str = Field(
        str(DEFAULT_DATA_DIR / "catalog" / "products"),
        description="catalog folder or s3://bucket/prefix",
    )
    columns: SourceColumns = Field(
        default_factory=SourceColumns, description="catalog column names"
    )
    metadata_columns: list[str] = Field(
        default_factory=lambda: ["category", "price", "brand", "title_lang", "split"],
        description="columns passed through to the index as metadata (when present)",
    )
    max_image_bytes: int = Field(
        20_000_000, gt=0, description="larger images are rejected, not decoded"
    )


class IndexConfig(_Section):
    uri: str = Field(
        str(DEFAULT_DATA_DIR / "lancedb"), description="LanceDB directory or s3:// URI"
    )
    table: str = Field("products", min_length=1, description="products table name")
    publish_tag: str = Field(
        "published", min_length=1, description="tag readers open; moved at the end of a run"
    )
    stage_flush_rows: int = Field(
        512, gt=0, description="encoded rows saved to the staging table at a time (the resume unit)"
    )
    delete_missing: bool = Field(
        False, description="delete products absent from the source (otherwise they are kept)"
    )
    ann_min_rows: int = Field(
        5000,
        gt=0,
        description="build an IVF-type ANN index from this many rows; exact search below",
    )
    ann_index_type: Literal["IVF_HNSW_SQ", "IVF_PQ", "IVF_FLAT"] = Field(
        "IVF_HNSW_SQ", description="LanceDB vector index type (IVF_HNSW_SQ: best recall/latency)"
    )
    ann_num_partitions: int | None = Field(
        None, gt=0, description="IVF partitions; None = about sqrt(rows)"
    )
    # Query-time ANN settings of the service and the search export (None = LanceDB's defaults).
    # benchmarks/bench_ann.py measures recall@100 against exact search for each.
    search_nprobes: int | None = Field(
        None, gt=0, description="IVF partitions probed per query (more: recall up, latency up)"
    )
    search_refine_factor: int | None = Field(
        None,
        gt=0,
        description="re-score refine_factor x k candidates with full vectors (IVF_PQ needs it: "
        "recall@100 0.74 -> 0.99 at 100k rows)",
    )
    search_ef: int | None = Field(
        None, gt=0, description="HNSW search breadth of IVF_HNSW_* indexes"
    )


class S3Config(_Section):
    # No credential fields on purpose: the standard AWS chain only (env, ~/.aws, instance role).
    endpoint_url: str | None = Field(None, description="custom endpoint (MinIO, moto); None = AWS")
    region: str | None = Field(None, description="bucket region; None = from the AWS chain")
    allow_http: bool = Field(
        False, description="allow a plain-http endpoint (local test servers only)"
    )
    max_attempts: int = Field(
        10,
        gt=0,
        description="attempts per S3 request of the pyarrow client (503 SlowDown, resets, cut "
        "bodies are retried with backoff; Lance's client retries on its own)",
    )


class RayConfig(_Section):
    address: str | None = Field(
        None, description='cluster address or "auto"; None = RAY_ADDRESS or a local Ray'
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray; None = all")
    object_store_memory_mb: int | None = Field(
        None, gt=0, description="object store of a local Ray; None = Ray's default"
    )


class EncodeConfig(_Section):
    batch_size: int = Field(16, gt=0, description="images per encoder call")
    num_actors: int = Field(1, gt=0, description="encoder actors in the pool")
    num_cpus_per_actor: float = Field(1.0, ge=0, description="CPUs reserved per encoder actor")
    num_gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs reserved per encoder actor (0 = CPU)"
    )
    thumbnail_size: int = Field(256, gt=0, description="longest side of the display thumbnail")
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="torch threads per CPU actor; None = Ray's default (its CPU reservation)",
    )
    derivative_threads: int = Field(
        2,
        ge=0,
        description="threads per encoder actor that make the stored JPEGs (model-resolution image "
        "and thumbnail) while the model encodes; 0 = on the actor's own thread, after encoding",
    )
    malloc_mmap_threshold_mb: int = Field(
        32,
        ge=0,
        le=32,
        description="glibc mmap threshold in the encoder actor: freed buffers of this size and "
        "more go back to the OS; smaller ones are reused. 1 returned every activation tensor "
        "(compact model job: 15.9 vs 32.7 images/s, bench_index.py --ablate); 0 = glibc's default",
    )


class DeploymentConfig(_Section):
    """Replica count, resources and admission limits of one Ray Serve deployment."""

    num_replicas: int = Field(1, gt=0, description="replicas of this deployment")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (0 = CPU)")
    max_ongoing_requests: int = Field(
        16, gt=0, description="requests one replica works on at once (Serve's admission limit)"
    )
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="requests waiting for a replica before clients get 503 (-1 = no limit)",
    )
    max_constructor_retry_count: int = Field(
        3, gt=0, description="replica start attempts before the deployment is marked failed"
    )


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 = any free port)")
    candidates: int = Field(100, gt=0, description="ANN candidates per query (stage 1)")
    rerank_k: int = Field(
        32, ge=0, description="candidates re-scored by ITM (stage 2); 0 = no re-rank"
    )
    k: int = Field(10, gt=0, description="results returned per query")
    max_candidates: int = Field(1000, gt=0, description="largest `candidates` a request may ask")
    max_rerank_k: int = Field(256, ge=0, description="largest `rerank_k` a request may ask")
    max_text_chars: int = Field(512, gt=0, description="longest query text accepted")
    max_body_bytes: int = Field(
        8_000_000, gt=0, description="largest request body (413 above, checked before reading it)"
    )
    max_image_bytes: int = Field(
        5_000_000, gt=0, description="largest decoded query image file (base64-decoded bytes)"
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="largest query image (width x height): decompression bombs"
    )
    api_key_env: str = Field(
        "BLIP_SEARCH_API_KEY",
        min_length=1,
        description="environment variable holding the API key; unset = no key required",
    )
    refresh_seconds: float = Field(
        10.0, gt=0, description="how often replicas look for a newly published version"
    )
    cache_dir: str | None = Field(
        None, description="local copy of an s3:// index for the query path; None = a temp folder"
    )
    token_cache_items: int = Field(
        4096, ge=0, description="ITM image tokens kept in memory per model replica (hot products)"
    )
    decode_threads: int = Field(
        4,
        ge=0,
        description="threads per model replica that decode the re-rank candidates' stored JPEGs "
        "on a token-cache miss (PIL releases the GIL); 0 = one at a time on the request's thread",
    )
    hybrid: Literal["off", "rrf", "weighted"] = Field(
        "off",
        description="fuse BM25 on the normalised title with the vector candidates (off until measured)",
    )
    hybrid_rrf_k: float = Field(60.0, gt=0, description="reciprocal-rank fusion constant")
    hybrid_weight: float = Field(
        0.5, ge=0, le=1, description="weighted fusion: share of the ITC cosine (rest: BM25)"
    )
    itm_weight: float = Field(
        1.0, ge=0,
        description="re-rank score = ITC cosine + itm_weight * ITM logit (1.0 = BLIP's rule); "
        "choose it on the val split (benchmarks/bench_quality.py)",
    )  # fmt: skip
    follow_model: bool = Field(
        True,
        description="serve the published version's own model (the checkpoint its run recorded) "
        "when it differs from model.name_or_path; false = refuse such a version",
    )
    max_models: int = Field(
        2, gt=0, description="query models a model replica keeps loaded (rollout + rollback)"
    )
    batching: bool = Field(True, description="@serve.batch query encoding and ITM across requests")
    max_batch_size: int = Field(16, gt=0, description="requests per @serve.batch call")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="how long a batch waits to fill (see adaptive_batch_wait)"
    )
    adaptive_batch_wait: bool = Field(
        True,
        description="wait batch_wait_timeout_s only while other calls are in flight at the model "
        "replica: a lone request goes at once; false = every batch waits",
    )
    ingress: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(num_cpus=0.25, max_ongoing_requests=32),
        description="HTTP ingress (FastAPI, CPU): ANN recall and the response",
    )
    model: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(num_cpus=0.5, max_ongoing_requests=64),
        description="query encoder + ITM re-ranker (GPU when num_gpus > 0)",
    )

    @model_validator(mode="after")
    def _check_depths(self) -> ServeConfig:
        if self.rerank_k > self.candidates or self.k > self.candidates:
            raise ValueError(
                f"serve.rerank_k ({self.rerank_k}) and serve.k ({self.k}) must not exceed "
                f"serve.candidates ({self.candidates})"
            )
        if self.candidates > self.max_candidates or self.rerank_k > self.max_rerank_k:
            raise ValueError(
                f"serve.candidates ({self.candidates}) and serve.rerank_k ({self.rerank_k}) must "
                f"not exceed serve.max_candidates ({self.max_candidates}) and serve.max_rerank_k "
                f"({self.max_rerank_k})"
            )
        return self


class FinetuneConfig(_Section):
    """``python -m pipelines.finetune``: ITC + ITM fine-tuning on the catalog's train split."""

    catalog: str = Field(
        str(DEFAULT_DATA_DIR / "catalog"),
        description="catalog folder of pipelines.make_catalog (products/, pairs.parquet, queries)",
    )
    out_dir: str = Field(
        str(DEFAULT_DATA_DIR / "finetune"), description="checkpoints: best/, last/ and the summary"
    )
    steps: int = Field(300, gt=0, description="optimiser steps (the schedule spans them)")
    batch_size: int = Field(
        16, ge=2, description="products per step over all workers (each with all its titles)"
    )
    lr: float = Field(
        1e-4, gt=0,
        description="peak AdamW learning rate of the fresh parts (cross-attention, adapter, "
        "projections, ITM head); of every part when lr_pretrained is null",
    )  # fmt: skip
    lr_pretrained: float | None = Field(
        None, gt=0,
        description="peak learning rate of the pretrained encoders (the family says which "
        "parameters those are); null = lr",
    )  # fmt: skip
    lr_temp: float | None = Field(
        None, gt=0, description="peak learning rate of the ITC temperature (no decay); null = lr"
    )
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (BLIP: 0.05)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps before the cosine decay")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm (0 = no clipping)")
    negatives: Literal["hard", "random"] = Field(
        "hard", description="ITM negatives: similarity-weighted (BLIP) or uniform (the ablation)"
    )
    seed: int = Field(0, description="seeds init order, batch order and negative sampling")
    eval_every: int = Field(
        100, ge=0, description="evaluate + checkpoint every N steps (0 = at the end only)"
    )
    eval_k_test: int = Field(
        16, gt=0, description="ITC→ITM re-rank depth of the periodic evaluation"
    )
    resume: bool = Field(True, description="continue from out_dir/last when it exists")
    workers: int = Field(1, gt=0, description="1 = this process; >1 = Ray Train TorchTrainer")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs per Ray Train worker (fractions on small machines)"
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (>0: NCCL, else gloo)")
    mixed_precision: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    log_every: int = Field(10, gt=0, description="progress line every N steps")
    momentum: bool = Field(
        False, description="BLIP's momentum encoder + feature queue for ITC (off by default)"
    )
    momentum_m: float = Field(
        0.995, ge=0, le=1, description="EMA momentum of the momentum encoder (BLIP: 0.995)"
    )
    queue_size: int = Field(4096, ge=0, description="momentum feature queue length (BLIP: 57,600)")
    alpha: float = Field(
        0.4, ge=0, le=1,
        description="distillation weight, ramped from 0 over warmup_steps (BLIP: 0.4)",
    )  # fmt: skip
    batching: Literal["random", "family"] = Field(
        "random",
        description="batch makeup: random train products, or whole near-duplicate families "
        "(P x K) so in-batch hard negatives are one-attribute twins; every train product once "
        "per epoch either way",
    )
    random_share: float = Field(
        0.5, ge=0, le=1,
        description="family batching: share of each batch filled with random single products "
        "(easy negatives beside the twins)",
    )  # fmt: skip
    swap_negatives: bool = Field(
        False,
        description="extra ITM negatives: each product's own title with one attribute word "
        "(colour, pattern, material or brand) swapped, in the title's language; needs the "
        "attribute columns in pairs.parquet and is off without them",
    )
    feature_cache: str | None = Field(
        None,
        description="folder that keeps the decoded training images (a frozen CNN's feature "
        "maps for the compact family) between runs of the same base model and catalog; "
        "null = recompute each run",
    )
    itm_balanced: bool = Field(
        False,
        description="ITM loss with positives and negatives weighted to equal totals (BLIP: "
        "unweighted, 1 positive : 2 negatives)",
    )
    easy_steps: int = Field(
        0, ge=0,
        description="curriculum: the first N steps draw ITM negatives at random and leave the "
        "swapped titles out, so the fresh ITM head learns the easy cases first",
    )  # fmt: skip
    freeze_word_embeddings: bool = Field(
        False,
        description="keep the text encoder's word-embedding table fixed (on a CPU its dense "
        "update is a large share of a step)",
    )
    eval_split: Literal["val"] = Field(
        "val",
        description="the split fitting evaluates for checkpoint selection (never test: that "
        "split is read only by the final evaluation)",
    )
    eval_texts: Literal["titles", "queries"] = Field(
        "titles",
        description="what the periodic evaluation ranks: the val products' own titles (the "
        "paper's task) or their shopper queries",
    )
    itm_titles: Literal["all", "one"] = Field(
        "all",
        description="ITM pairs per step: every title (2T+B pairs) or one drawn title per image "
        "(3B pairs, BLIP's one caption per image; about half the text-side cost)",
    )
    mined_negatives: str | None = Field(
        None,
        description="Parquet of pipelines.mine_negatives: batches hold anchors' mined neighbours "
        "(single process only); None = off",
    )
    mined_per_batch: int | None = Field(
        None, gt=0,
        description="products of each batch that are anchors' mined neighbours (at most half); "
        "None = batch_size // 2",
    )  # fmt: skip
    mined_weight: float = Field(
        1.0, ge=0,
        description="sampling mass of a row's mined candidates relative to all in-batch "
        "candidates (1.0: about half the ITM negatives are mined ones; 0 = batch makeup only)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_mined(self) -> FinetuneConfig:
        if self.mined_negatives is None:
            return self
        if self.workers > 1:
            raise ValueError(
                "finetune.mined_negatives works in a single process only (finetune.workers=1, "
                f"got {self.workers}): Ray Train shards the data per worker, so a batch cannot "
                "be built around each anchor's mined neighbours"
            )
        if self.mined_per_batch is not None and self.mined_per_batch > self.batch_size // 2:
            raise ValueError(
                f"finetune.mined_per_batch ({self.mined_per_batch}) must not exceed half of "
                f"finetune.batch_size ({self.batch_size}): each neighbour needs an anchor"
            )
        return self

    @property
    def mined_slots(self) -> int:
        """Products per batch that are mined neighbours (the rest are anchors)."""
        return self.mined_per_batch or max(1, self.batch_size // 2)


class MineConfig(_Section):
    """``python -m pipelines.mine_negatives``: hard negatives from the published products table."""

    per_product: int = Field(
        8, gt=0, description="nearest other train products kept per train product"
    )
    out: str | None = Field(
        None,
        description="output Parquet (local or s3://); None = "
        "<index.uri>/_negatives/negatives-<model_id>-v<version>.parquet",
    )
    chunk_rows: int = Field(
        1024, gt=0,
        description="products scored per matmul chunk (memory: chunk_rows x train products x 4 B)",
    )  # fmt: skip


class DemoConfig(_Section):
    """``python -m pipelines.demo`` (``make demo``)."""

    products: int = Field(240, ge=10, description="demo catalog size (generated when missing)")
    seed: int = Field(0, description="demo catalog seed")
    finetune: bool = Field(
        True, description="fine-tune model.name_or_path on the train split first (cached)"
    )
    sample_products: int = Field(
        2, gt=0, description="held-out products whose queries (3 languages) are shown"
    )
    k: int = Field(5, gt=0, le=100, description="results shown per sample query")


class ExportConfig(_Section):
    """``python -m pipelines.export``: Parquet exports of the tables for analysts."""

    batch_rows: int = Field(
        8192, gt=0, description="rows read from LanceDB per streamed batch (bounds memory)"
    )
    max_rows_per_file: int = Field(
        250_000, gt=0, description="rows per Parquet file before the next file starts"
    )
    row_group_rows: int = Field(
        65_536, gt=0, description="rows per Parquet row group (at most max_rows_per_file)"
    )
    partition_by: list[str] = Field(
        default_factory=list,
        description="hive partitions of a products export (e.g. [category]); [] = plain files",
    )
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field(
        "zstd", description="Parquet compression codec"
    )
    search_batch: int = Field(
        32, gt=0, description="queries of a search export encoded per model call"
    )
    max_partitions: int = Field(
        1024,
        gt=0,
        description="hive partitions an export may write; more fails (partition_by too fine)",
    )
    read_ahead_mb: int = Field(
        64, gt=0, description="megabytes LanceDB may read ahead of the writer (bounds memory)"
    )
    max_open_files: int = Field(
        32,
        gt=0,
        description="partition files written at once; each buffers up to one row group in memory",
    )
    progress_seconds: float = Field(
        10.0, gt=0, description="how often a long export logs its progress"
    )

    @model_validator(mode="after")
    def _check_groups(self) -> ExportConfig:
        if self.row_group_rows > self.max_rows_per_file:
            raise ValueError(
                f"export.row_group_rows ({self.row_group_rows}) must not exceed "
                f"export.max_rows_per_file ({self.max_rows_per_file})"
            )
        return self


class MaintainConfig(_Section):
    """``python -m pipelines.maintain``: compaction, incremental index optimisation, cleanup."""

    keep_runs: int = Field(
        14, gt=0, description="newest `run-*` tags kept per table (older ones are deleted)"
    )
    cleanup_older_than_hours: float = Field(
        24.0,
        ge=0,
        description="untagged versions older than this are deleted (0 = all but the latest)",
    )
    target_rows_per_fragment: int = Field(
        16_384,
        gt=0,
        description="compaction merges smaller fragments up to this many rows (rows carry "
        "JPEGs: ~0.6 GB per fragment at 384 px; a larger target rewrites more each time)",
    )
    after_index: bool = Field(
        False, description="the index job runs maintenance after it has published"
    )
    writer_stale_minutes: float = Field(
        180.0,
        gt=0,
        description="a writer lease not renewed for this long is a dead writer's (maintenance "
        "refuses to run beside a live one)",
    )


class OutputConfig(_Section):
    dir: str | None = Field(
        None, description="where commands like the demo write results; None = none"
    )


class AppConfig(_Section):
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="BLIP checkpoint and runtime"
    )
    source: SourceConfig = Field(default_factory=SourceConfig, description="product catalog input")
    index: IndexConfig = Field(default_factory=IndexConfig, description="LanceDB output")
    s3: S3Config = Field(
        default_factory=S3Config, description="S3 endpoint settings (no credentials)"
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster")
    encode: EncodeConfig = Field(default_factory=EncodeConfig, description="encoder actor pool")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="search server")
    output: OutputConfig = Field(default_factory=OutputConfig, description="result files")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="fine-tuning (pipelines.finetune)"
    )
    mine: MineConfig = Field(
        default_factory=MineConfig, description="hard-negative mining (pipelines.mine_negatives)"
    )
    demo: DemoConfig = Field(default_factory=DemoConfig, description="make demo")
    export: ExportConfig = Field(
        default_factory=ExportConfig, description="analyst exports (pipelines.export)"
    )
    maintain: MaintainConfig = Field(
        default_factory=MaintainConfig, description="table maintenance (pipelines.maintain)"
    )


# --------------------------------------------------------------------------- key checking


def _section_type(annotation: Any) -> type[BaseModel] | None:
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _all_keys(model: type[BaseModel] = AppConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _section_type(field.annotation)
        if sub is not None:
            keys.extend(_all_keys(sub, prefix + name + "."))
    return keys


def _field_at(dotted: str) -> Any:
    """The annotation of a dotted key, or None when the key does not exist."""
    model: type[BaseModel] | None = AppConfig
    annotation = None
    for part in dotted.split("."):
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = _section_type(annotation)
    return annotation


def _expects_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return str in typing.get_args(annotation)
    return False


def _unknown_key(dotted: str, source: str) -> ConfigError:
    msg = f"unknown key {dotted!r} in {source}"
    close = difflib.get_close_matches(dotted, _all_keys(), n=1, cutoff=0.6)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    if _CREDENTIAL_RE.search(dotted.rsplit(".", 1)[-1]):
        msg += "; credentials never go in config: use the standard AWS chain (env, ~/.aws, role)"
    return ConfigError(msg, key=dotted, source=source)


def _flatten(
    data: Mapping[Any, Any], source: str, model: type[BaseModel] = AppConfig, prefix: str = ""
) -> dict[str, Any]:
    """Check a nested mapping against the schema and return {dotted leaf key: value}.

    Keys may themselves be dotted (``encode.batch_size: 8``). A section given as null counts as an
    empty mapping (a YAML block whose lines are all commented out).
    """
    flat: dict[str, Any] = {}
    for raw_key, value in data.items():
        if not isinstance(raw_key, str) or not raw_key:
            raise ConfigError(
                f"invalid key {prefix}{raw_key!r} in {source}: keys must be non-empty strings",
                source=source,
            )
        head, _, rest = raw_key.partition(".")
        dotted = prefix + head
        if head not in model.model_fields:
            raise _unknown_key(prefix + raw_key, source)
        sub = _section_type(model.model_fields[head].annotation)
        if rest:
            if sub is None:
                raise _unknown_key(prefix + raw_key, source)
            flat.update(_flatten({rest: value}, source, sub, dotted + "."))
        elif sub is not None:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"invalid value for {dotted!r} in {source}: got {_show(value)}; expected a mapping of "
                    f"{', '.join(sub.model_fields)}",
                    key=dotted,
                    source=source,
                )
            flat.update(_flatten(value, source, sub, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


# --------------------------------------------------------------------------- paths


def _is_uri(value: str) -> bool:
    return bool(_URI_RE.match(value))


def _abs_path(value: str, base: Path) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _resolve_model(value: str, base: Path) -> str:
    # A hub id ("Salesforce/blip-itm-base-coco") looks like a relative path: only treat the value
    # as a path when it says so, or when such a path exists next to the base.
    if _is_uri(value):
        return value
    if value.startswith((".", "/", "~")) or (base / value).exists():
        return _abs_path(value, base)
    return value


def _resolve_paths(flat: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(flat)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not _is_uri(value):
            out[key] = _abs_path(value, base)
    value = out.get(MODEL_PATH_KEY)
    if isinstance(value, str) and value:
        out[MODEL_PATH_KEY] = _resolve_model(value, base)
    return out


# --------------------------------------------------------------------------- layers


def _read_yaml(path: Path, shown: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {shown}", source=shown)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"invalid YAML in {shown}: {detail}", source=shown) from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {shown} must hold a mapping of sections; got {type(data).__name__}",
            source=shown,
        )
    return _flatten(data, shown)


def _parse_override(text: str) -> dict[str, Any]:
    source = f"command-line override {text!r}"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"malformed {source}: expected key=value, e.g. encode.batch_size=8", source=source
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"invalid value in {source}: {' '.join(str(exc).split())}", key=key, source=source
        ) from exc
    # "index.table=2024" means the string; YAML would make it an int (or a date).
    if (
        _expects_str(_field_at(key))
        and value is not None
        and not isinstance(value, (str, list, dict))
    ):
        value = raw.strip()
    return _flatten({key: value}, source)


def _flag_source(name: str) -> str:
    return f"flag --{name.replace('_', '-')}" if name in FLAG_ALIASES else f"flag {name}"


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> AppConfig:
    """Resolve defaults < YAML ``path`` < ``key=value`` overrides < ``flags`` into an AppConfig.

    ``flags`` maps FLAG_ALIASES names (or dotted keys) to values; None values are ignored.
    Raises ConfigError naming the key and where it came from.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    cwd = Path.cwd()
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        shown = str(path)
        file = Path(os.path.expanduser(str(path)))
        file = file if file.is_absolute() else cwd / file
        layers.append((shown, _resolve_paths(_read_yaml(file, shown), file.parent)))
    for text in overrides:
        layers.append(
            (f"command-line override {text!r}", _resolve_paths(_parse_override(text), cwd))
        )
    for name, value in (flags or {}).items():
        if value is None:
            continue
        key = FLAG_ALIASES.get(name, name)
        source = _flag_source(name)
        layers.append((source, _resolve_paths(_flatten({key: value}, source), cwd)))

    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, flat in layers:
        merged.update(flat)
        origin.update(dict.fromkeys(flat, source))

    nested: dict[str, Any] = {}
    for dotted, value in merged.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        cfg = AppConfig.model_validate(nested)
    except ValidationError as exc:
        raise _from_validation(exc, origin) from None
    logger.debug("config resolved from %s", [s for s, _ in layers] or ["built-in defaults"])
    return cfg


def _from_validation(exc: ValidationError, origin: Mapping[str, str]) -> ConfigError:
    parts = []
    first_key = first_source = None
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        # The longest prefix that some layer set is where the value came from; for a whole-section
        # check (serve.k vs serve.candidates), every layer that touched the section.
        source = None
        probe = key
        while probe:
            if probe in origin:
                source = origin[probe]
                break
            probe = probe.rpartition(".")[0]
        if source is None:
            within = sorted({s for k, s in origin.items() if k.startswith(key + ".")})
            source = " and ".join(within) if within else "built-in defaults"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("value_error", "assertion_error") and key.count(".") == 0:
            parts.append(f"invalid {key!r} section from {source}: {msg}")
        else:
            parts.append(f"invalid value for {key!r} in {source}: got {_show(err['input'])}; {msg}")
        if first_key is None:
            first_key, first_source = key, source
    return ConfigError("; ".join(parts), key=first_key, source=first_source)


# --------------------------------------------------------------------------- argparse glue


def add_config_arguments(parser: argparse.ArgumentParser, flags: Sequence[str] = ()) -> None:
    """Add ``--config FILE``, positional ``key=value`` overrides and the named flag aliases.

    ``flags`` are FLAG_ALIASES names, e.g. ("source", "index_uri", "model") -> ``--source``,
    ``--index-uri``, ``--model``. Use ``parse_intermixed_args`` to mix overrides and flags freely.
    """
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML config file")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        default=[],
        help="config overrides, e.g. encode.batch_size=8 (value parsed as YAML)",
    )
    for name in flags:
        if name not in FLAG_ALIASES:
            raise ValueError(
                f"unknown config flag {name!r}; expected one of {sorted(FLAG_ALIASES)}"
            )
        key = FLAG_ALIASES[name]
        annotation = _field_at(key)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            type=int if annotation is int else str,
            help=f"alias of {key}",
        )
    parser.set_defaults(_config_flags=tuple(flags))


def config_from_args(args: argparse.Namespace) -> AppConfig:
    """Load the config described by a namespace parsed with add_config_arguments' arguments."""
    names = getattr(args, "_config_flags", ())
    return load_config(
        getattr(args, "config", None),
        getattr(args, "overrides", None) or (),
        {name: getattr(args, name, None) for name in names},
    )


def cli_config(args: argparse.Namespace) -> AppConfig | None:
    """``config_from_args`` for command entry points: on a bad config, print the one-line error to
    stderr and return None (the caller exits 2, no traceback)."""
    try:
        return config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


# --------------------------------------------------------------------------- output


def dump_config(cfg: AppConfig) -> str:
    """The resolved config as YAML (sections in schema order)."""
    header = f"# resolved config, digest {config_digest(cfg)}\n"
    return header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def write_resolved_config(
    cfg: AppConfig, out_dir: str | Path, name: str = "config.resolved.yaml"
) -> Path:
    """Write the resolved config into local directory ``out_dir`` (created) and return the file.

    Every path in it is already absolute, so load_config(file) gives back an equal AppConfig.
    For an s3:// output, write ``dump_config(cfg)`` with the caller's filesystem instead.
    """
    if _is_uri(str(out_dir)):
        raise ValueError(f"write_resolved_config writes local directories only; got {out_dir!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    target.write_text(dump_config(cfg), encoding="utf-8")
    return target


def config_digest(cfg: AppConfig) -> str:
    """First 16 hex digits of the sha256 of the resolved config's canonical JSON."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.config", description="Print the resolved config as YAML."
    )
    add_config_arguments(parser, tuple(FLAG_ALIASES))
    cfg = cli_config(parser.parse_intermixed_args(argv))
    if cfg is None:
        return 2
    sys.stdout.write(dump_config(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
