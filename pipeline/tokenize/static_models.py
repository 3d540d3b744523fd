"""Static embedding models on disk (a token-vector table and mean pooling): what they are and how they tokenize.

Two layouts are recognized, without loading any weights:

- a **model2vec** model directory (``model2vec.StaticModel.save_pretrained``): ``model.safetensors`` with an
  ``embeddings`` table (optionally ``mapping`` and ``weights`` of a vocabulary-quantized model), ``tokenizer.json``
  and a ``config.json`` with ``normalize`` and ``max_length``. It is encoded as ``StaticModel.encode`` does:
  the text cut to ``max_length * median token length`` characters, tokenized without special tokens and
  truncated to ``max_length`` tokens, unknown tokens dropped, the vectors averaged, L2-normalized if the config
  says so. (model2vec also writes a ``modules.json``; the ``embeddings`` key tells its layout from ST's.)
- a **sentence-transformers** model whose ``modules.json`` lists ``StaticEmbedding`` first (an
  ``embedding.weight`` table and ``tokenizer.json`` in that module's folder): encoded as
  ``SentenceTransformer.encode`` does: no special tokens, no truncation (unless ``tokenizer.json`` sets one),
  the ``EmbeddingBag`` mean, then a ``Normalize`` module if one follows.

:func:`static_tokenizer_defaults` gives the tokenize settings each library uses; explicit ``tokenizer.*`` keys
win over them. This is the one place that reads ``modules.json`` for static models; the general
sentence-transformers module parser will take it over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError

StaticKind = Literal["model2vec", "sentence_transformers"]
MODEL2VEC_DEFAULT_MAX_LENGTH = 512  # model2vec's DEFAULT_MAX_LENGTH, used when config.json has no max_length
_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class StaticModelFiles:
    """Where a static model's parts are and what its library does around the table lookup."""

    kind: StaticKind
    module_dir: Path  # holds model.safetensors and tokenizer.json
    normalize: bool
    max_length: int | None  # model2vec: tokens kept per text (None: no truncation); ST: tokenizer.json's
    later_modules: tuple[str, ...] = ()  # ST: module types after StaticEmbedding (Normalize allowed)

    @property
    def tokenizer_file(self) -> Path:
        return self.module_dir / "tokenizer.json"

    @property
    def weights_file(self) -> Path:
        return self.module_dir / _WEIGHTS


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"encoder.model: cannot read {path}: {exc}") from None


def _tensor_names(path: Path) -> set[str]:
    """The tensor names in a safetensors file, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return set(handle.keys())
    except (OSError, ValueError) as exc:  # safetensors raises its own error types, subclasses of these
        raise ConfigError(f"encoder.model: cannot read {path}: {exc}") from None


def first_module_is_static_embedding(model_dir: Path) -> tuple[Path, list[str]] | None:
    """If ``modules.json`` lists a StaticEmbedding first: its folder and the types of the later modules.

    Either spelling of the type counts (``sentence_transformers.models.StaticEmbedding`` and the newer
    module paths): the last dotted part is compared.
    """
    path = model_dir / "modules.json"
    if not path.is_file():
        return None
    modules = _read_json(path)
    if not isinstance(modules, list) or not modules or not isinstance(modules[0], dict):
        return None
    ordered = sorted(modules, key=lambda m: m.get("idx", 0))
    if str(ordered[0].get("type", "")).rsplit(".", 1)[-1] != "StaticEmbedding":
        return None
    later = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in ordered[1:]]
    return (model_dir / str(ordered[0].get("path") or ".")).resolve(), later


def static_model_files(model_dir: str | Path) -> StaticModelFiles | None:
    """The static model in ``model_dir``, or None when it is not one (a transformers model, say).

    Raises:
        ConfigError: a static model directory lacking its table or tokenizer, or with an unreadable file.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    found = first_module_is_static_embedding(model_dir)
    module_dir, later = found if found else (model_dir, [])
    if not (module_dir / _WEIGHTS).is_file():
        if found:
            raise ConfigError(f"encoder.model: {module_dir} (its StaticEmbedding module) holds no {_WEIGHTS}")
        return None
    config = model_dir / "config.json"
    if (module_dir / "tokenizer.json").is_file() and config.is_file() and "model_type" not in _read_json(config):
        names = _tensor_names(module_dir / _WEIGHTS)
        if "embeddings" in names:  # model2vec's own layout (it writes a modules.json too)
            settings = _read_json(config)
            max_length = settings.get("max_length", MODEL2VEC_DEFAULT_MAX_LENGTH)
            return StaticModelFiles("model2vec", module_dir, bool(settings.get("normalize", False)), max_length)
    if not found:
        return None
    if not (module_dir / "tokenizer.json").is_file():
        raise ConfigError(f"encoder.model: {module_dir} (its StaticEmbedding module) holds no tokenizer.json")
    if "embedding.weight" not in _tensor_names(module_dir / _WEIGHTS):
        raise ConfigError(f"encoder.model: {module_dir / _WEIGHTS} holds no embedding.weight table")
    truncation = (_read_json(module_dir / "tokenizer.json") or {}).get("truncation") or {}
    return StaticModelFiles("sentence_transformers", module_dir, "Normalize" in later,
                            truncation.get("max_length"), tuple(later))


def median_token_length(tokenizer_json: str) -> int:
    """model2vec's ``median_token_length``: the median character length of the vocabulary's tokens."""
    import numpy as np
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(tokenizer_json).get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    return int(np.median([len(token) for token in tokens]))


def static_tokenizer_defaults(files: StaticModelFiles) -> dict[str, Any]:
    """The ``tokenizer.*`` settings the static model's library tokenizes with, and for model2vec
    ``chars_per_token``: a text is cut to max_length times this many characters before it is tokenized."""
    defaults: dict[str, Any] = {"add_special_tokens": False, "padding": "none",
                                "truncation": files.max_length is not None, "max_length": files.max_length}
    if files.kind == "model2vec":
        defaults["chars_per_token"] = median_token_length(files.tokenizer_file.read_text(encoding="utf-8"))
    return defaults
