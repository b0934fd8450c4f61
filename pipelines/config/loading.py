"""Loading a configuration: defaults < YAML file < ``key=value`` overrides < flags, every key
checked against the schema (with a suggestion for a typo), relative paths resolved once.
"""

from __future__ import annotations

import difflib
import logging
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipelines.config.app import AppConfig
from pipelines.config.base import (
    CREDENTIAL_RE,
    FLAG_ALIASES,
    MODEL_PATH_KEY,
    PATH_KEYS,
    URI_RE,
    ConfigError,
)

logger = logging.getLogger(__name__)

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


def field_at(dotted: str) -> Any:
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
    if CREDENTIAL_RE.search(dotted.rsplit(".", 1)[-1]):
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


def is_uri(value: str) -> bool:
    return bool(URI_RE.match(value))


def _abs_path(value: str, base: Path) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _resolve_model(value: str, base: Path) -> str:
    # A hub id ("Salesforce/blip-itm-base-coco") looks like a relative path: only treat the value
    # as a path when it says so, or when such a path exists next to the base.
    if is_uri(value):
        return value
    if value.startswith((".", "/", "~")) or (base / value).exists():
        return _abs_path(value, base)
    return value


def _resolve_paths(flat: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(flat)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not is_uri(value):
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
        _expects_str(field_at(key))
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


