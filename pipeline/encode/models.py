"""Loading text encoders safely: safetensors only, no remote code, inference mode.

``encoder.model`` is an alias, a local model directory, or a hub id (``org/name``) fetched into the
Hugging Face cache at one commit (see :mod:`pipeline.hub`).

Supported families and what the encode step needs to know about each:

- BERT (``bert``): bidirectional, token type ids, no final layer norm
  (each layer ends in its own LayerNorm).
- CLIP's text encoder (``clip_text_model``, or the text half of a whole ``clip``
  checkpoint): causal, ``final_layer_norm`` after the last layer.
- GPT-2 (``gpt2``): causal decoder, ``ln_f`` after the last layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.hub import locate_model

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class Family:
    """What differs between the supported model families at encode time."""

    name: str
    class_name: str  # the transformers class loaded for it
    final_norm: str | None  # attribute of the model holding the norm applied after the last layer
    token_type_ids: bool  # forward() takes token_type_ids


_BERT = Family("bert", "BertModel", final_norm=None, token_type_ids=True)
_CLIP = Family("clip", "CLIPTextModel", final_norm="final_layer_norm", token_type_ids=False)
_GPT2 = Family("gpt2", "GPT2Model", final_norm="ln_f", token_type_ids=False)
FAMILIES: dict[str, Family] = {"bert": _BERT, "clip": _CLIP, "clip_text_model": _CLIP, "gpt2": _GPT2}


def resolve_model_dir(name: str, revision: str | None = None, **checks: bool) -> Path:
    """The local model directory for ``encoder.model`` (see :func:`locate_model`, which takes the same arguments).

    Raises:
        ConfigError: as :func:`locate_model` does.
    """
    return locate_model(name, revision, **checks).path


def family_of(model: torch.nn.Module) -> Family:
    """The family of a loaded encoder (by its config's ``model_type``).

    Raises:
        ConfigError: the model type is not one embedpipe knows how to encode with.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(
            f"encoder.model: model type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    return family


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm the model applies after its last layer (CLIP ``final_layer_norm``, GPT-2 ``ln_f``), if any."""
    attr = family_of(model).final_norm
    # transformers 4.x nests CLIP's modules under .text_model; 5.x flattened them.
    return getattr(getattr(model, "text_model", model), attr) if attr else None


def num_layers(model: torch.nn.Module) -> int:
    """Number of transformer layers (hidden states are this plus one, the embedding output)."""
    return int(model.config.num_hidden_layers)


def embedding_table_size(model: torch.nn.Module) -> int:
    """Rows of the input embedding table: every token id fed to the model must be below this."""
    return int(model.get_input_embeddings().num_embeddings)


def position_limit(model: torch.nn.Module) -> int:
    """Longest sequence the model's position embeddings cover (BERT 512, CLIP 77, GPT-2 1024)."""
    return int(model.config.max_position_embeddings)


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"encoder.model: {model_dir} has no config.json; it is not a Hugging Face model directory"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"encoder.model: cannot read {path}: {exc}") from None


def _check_weights(model_dir: Path, allow_pickle: bool) -> bool:
    """Whether to load safetensors (True) or, when explicitly allowed, a pickle checkpoint (False)."""
    files = [p.name for p in model_dir.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return True
    pickles = sorted(name for name in files if name.endswith(_PICKLE_SUFFIXES))
    if not pickles:
        raise ConfigError(f"encoder.model: {model_dir} holds no weights (no *.safetensors file)")
    if not allow_pickle:
        raise ConfigError(
            f"encoder.model: {model_dir} has only pickle checkpoints ({', '.join(pickles)}), which can run "
            "arbitrary code when loaded; they are refused unless encoder.allow_pickle: true "
            "(or convert the checkpoint to safetensors)"
        )
    return False


def _model_class(config: dict[str, Any], model_dir: Path, trust_remote_code: bool) -> type:
    import transformers

    return getattr(transformers, _family_of_config(config, model_dir, trust_remote_code).class_name)


def _family_of_config(config: dict[str, Any], model_dir: Path, trust_remote_code: bool) -> Family:
    """The family a config.json names (no transformers import: importing a model class costs seconds)."""
    if "auto_map" in config and not trust_remote_code:
        raise ConfigError(
            f"encoder.model: {model_dir}/config.json asks for remote code (auto_map: {sorted(config['auto_map'])}); "
            "refused unless encoder.trust_remote_code: true"
        )
    family = FAMILIES.get(config.get("model_type"))
    if family is None:
        raise ConfigError(
            f"encoder.model: {model_dir} is a {config.get('model_type')!r} model; supported model types: "
            f"{', '.join(FAMILIES)}"
        )
    return family


def check_model_dir(
    model_dir: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> dict[str, Any]:
    """The checks :func:`load_encoder` makes before loading, without loading weights; returns the config.json.

    Raises:
        ConfigError: as :func:`load_encoder` does for the directory's config and weight files.
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    _family_of_config(config, model_dir, trust_remote_code)
    _check_weights(model_dir, allow_pickle)
    return config


def text_config(model_dir: str | Path, trust_remote_code: bool = False) -> Any:
    """The transformers config of the model's text encoder (a CLIP checkpoint's ``text_config``), from config.json.

    transformers' config classes give every family the same attribute names (``hidden_size``,
    ``num_hidden_layers``, ``max_position_embeddings``, ``vocab_size``; GPT-2 calls them ``n_embd``...).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    return getattr(config, "text_config", None) or config


def load_encoder(
    model_dir: str | Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """Load a text encoder for inference: safetensors only unless pickles are allowed, in eval mode on ``device``.

    The transformers class is the built-in one for the config's ``model_type`` (never code from the
    directory, even with ``trust_remote_code``, which only lets a config that names remote code load).
    A whole CLIP checkpoint (text and vision) loads as its ``CLIPTextModel``; the vision weights are not
    materialized. ``sdpa`` attention falls back to eager for a model class without it.

    Raises:
        ConfigError: no config or weights; only pickle checkpoints and ``allow_pickle`` is off; the config asks
            for remote code and ``trust_remote_code`` is off; an unsupported model type; weights missing for
            part of the model; or transformers cannot load it.
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    cls = _model_class(config, model_dir, trust_remote_code)
    use_safetensors = _check_weights(model_dir, allow_pickle)
    if attn_implementation == "sdpa" and not getattr(cls, "_supports_sdpa", False):
        attn_implementation = "eager"
    try:
        model, info = cls.from_pretrained(
            str(model_dir), use_safetensors=use_safetensors, local_files_only=True, dtype=dtype,
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"encoder.model: cannot load {model_dir}: {exc}") from None
    # A missing weight would be silently left at its random initialization. BERT's pooler is never
    # used (pooling is embedpipe's), and some checkpoints ship without it.
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:
        raise ConfigError(
            f"encoder.model: {model_dir} lacks {len(missing)} weights of {cls.__name__} "
            f"(e.g. {', '.join(missing[:3])}); is it the right checkpoint?"
        )
    return model.to(device).eval().requires_grad_(False)
