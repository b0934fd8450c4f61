"""The search service's sections: the Serve deployments and the service's own settings.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from pipelines.config.base import (
    Section,
)

logger = logging.getLogger(__name__)

class DeploymentConfig(Section):
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


class ServeConfig(Section):
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
    warm_up: bool = Field(
        True,
        description="before a replica takes traffic, run one made-up query: the model replica's "
        "calls (text encode, vision pass, ITM of rerank_k pairs) and the ingress's reads of each "
        "version it opens (ANN search, re-rank inputs), so the first real query costs what a "
        "later one does",
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
    colocate_model: bool = Field(
        False,
        description="small CPU deployments: the ingress holds the query model and calls it in "
        "its own process (no Serve handle hop; serve.model's resources are not used, give the "
        "ingress the CPUs instead); false = a model deployment of its own (GPU deployments)",
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


