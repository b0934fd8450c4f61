"""Resolving a model reference: a local checkpoint directory, a cached hub id, or a hub download.

Production configs name hub checkpoints (``Salesforce/blip-itm-base-coco``); this machine, CI and
many clusters cannot reach the hub. transformers then spends ~27 s in retries before failing with
a message that does not say what to do. We decide up front and fail at once with one that does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 3.0


class ModelUnavailableError(RuntimeError):
    """The model reference is neither a local checkpoint nor reachable on the hub."""


def _hint(ref: str, why: str) -> str:
    return (
        f"cannot load model {ref!r}: it is not a local directory and {why}. "
        "Point the config at a local checkpoint: `model.name_or_path: /path/to/checkpoint` in the YAML, "
        "`model.name_or_path=/path/to/checkpoint` or `--model /path/to/checkpoint` on the command line "
        "(a tiny offline one: `python -m blip_ops.tiny_model --out DIR`)."
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable() -> bool:
    """Whether the hub answers a HEAD request (any status) within _PROBE_TIMEOUT_S.

    It goes through huggingface_hub's own HTTP session, the one a download would use: so it
    honours HTTPS_PROXY / HTTP_PROXY / NO_PROXY (read when that session is created) and a
    client factory set with ``huggingface_hub.set_client_factory``.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    # HF_ENDPOINT read now, not at huggingface_hub's import, so a later setting counts too.
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=_PROBE_TIMEOUT_S, follow_redirects=False)
    # Whatever the session's transport raises means "not reachable" (its exception classes
    # changed with huggingface_hub's HTTP library); offline mode raises OfflineModeIsEnabled.
    except Exception as err:
        logger.debug("hub probe HEAD %s failed: %s: %s", endpoint, type(err).__name__, err)
        return False
    return True


def _cached(ref: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    hit = try_to_load_from_cache(ref, "config.json")
    return isinstance(hit, str)


def resolve_model_ref(ref: str) -> tuple[str, bool]:
    """Return ``(ref, local_files_only)`` to hand to ``from_pretrained``, or raise at once."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"{path} is a directory but holds no config.json: not a checkpoint")
        return str(path), True
    if ref.startswith((".", "/", "~")) or path.suffix:
        raise ModelUnavailableError(f"model path {ref!r} does not exist")
    if _cached(ref):
        return ref, _offline()
    if _offline():
        raise ModelUnavailableError(_hint(ref, "HF_HUB_OFFLINE is set and it is not in the local hub cache"))
    if not _hub_reachable():
        raise ModelUnavailableError(_hint(ref, "the Hugging Face Hub cannot be reached from this machine"))
    return ref, False
