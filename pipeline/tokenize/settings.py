"""What embedpipe reads from a ``transformers`` tokenizer, kept on disk so that later jobs need no transformers.

Loading a tokenizer with ``AutoTokenizer`` imports transformers and torch: about two seconds, more
than a small job's whole work. Yet a job needs only a few facts from it: the backend (its
``tokenizer.json`` as transformers leaves it after the tokenizer class has set it up), the special
tokens, the padding and truncation sides, ``model_max_length`` and the model's input names. These
are a pure function of the tokenizer's files and the transformers version, so they are saved once
under the user's cache directory, keyed by the sha256 of every file the tokenizer can read
(weights excepted) and the versions of transformers and tokenizers. A changed file or an upgraded
library is a new key. Both paths return the same :class:`TokenizerSettings`, and a job uses nothing
else, so a cached and a fresh load cannot resolve a job differently.

Cache directory: ``EMBEDPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/embedpipe``, else
``~/.cache/embedpipe``; an unwritable one is skipped (the job loads with transformers every time).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("embedpipe")

_FORMAT = 1
# Files AutoTokenizer never reads: weights and checkpoints (large, and irrelevant to the tokenizer).
_NOT_TOKENIZER_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy")


@dataclass(frozen=True)
class TokenizerSettings:
    """The facts of a loaded transformers fast tokenizer that a job uses (attribute names as transformers')."""

    tokenizer_json: str  # the backend, serialized after the tokenizer class set it up
    model_max_length: int | None
    pad_token: str | None
    eos_token: str | None
    padding_side: str
    truncation_side: str
    model_input_names: tuple[str, ...]

    @functools.cached_property
    def backend_tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` the job tokenizes with."""
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)

    @classmethod
    def of(cls, hf: Any) -> TokenizerSettings:
        """The settings of a loaded transformers tokenizer."""
        return cls(tokenizer_json=hf.backend_tokenizer.to_str(), model_max_length=hf.model_max_length,
                   pad_token=hf.pad_token, eos_token=hf.eos_token, padding_side=hf.padding_side,
                   truncation_side=hf.truncation_side, model_input_names=tuple(hf.model_input_names))


def cache_dir() -> Path:
    """Where tokenizer settings are cached (see the module docstring)."""
    configured = os.environ.get("EMBEDPIPE_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedpipe"


def settings_key(path: Path) -> str:
    """sha256 over the tokenizer's files (a directory's, weights excepted; or one tokenizer.json) and the
    versions of the libraries that turn them into settings."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                  if p.is_file() and not p.name.endswith(_NOT_TOKENIZER_FILES))
    digest = hashlib.sha256(f"format {_FORMAT}\n".encode())
    for package in ("transformers", "tokenizers"):
        digest.update(f"{package} {metadata.version(package)}\n".encode())
    for file in files:
        digest.update(f"{file.name} {hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def cached_settings(path: Path, load: Any) -> TokenizerSettings:
    """The settings of the tokenizer at ``path``: from the cache, else ``load()`` (a transformers tokenizer),
    saved for the next job."""
    key = settings_key(path)
    file = cache_dir() / "tokenizers" / f"{key}.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        data["model_input_names"] = tuple(data["model_input_names"])
        return TokenizerSettings(**{f.name: data[f.name] for f in fields(TokenizerSettings)})
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("tokenizer settings cache %s unreadable (%s): loading with transformers", file, exc)
    settings = TokenizerSettings.of(load())
    _save(file, settings)
    return settings


def _save(file: Path, settings: TokenizerSettings) -> None:
    """Write the cache file atomically (a concurrent job sees the old state or the whole file)."""
    data = asdict(settings) | {"model_input_names": list(settings.model_input_names)}
    staging = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps(data), encoding="utf-8")
        os.replace(staging, file)
    except OSError as exc:
        log.debug("tokenizer settings not cached in %s: %s", file.parent, exc)
        staging.unlink(missing_ok=True)
