"""blip_ops must run where only torch, transformers, PIL and numpy exist (the GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys

CORE = ["blip_ops", "blip_ops.hf_blip", "blip_ops.tiny_model", "blip_ops.rerank", "blip_ops.decode",
        "blip_ops.attention", "blip_ops.hub", "blip_ops.text", "blip_ops.losses", "blip_ops.training",
        "blip_ops.train_loop", "blip_ops.evaluate", "blip_ops.momentum", "blip_ops.compact_model", "blip_ops.compact_network", "blip_ops.loading",
        "blip_ops.efficientnet_lite"]
ALLOWED_THIRD_PARTY = {"torch", "transformers", "PIL", "numpy", "huggingface_hub", "tokenizers", "safetensors"}

_PROBE = """
import json, sys
# What the allowed libraries pull in by themselves is not ours to judge: import them first.
import numpy, PIL.Image, torch, transformers
from transformers import AutoTokenizer, BertTokenizer, BlipConfig, BlipForImageTextRetrieval
before = set(sys.modules)
for name in {core!r}:
    __import__(name)
new = sorted({{m.split('.')[0] for m in set(sys.modules) - before}})
baseline = sorted({{m.split('.')[0] for m in before}})
print(json.dumps({{"new": new, "stdlib": sorted(sys.stdlib_module_names), "baseline": baseline}}))
"""


def _new_top_level_modules(modules: list[str]) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(core=modules)], capture_output=True, text=True, check=True
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    # The libraries a GPU box lacks must not be in the baseline, or the check could not see them.
    assert not {"pydantic", "pypinyin", "ray", "lancedb", "pyarrow"} & set(data["baseline"])
    return set(data["new"]) - set(data["stdlib"]) - {"blip_ops", "_distutils_hack"}


def test_blip_ops_core_imports_only_torch_transformers_pil_numpy():
    extra = _new_top_level_modules(CORE) - ALLOWED_THIRD_PARTY
    assert not extra, f"blip_ops core imports {sorted(extra)} at module load"


def test_blip_ops_never_imports_ray():
    code = "import sys, blip_ops, blip_ops.hf_blip, blip_ops.tiny_model; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_probe_would_notice_a_forbidden_import(tmp_path, monkeypatch):
    """The probe is not vacuous: a module importing pypinyin at load is reported."""
    pkg = tmp_path / "leaky_mod.py"
    pkg.write_text("import pypinyin\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert "pypinyin" in _new_top_level_modules(["leaky_mod"])
