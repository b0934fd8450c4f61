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

from pipelines.config.app import AppConfig, ServingConfig, serving_config
from pipelines.config.base import (
    DEFAULT_DATA_DIR,
    FLAG_ALIASES,
    MODEL_PATH_KEY,
    PATH_KEYS,
    ConfigError,
)
from pipelines.config.cli import (
    add_config_arguments,
    cli_config,
    config_digest,
    config_from_args,
    dump_config,
    write_resolved_config,
)
from pipelines.config.loading import load_config
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
    SourceColumns,
    SourceConfig,
)
from pipelines.config.serving import DeploymentConfig, ServeConfig
from pipelines.config.training import FinetuneConfig

__all__ = [
    "DEFAULT_DATA_DIR", "FLAG_ALIASES", "MODEL_PATH_KEY", "PATH_KEYS", "AppConfig", "ConfigError",
    "DemoConfig", "DeploymentConfig", "EncodeConfig", "ExportConfig", "FinetuneConfig",
    "IndexConfig", "MaintainConfig", "MineConfig", "ModelConfig", "OutputConfig", "RayConfig",
    "S3Config", "ServeConfig", "ServingConfig", "SourceColumns", "SourceConfig", "add_config_arguments",
    "cli_config", "config_digest", "config_from_args", "dump_config", "load_config", "serving_config",
    "write_resolved_config",
]  # fmt: skip
