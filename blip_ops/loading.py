"""``load_model``: a checkpoint directory or hub id → the :class:`RetrievalModel` of its family.

The family is named in the checkpoint's ``blip_catalog.json`` (a hub id or a plain transformers
checkpoint is ``hf_blip``); the table below says which class loads each. ``cpu_quantize`` makes the
text side dynamic int8 once loaded, ``cpu_bf16`` makes it multiply in bfloat16, on a CPU only
(:mod:`blip_ops.quantize`).
"""

from __future__ import annotations

from pathlib import Path

from blip_ops.family import RetrievalModel, read_catalog_config
from blip_ops.quantize import apply_cpu_settings


def _families() -> dict[str, type[RetrievalModel]]:
    # Imported here, not at module level: loading one family should not import the others'
    # dependencies (the compact family needs the EfficientNet package only to build, not to load).
    from blip_ops.compact_model import FAMILY as COMPACT
    from blip_ops.compact_model import CompactBlipModel
    from blip_ops.hf_blip import FAMILY as HF
    from blip_ops.hf_blip import HFBlipModel

    return {HF: HFBlipModel, COMPACT: CompactBlipModel}


def load_model(
    name_or_path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "sdpa",
    cpu_quantize: bool = False,
    cpu_bf16: bool | str = False,
) -> RetrievalModel:
    """Load a checkpoint directory or hub id as a :class:`RetrievalModel` in inference mode.

    ``cpu_quantize``: on a CPU in float32, the text tower, ITM layers and heads become dynamic
    int8 (ignored, with a log line, elsewhere). ``cpu_bf16`` (``True``, ``False`` or ``"auto"``:
    where the CPU multiplies bfloat16 natively): the same layers multiply in bfloat16, activations
    stay float32. The model_id stays the float checkpoint's; such a model is for inference only
    (not for training or ``save``).
    """
    path = Path(str(name_or_path)).expanduser()
    family = read_catalog_config(path).get("family", "hf_blip") if path.is_dir() else "hf_blip"
    families = _families()
    if family not in families:
        raise ValueError(
            f"{name_or_path}: unknown model family {family!r}; known: {sorted(families)}"
        )
    model = families[family].load(
        str(name_or_path), device=device, dtype=dtype, attention=attention
    )
    apply_cpu_settings(model, quantize=cpu_quantize, bf16=cpu_bf16)
    return model
