"""What every part of the configuration shares: the default data folder, the keys that hold
paths, the error type and the strict base of every section.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

# Laptop defaults live in the checkout's .data/ folder (absolute, so they never depend on the cwd).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / ".data"

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
    "source.queries",
    "finetune.catalog",
    "finetune.out_dir",
    "finetune.storage_path",
    "finetune.mined_negatives",
    "finetune.feature_cache",
    "mine.out",
)
# Holds a path *or* a hub id; only treated as a path when it clearly is one (see _resolve_model).
MODEL_PATH_KEY = "model.name_or_path"

URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
CREDENTIAL_RE = re.compile(r"(access|secret|token|password|credential|session_key)", re.I)


class ConfigError(ValueError):
    """Bad configuration; the message names the offending key and where it came from."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key  # dotted config key at fault, when there is one
        self.source = source  # file path, "command-line override '…'", "flag --…"


class Section(BaseModel):
    # strict: YAML already types its values, so "8" for an int is a mistake, not a conversion.
    model_config = ConfigDict(extra="forbid", strict=True)


