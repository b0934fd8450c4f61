"""The configuration roots: ``AppConfig`` holds every section (what a config file and the command
line describe); a process that needs only a few gets a root of those shared sections
(``ServingConfig`` for the search service's replicas), so it carries what it uses and nothing else.
"""

from __future__ import annotations

import logging

from pydantic import Field

from pipelines.config.base import Section
from pipelines.config.sections import (
    DemoConfig,
    EncodeConfig,
    ExportConfig,
    IndexConfig,
    MaintainConfig,
    MineConfig,
    ModelConfig,
    OutputConfig,
    RayConfig,
    S3Config,
    SourceConfig,
)
from pipelines.config.serving import ServeConfig
from pipelines.config.training import FinetuneConfig

logger = logging.getLogger(__name__)

class AppConfig(Section):
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




class ServingConfig(Section):
    """What the search service's deployments use: the model, the published index, its storage and
    the service's own settings (no fine-tuning, demo, export or job sections)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    s3: S3Config = Field(default_factory=S3Config)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def serving_config(cfg: AppConfig | ServingConfig) -> ServingConfig:
    """The serving root of ``cfg`` (the same sections, shared, not copied)."""
    if isinstance(cfg, ServingConfig):
        return cfg
    return ServingConfig(**{name: getattr(cfg, name) for name in ServingConfig.model_fields})
