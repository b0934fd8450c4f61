"""The command-line side of the configuration: the shared ``--config``/``key=value``/flag
arguments, and writing the resolved config (``python -m pipelines.config`` prints it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipelines.config.app import AppConfig
from pipelines.config.base import (
    FLAG_ALIASES,
    ConfigError,
)
from pipelines.config.loading import field_at, is_uri, load_config

logger = logging.getLogger(__name__)

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
        annotation = field_at(key)
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
    if is_uri(str(out_dir)):
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


