"""Random-weight models of a real shape, saved as Hugging Face model directories (safetensors + tokenizer).

Speed does not depend on the weights, and the real MiniLM weights (~90 MB) do not fit what travels to the
GPU machine. Weights are seeded, so every section of a run (and a rerun) sees the same model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from gpu_kit import layout


def build_model(kit: Path, name: str, work: Path, seed: int = 0) -> Path:
    """``work/models/<name>``: the kit's ``models/<name>/config.json`` with random weights and the kit's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel

    out = work / "models" / name
    config_text = (kit / layout.MODELS / name / "config.json").read_text(encoding="utf-8")
    built = out / "kit-config.json"  # the kit's config as it was when these weights were drawn
    if (out / "model.safetensors").is_file() and built.is_file() and built.read_text(encoding="utf-8") == config_text:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy2(kit / layout.MODELS / name / "config.json", out / "config.json")
    config = AutoConfig.from_pretrained(str(out), local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    for file in layout.TOKENIZER_FILES:
        shutil.copy2(kit / layout.TOKENIZER / file, out / file)
    built.write_text(config_text, encoding="utf-8")
    return out


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def parameter_count(model_dir: Path) -> int:
    """Weights in the directory's model.safetensors (read from its header, nothing loaded)."""
    import math

    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="np") as fh:
        return sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())  # noqa: SIM118 - not a dict
