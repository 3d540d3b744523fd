"""``OUT/manifest.json``: the job record, written by the driver alone and replaced atomically.

It carries the resolved config and its hash, the input fingerprint, the plan,
every committed shard (rows, tokens, bytes, sha256), the counts, the versions of
the software that wrote it and the job status. A shard is listed only after its
file was committed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

import orjson

from pipeline import __version__
from pipeline.errors import ConfigError
from pipeline.output.commit import commit_bytes
from pipeline.output.contract import MANIFEST_NAME
from pipeline.output.storage import Location

if TYPE_CHECKING:
    from pipeline.config import JobConfig
    from pipeline.inputs.files import InputFile
    from pipeline.inputs.plan import WorkUnit

FORMAT_VERSION = 1
_VERSIONED = ("pyarrow", "tokenizers", "transformers", "ray", "datasets", "torch")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    versions = {"embedpipe": __version__, "python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def input_fingerprint(files: list[InputFile]) -> str:
    blob = json.dumps([f.fingerprint() for f in files], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def new_manifest(config: JobConfig, files: list[InputFile], units: list[WorkUnit], tokenizer_sha256: str,
                 names: list[str], models: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """A fresh manifest for a job that has not committed anything yet.

    ``models``: the hub ids pinned to commits (:func:`pipeline.hub.pin_revisions`), recorded under ``models``;
    ``config`` is the pinned config, whose revisions (and so hashes) are those commits.
    """
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": now(),
        "updated_at": now(),
        "status": "running",
        "versions": software_versions(),
        "config": config.model_dump(mode="json"),
        "config_hash": config.output_hash(),
        "stage_hashes": config.stage_hashes(),
        "tokenizer_sha256": tokenizer_sha256,
        "input": {"fingerprint": input_fingerprint(files), "files": [f.fingerprint() for f in files]},
        "plan": {"units": [u.to_json() for u in units], "shards": len(units), "names": names},
        "stages": {},
        "counts": {"rows_in": 0, "rows_out": 0, "quarantined": 0},
    }
    if models:
        manifest["models"] = models
    return manifest


_MANIFEST_KEYS = ("format_version", "config_hash", "plan", "stages")


def load_manifest(out_dir: Location) -> dict[str, Any] | None:
    """The manifest of ``out_dir`` (see :func:`pipeline.output.storage.output_path`), or None if there is none.

    Raises:
        ConfigError: ``manifest.json`` is not an embedpipe manifest (unreadable, or not the record embedpipe
            writes); embedpipe never overwrites it.
    """
    path = out_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not an embedpipe manifest ({exc}); embedpipe never overwrites a file it "
                          "did not write: use another output directory, or remove the file") from None
    missing = [key for key in _MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise ConfigError(f"{path}: not an embedpipe manifest (no {', '.join(missing)}); embedpipe never "
                          "overwrites a file it did not write: use another output directory, or remove the file")
    wrong = _shape_problem(manifest)
    if wrong:
        raise ConfigError(f"{path}: a damaged embedpipe manifest ({wrong}); embedpipe never overwrites it: "
                          "restore it, or use another output directory")
    return manifest


_SHARD_FIELDS = {"name": str, "rows": int, "bytes": int, "sha256": str}


def _shape_problem(manifest: dict[str, Any]) -> str | None:
    """What in the manifest's structure is not what embedpipe writes (None: every part readers rely on is)."""
    plan = manifest["plan"]
    if not isinstance(plan, dict) or not isinstance(plan.get("units"), list) or not isinstance(plan.get("shards"), int):
        return "plan: expected units (a list) and shards (a number)"
    if not all(isinstance(u, dict) and isinstance(u.get("index"), int) for u in plan["units"]):
        return "plan.units: expected objects with an index"
    if "names" in plan and not (isinstance(plan["names"], list) and all(isinstance(n, str) for n in plan["names"])):
        return "plan.names: expected a list of shard names"
    if not isinstance(manifest["stages"], dict):
        return "stages: expected an object"
    for stage, record in manifest["stages"].items():
        if not isinstance(record, dict) or not isinstance(record.get("shards", {}), dict):
            return f"stages.{stage}: expected an object with shards"
        for name, shard in record.get("shards", {}).items():
            if not isinstance(shard, dict):
                return f"stages.{stage}.shards.{name}: expected an object"
            for key, kind in _SHARD_FIELDS.items():
                if not isinstance(shard.get(key), kind):
                    return f"stages.{stage}.shards.{name}.{key}: expected a {kind.__name__}"
    return None


