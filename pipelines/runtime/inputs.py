"""A command's inputs, resolved: the model checkpoint (the offline defaults built when missing)
and a generated catalog (written when absent or generated with other arguments)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pipelines.config import DEFAULT_DATA_DIR

logger = logging.getLogger(__name__)

LOCAL_MODELS = DEFAULT_DATA_DIR / "models"  # where the offline defaults are built on first use


def ensure_model(ref: str | Path) -> str:
    """``ref`` as given; when it is a missing folder under ``.data/models`` named ``compact*`` or
    ``tiny*``, the compact pretrained or the tiny random model is built there first. Any other
    reference (a hub id, an existing checkpoint) is left for the loader to resolve."""
    path = Path(ref)
    if path.is_absolute() and not path.exists() and LOCAL_MODELS in path.parents:
        if path.name.startswith("compact"):
            from blip_ops.compact_model import write_compact_model

            print(f"building the compact pretrained model at {path} ...", flush=True)
            write_compact_model(path)
        elif path.name.startswith("tiny"):
            from blip_ops.tiny_model import write_tiny_model

            print(f"building the tiny offline BLIP at {path} ...", flush=True)
            write_tiny_model(path)
    return str(ref)


def ensure_catalog(
    root: str | Path,
    products: int,
    seed: int = 0,
    *,
    label: str = "catalog",
    announce: Callable[[str], object] = logger.info,
) -> tuple[dict, bool]:
    """(manifest, generated) of the generated catalog at ``root``: written (replacing what is
    there, after ``announce`` says so) unless its manifest has the same products, seed and
    generator version."""
    from pipelines.catalog.writer import GENERATOR_VERSION, make_catalog, read_manifest

    manifest = read_manifest(str(root))
    wanted = (products, seed, GENERATOR_VERSION)
    if manifest is not None and (
        manifest.get("products"), manifest.get("seed"), manifest.get("generator_version")
    ) == wanted:
        return manifest, False
    announce(f"generating the {label} ({products} products, seed {seed}) at {root} ...")
    return make_catalog(str(root), products, seed, overwrite=True), True
