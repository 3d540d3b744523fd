"""The output directory between runs: reuse a matching job's output, refuse another's, verify shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.manifest import differences, load_manifest
from pipeline.shards import file_sha256
from pipeline.storage import is_remote, output_path, remove_tree

_JOB_ENTRIES = ("tokens", "embeddings", "quarantine", "manifest.json")


def prepare_output(out_dir: Path | str, fresh: dict[str, Any], force: bool,
                   increment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest to continue with: the existing one if it is the same job, else ``fresh``.

    With ``increment`` (new input files since the last run), the existing manifest takes the
    extended plan and input and records the increment.

    Raises:
        ConfigError: ``out_dir`` holds a different job's output and ``force`` is off (it names what differs).
    """
    out_dir = output_path(out_dir)
    old = load_manifest(out_dir)
    if old is not None and not force:
        changed = differences(old, fresh, increment=increment is not None)
        if changed:
            raise ConfigError(
                f"{out_dir} holds the output of a different job ({'; '.join(changed)}); "
                "use another output directory, or --force to start over"
            )
        old["config"] = fresh["config"]
        if increment is not None:
            old["plan"], old["input"] = fresh["plan"], fresh["input"]
            old.setdefault("increments", []).append(increment)
        return old
    if force:
        for entry in _JOB_ENTRIES:
            remove_tree(out_dir / entry)
    if not is_remote(out_dir):  # an object store has no directories to make
        out_dir.mkdir(parents=True, exist_ok=True)
    return fresh


def committed_ok(out_dir: Path | str, stage: str, record: dict[str, Any]) -> bool:
    """Whether a shard the manifest lists is on disk (or in the store) as committed: same size, same sha256."""
    out_dir = output_path(out_dir)
    path = out_dir / stage / record["name"]
    if not path.is_file() or path.stat().st_size != record["bytes"]:
        return False
    if record.get("quarantine_file") and not (out_dir / "quarantine" / record["quarantine_file"]).is_file():
        return False
    return file_sha256(path) == record["sha256"]