def save_manifest(out_dir: Location, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically."""
    manifest["updated_at"] = now()
    # orjson, not json: json indents in pure Python, and a run rewrites the manifest (a record per shard)
    # every second on a core the workers need: 16 ms per save at 356 shards against 0.4 ms.
    blob = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    commit_bytes(blob, out_dir / MANIFEST_NAME)


def differences(old: dict[str, Any], new: dict[str, Any], increment: bool = False) -> list[str]:
    """What makes an existing manifest's job a different job from ``new`` (empty: the same job).

    With ``increment`` (``new`` adds units for new input files), the old plan need only be a prefix of the new.
    Encoder settings are left to :func:`embedding_differences` when both manifests carry stage hashes.
    """
    found = []
    old_hashes = old.get("stage_hashes")
    if old_hashes and old_hashes.get("tokens") != new["stage_hashes"]["tokens"]:
        found += [f"config {key}" for key in _changed_keys(old.get("config", {}), new["config"])
                  if not key.startswith("encoder.")] or ["config"]
    elif not old_hashes and old.get("config_hash") != new["config_hash"]:
        found += [f"config {key}" for key in _changed_keys(old.get("config", {}), new["config"])] or ["config"]
    if old.get("tokenizer_sha256") != new["tokenizer_sha256"]:
        found.append("tokenizer files")
    if new["input"].get("content_changed"):
        # Set by the driver under --force when committed shards' input changed (pipeline.inputs.identity):
        # the job starts over rather than mix shards of two versions of the input.
        found.append(f"input content ({len(new['input']['content_changed'])} committed shards' input changed)")
    if increment:
        old_units = old.get("plan", {}).get("units", [])
        if new["plan"]["units"][: len(old_units)] != old_units:
            found.append("plan")
        return found
    if old.get("input", {}).get("fingerprint") != new["input"]["fingerprint"]:
        found.append("input files (names, sizes or modification times)")
    if old.get("plan", {}).get("units") != new["plan"]["units"]:
        found.append("plan")
    return found


# The manifest key of the settings the embeddings were computed with once resolved on the cluster.
COMPUTED_WITH_KEY = "embeddings_computed_with"


def embedding_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The encoder settings that differ between the job whose embeddings ``old`` records and ``new``."""
    old_hash = (old.get("stage_hashes") or {}).get("embeddings")
    if old_hash is None or old_hash == new["stage_hashes"]["embeddings"]:
        return _resolved_differences(old, new)
    before = old.get("embeddings_config") or old.get("config", {})
    changed = [key for key in _changed_keys(before, new["config"]) if key.startswith("encoder.")]
    return [f"config {key}" for key in changed] or ["config encoder"]


def _resolved_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Settings resolved at run time (``device: auto``, the default dtype and budgets) that differ from those
    the committed embeddings were computed with: a job must not mix shards computed on a CPU and a GPU."""
    was, now = old.get(COMPUTED_WITH_KEY), new.get(COMPUTED_WITH_KEY)
    if not was or not now or not old.get("stages", {}).get("embeddings", {}).get("shards"):
        return []
    return [f"encoder {key} resolves to {now.get(key)!r} on this cluster, the committed embeddings were computed "
            f"with {was.get(key)!r} (set it in the config to continue as before)"
            for key in sorted(set(was) | set(now)) if was.get(key) != now.get(key)]


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    if old != new and not prefix.startswith(("ray.", "output.path.")):
        return [f"{prefix[:-1]} ({old!r} -> {new!r})"]
    return []


# tokenizer.pack's per-shard counts, summed in the totals: tokens made (documents + separators) = tokens in
# blocks + dropped; documents in no block (empty, or wholly in a dropped remainder).
PACK_COUNT_KEYS = ("document_tokens", "separator_tokens", "dropped_tokens", "dropped_documents", "empty_documents")


def add_counts(manifest: dict[str, Any], stage: str) -> None:
    """Recompute a stage's totals (and the job's row counts) from its committed shards.

    ``blank_lines`` (blank JSONL lines, skipped: not rows) is summed in the totals, apart from ``rows_in``.
    """
    record = manifest["stages"][stage]
    shards = record["shards"].values()
    totals: dict[str, Any] = {}
    keys = ("rows_in", "rows", "texts", "quarantined", "blank_lines", "tokens", "untruncated_tokens",
            "truncated_rows", "bytes", "nonfinite_rows", "computed_tokens")
    for key in keys:
        if any(key in s for s in shards):
            totals[key] = sum(s.get(key, 0) for s in shards)
    for key in PACK_COUNT_KEYS:
        if any(key in s for s in shards):
            totals[key] = sum(s.get(key, 0) for s in shards)
    histogram = None
    for shard in shards:
        if "length_histogram" in shard:
            counts = shard["length_histogram"]
            histogram = counts if histogram is None else [a + b for a, b in zip(histogram, counts)]
    if histogram is not None:
        totals["length_histogram"] = {"edges": record.get("histogram_edges"), "counts": histogram}
    record["totals"] = totals
    if stage == "tokens":
        manifest["counts"] = {
            "rows_in": totals.get("rows_in", 0), "rows_out": totals.get("texts", 0),
            "quarantined": totals.get("quarantined", 0),
        }
