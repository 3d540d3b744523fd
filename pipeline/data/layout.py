"""What an output directory holds, from its manifest alone, and the bytes of its shards.

Only shards the manifest lists are read: a file under ``.staging`` or one the manifest does not
name (a commit in progress, a leftover) is never opened. A stage that is not ``complete`` is an
error unless the caller asks for the committed shards of an unfinished stage.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from pipeline.errors import EmbedpipeError
from pipeline.output.contract import MANIFEST_NAME, STAGES


class DataError(EmbedpipeError):
    """An output directory cannot be read as asked: the message names the path and what to do."""


class StageIncomplete(DataError):
    """A stage is pending, running or failed, and reading its committed shards was not asked for."""


@dataclass(frozen=True)
class Shard:
    """One shard as the manifest records it: its name, rows, and its file in each stage read."""

    name: str
    rows: int
    files: dict[str, str]


@dataclass(frozen=True)
class Output:
    """The committed, non-empty shards of the stages read, in shard order, and their schemas."""

    root: str
    stages: tuple[str, ...]
    shards: tuple[Shard, ...]
    schemas: dict[str, pa.Schema]
    manifest: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict)


def normalize_stages(stages: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"tokens"``, ``"embeddings"``, ``"both"`` or a sequence of stage names, as a tuple in stage order."""
    if isinstance(stages, str):
        stages = STAGES if stages == "both" else (stages,)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise DataError(f"stages: {list(stages)!r}; choose from {list(STAGES)} or 'both'")
    return tuple(s for s in STAGES if s in stages)


def filesystem(root: str, storage_options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of ``root`` (a local path or a URL such as ``s3://`` or ``memory://``)."""
    return fsspec.core.url_to_fs(str(root), **(storage_options or {}))[0]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


def read_manifest(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of an output directory; DataError if there is none or it is not JSON."""
    path = _join(root, MANIFEST_NAME)
    fs = filesystem(root, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest; {root} is not an embedpipe output directory") from None
    except ValueError as exc:
        raise DataError(f"{path}: not a readable manifest ({exc})") from None


def _check_status(root: str, manifest: dict[str, Any], stage: str, allow_incomplete: bool) -> dict[str, Any]:
    record = manifest.get("stages", {}).get(stage) or {"status": "pending", "shards": {}}
    status = record.get("status", "pending")
    if status == "complete" or allow_incomplete:
        return record
    done, total = len(record.get("shards", {})), manifest.get("plan", {}).get("shards", "?")
    what = {
        "running": "is still running (or its job stopped before finishing): wait for it, or rerun the job",
        "failed": "failed: rerun the job to finish it",
        "interrupted": "was interrupted (SIGTERM or SIGINT): rerun the job to finish it",
    }.get(status, "has not started: run the job")
    raise StageIncomplete(
        f"{_join(root, stage)}: the {stage} stage {what}; {done} of {total} shards are committed. "
        "Pass allow_incomplete=True to read only the committed shards."
    )


def _shard_names(root: str, manifest: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
    """Shard names committed in every stage read; a stage pair must agree on rows and source."""
    names = sorted(set.intersection(*(set(r.get("shards", {})) for r in records.values())))
    if len(records) == 2:
        tokens, embeddings = records["tokens"]["shards"], records["embeddings"]["shards"]
        for name in names:
            made_from = embeddings[name].get("tokens_sha256")
            if made_from is not None and made_from != tokens[name]["sha256"]:
                raise DataError(f"{_join(root, 'embeddings', name)} was made from another version of "
                                f"{_join(root, 'tokens', name)}; rerun the job to re-embed it")
            if embeddings[name]["rows"] != tokens[name]["rows"]:
                raise DataError(f"{_join(root, 'embeddings', name)}: {embeddings[name]['rows']} rows, but its "
                                f"token shard has {tokens[name]['rows']}")
    return names


def _check_local_file(path: str, record: dict[str, Any]) -> None:
    """A listed shard must be on disk at its committed size (a cheap stat; `embedpipe verify` checks hashes)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise DataError(f"{path}: listed in the manifest but missing; rerun the job to rewrite it") from None
    if size != record["bytes"]:
        raise DataError(f"{path}: {size} bytes on disk but {record['bytes']} committed; rerun the job to rewrite it")


def read_schema(path: str, fs: fsspec.AbstractFileSystem) -> pa.Schema:
    """The schema of a shard, read from its first message only."""
    with fs.open(path, "rb") as fh:
        return pa.ipc.open_stream(fh).schema


def open_output(root: str, stages: str | tuple[str, ...] = "tokens", *, allow_incomplete: bool = False,
                storage_options: dict[str, Any] | None = None) -> Output:
    """List the committed shards of ``stages`` in an output directory (local path or fsspec URL).

    Raises:
        StageIncomplete: a stage is not complete and ``allow_incomplete`` is off.
        DataError: no manifest, no committed rows, or a listed shard is missing or of the wrong size.
    """
    root = str(root).rstrip("/") or "/"
    stages = normalize_stages(stages)
    manifest = read_manifest(root, storage_options)
    records = {stage: _check_status(root, manifest, stage, allow_incomplete) for stage in stages}
    fs = filesystem(root, storage_options)
    base = fs._strip_protocol(root) if _is_local(fs) else root  # "file:///x" -> "/x"
    shards = []
    for name in _shard_names(root, manifest, records):
        rows = records[stages[0]]["shards"][name]["rows"]
        if rows == 0:  # every row of the unit was quarantined: nothing to read
            continue
        files = {stage: _join(base, stage, name) for stage in stages}
        if _is_local(fs):
            for stage, path in files.items():
                _check_local_file(path, records[stage]["shards"][name])
        shards.append(Shard(name, rows, files))
    if not shards:
        raise DataError(f"{root}: no committed rows in {' and '.join(stages)} yet")
    schemas = {stage: read_schema(shards[0].files[stage], fs) for stage in stages}
    return Output(root, stages, tuple(shards), schemas, manifest, dict(storage_options or {}))


def committed_shards(root: str, stage: str = "tokens", *, allow_incomplete: bool = False,
                     storage_options: dict[str, Any] | None = None) -> list[str]:
    """Paths (or URLs) of the committed shards of one stage, in shard order: for other readers (Ray Data...)."""
    output = open_output(root, stage, allow_incomplete=allow_incomplete, storage_options=storage_options)
    return [shard.files[stage] for shard in output.shards]


def shard_buffer(path: str, fs: fsspec.AbstractFileSystem) -> pa.Buffer:
    """A shard's bytes: memory-mapped when local (no copy, pages shared between processes), else read whole."""
    if not _is_local(fs):
        return pa.py_buffer(fs.cat_file(path))
    with open(path, "rb") as fh:
        # A Python mmap outlives the file descriptor, so thousands of open shards hold no descriptors.
        return pa.py_buffer(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))


def read_table(path: str, columns: list[str] | None = None,
               storage_options: dict[str, Any] | None = None) -> pa.Table:
    """One shard as an Arrow table (memory-mapped when local): e.g. the read function of a Ray Data pipeline."""
    fs, stripped = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    table = pa.ipc.open_stream(shard_buffer(stripped if _is_local(fs) else str(path), fs)).read_all()
    return table.select(columns) if columns else table
