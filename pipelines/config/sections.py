"""The configuration sections of the catalog, the index, storage, Ray, encoding, and the smaller
commands (mining, the demo, exports, maintenance, outputs).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config.base import (
    DEFAULT_DATA_DIR,
    DEVICE_RE,
    Section,
)

logger = logging.getLogger(__name__)

# The hash split of a catalog without a split column: train, val (checkpoint choice), test.
DEFAULT_SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


class ModelConfig(Section):
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
    cpu_quantize: bool = Field(
        False,
        description="on a CPU in float32: dynamic int8 text tower, ITM layers and heads (the "
        "vision tower stays float, model_id unchanged); ignored on CUDA. Off by default: on the "
        "compact model it made ITM 1.7x faster but cost 3.5 points of ITC->ITM R@1 on val titles "
        "(benchmarks/bench_cpu_settings.py)",
    )
    cpu_bf16: Literal["auto"] | bool = Field(
        "auto",
        description="on a CPU in float32: the text tower, ITM layers and heads multiply in "
        "bfloat16 (weights bfloat16, activations float32; the vision tower stays float, model_id "
        "unchanged); ignored on CUDA and under cpu_quantize. auto = on where the CPU multiplies "
        "bfloat16 natively (AMX or AVX512-BF16), where it made the compact model's ITM 2.1x "
        "faster and moved R@1 on val titles and queries by at most 0.2 points "
        "(benchmarks/bench_cpu_settings.py)",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v

    def query_load_args(self) -> dict:
        """``load_model``'s keyword arguments for a model that answers queries (the service, the
        search export, evaluation): the CPU settings included, so all three score alike."""
        return {
            "device": self.device, "dtype": self.dtype, "attention": self.attention,
            "cpu_quantize": self.cpu_quantize, "cpu_bf16": self.cpu_bf16,
        }  # fmt: skip


class SourceColumns(Section):
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


class SourceConfig(Section):
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
    title_columns: list[str] | None = Field(
        None,
        description="columns whose text describes the product's image, for fine-tuning (each "
        "one a positive of the image) and evaluation (each one a query); null = [columns.title]",
    )
    split_column: str = Field(
        "split",
        min_length=1,
        description="column naming each product's split (train, val, test); a catalog without "
        "it is split by a hash of split_by",
    )
    split_by: str | None = Field(
        None,
        description="column hashed to split a catalog that has no split column (a family or "
        "group column keeps near-duplicates in one split); null = columns.product_id",
    )
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_SPLIT_FRACTIONS),
        description="shares of the hash split by split name (train, val, test); they sum to 1",
    )
    queries: str | None = Field(
        None,
        description="Parquet of held-out queries (product_id, query, optional lang) that "
        "evaluation ranks; null = the catalog folder's queries.parquet when it has one, else "
        "the products' titles",
    )

    @field_validator("title_columns")
    @classmethod
    def _check_title_columns(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not c for c in v) or len(set(v)) != len(v)):
            raise ValueError(f"expected one or more distinct column names, got {v}")
        return v

    @field_validator("split_fractions")
    @classmethod
    def _check_split_fractions(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(DEFAULT_SPLIT_FRACTIONS)
        if unknown or "train" not in v or any(share <= 0 for share in v.values()):
            raise ValueError(
                f"expected positive shares for train and optionally val and test, got {v}"
            )
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"the shares must sum to 1, got {sum(v.values())} ({v})")
        return v

    def titles(self) -> list[str]:
        """The title columns, ``columns.title`` when none are named."""
        return list(self.title_columns or [self.columns.title])


class IndexConfig(Section):
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
    max_reject_fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="publish guard: a run that rejects more than this share of its input rows "
        "commits its rejects and runs rows but leaves the publish tag where it was (exit 4). "
        "Past half, the feed is broken (a renamed column, cut image bytes), not the products; "
        "1.0 publishes anyway. A run with no accepted row never publishes",
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
    # ITM image tokens kept per product so a re-rank skips the vision tower (float16 bytes).
    store_itm_tokens: Literal["auto", "always", "never"] = Field(
        "auto",
        description="store each encoded product's ITM image tokens (float16): auto = when they "
        "take at most max_stored_token_bytes (compact model 50x384: 38 KB, stored; BLIP-base "
        "577x768: 886 KB, recomputed from model_image at query time)",
    )
    max_stored_token_bytes: int = Field(
        65536, gt=0, description="auto stores tokens up to this many bytes per product"
    )


class S3Config(Section):
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


class RayConfig(Section):
    address: str | None = Field(
        None, description='cluster address or "auto"; None = RAY_ADDRESS or a local Ray'
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray; None = all")
    object_store_memory_mb: int | None = Field(
        None, gt=0, description="object store of a local Ray; None = Ray's default"
    )


class EncodeConfig(Section):
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
        description="torch threads per CPU encoder actor; None = the CPUs it reserves "
        "(num_cpus_per_actor, at least 1)",
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


class MineConfig(Section):
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


class DemoConfig(Section):
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


class ExportConfig(Section):
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


class MaintainConfig(Section):
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


class OutputConfig(Section):
    dir: str | None = Field(
        None, description="where commands like the demo write results; None = none"
    )


