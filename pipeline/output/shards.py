"""Shard files: the one atomic commit path, and the ``datasets`` metadata.

A shard is serialized in memory as an Arrow IPC *stream* (what ``datasets``
memory-maps), checksummed, written under a staging name, fsynced, and renamed
into place; on an object store, uploaded whole in one call (an object appears
only when its upload completes). A reader therefore sees either no shard or a
whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.faults import fault_point
from pipeline.output.contract import DATASET_INFO_NAME, DATASET_STATE_NAME, STAGING_DIR
from pipeline.output.storage import Location, is_remote, output_path, put_object

# Rows per IPC record batch, as datasets' ArrowWriter does by default.
BATCH_ROWS = 1000


@dataclass(frozen=True)
class CommittedFile:
    """What a commit wrote: final path, size and sha256 of the bytes on disk."""

    path: str
    bytes: int
    sha256: str


def fsync_dir(path: Path) -> None:
    """fsync a local directory, so that the renames into it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_bytes(data: bytes | memoryview, final_path: Location) -> CommittedFile:
    """Write ``data`` to ``final_path`` atomically: staging name, fsync, rename, fsync the directory.

    On any failure the staging file is removed and nothing appears at ``final_path``. On an object
    store the bytes are uploaded whole in one call (see :func:`pipeline.output.storage.put_object`).
    """
    if is_remote(final_path):
        return _commit_object(data, final_path)
    staging = final_path.parent / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"{final_path.name}.{uuid.uuid4().hex}.tmp"
    digest = hashlib.sha256(data).hexdigest()
    try:
        with open(tmp, "wb") as fh:
            fault_point("commit.write")
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fault_point("commit.before_rename")
        os.replace(tmp, final_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # name the file for the message (a full disk says nothing of where)
            raise OSError(exc.errno, exc.strerror, str(final_path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final_path.parent)
    return CommittedFile(str(final_path), len(data), digest)


def _commit_object(data: bytes | memoryview, final_path: Any) -> CommittedFile:
    digest = hashlib.sha256(data).hexdigest()
    try:
        fault_point("commit.write")
        fault_point("commit.before_rename")
        put_object(final_path, data)
    except OSError as exc:
        raise OSError(exc.errno, f"upload failed: {exc.strerror or exc}", str(final_path)) from exc
    return CommittedFile(str(final_path), len(data), digest)


def serialize_table(table: pa.Table) -> pa.Buffer:
    """The table as Arrow IPC stream bytes, cut into record batches of BATCH_ROWS rows."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=BATCH_ROWS)
    return sink.getvalue()


def write_shard(table: pa.Table, final_path: Path) -> CommittedFile:
    """Serialize and atomically commit one shard."""
    return commit_bytes(memoryview(serialize_table(table)), final_path)


def write_jsonl(records: list[dict], final_path: Path) -> CommittedFile:
    """Atomically commit a JSON-lines file."""
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    return commit_bytes(text.encode("utf-8"), final_path)


def file_sha256(path: Path | str) -> str:
    """sha256 of a file (local or remote), read in blocks."""
    digest = hashlib.sha256()
    with output_path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_shard(path: Path | str) -> pa.Table:
    """Read a whole shard (memory-mapped when local, fetched whole when remote)."""
    return read_shard_and_sha256(path, checksum=False)[0]


def read_shard_and_sha256(path: Path | str, checksum: bool = True) -> tuple[pa.Table, str | None]:
    """Read a whole shard and (with ``checksum``) the sha256 of its bytes, fetching a remote shard once.

    Raises:
        InputError: the file is not a readable Arrow IPC stream (damaged or truncated).
    """
    path = output_path(path)
    try:
        if is_remote(path):
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest() if checksum else None
            return pa.ipc.open_stream(pa.py_buffer(data)).read_all(), digest
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: not a readable Arrow shard ({exc}); it is damaged: `embedpipe verify` "
                         "lists such shards and a rerun of the job redoes them") from None
    return table, file_sha256(path) if checksum else None


def clean_staging(directory: Location) -> int:
    """Remove leftovers of interrupted commits; returns how many files went (none on an object store)."""
    if is_remote(directory):
        return 0
    staging = directory / STAGING_DIR
    if not staging.is_dir():
        return 0
    removed = 0
    for leftover in staging.iterdir():
        leftover.unlink()
        removed += 1
    return removed


def write_dataset_metadata(directory: Location, schema: pa.Schema, shard_names: list[str], fingerprint: str) -> None:
    """Write ``dataset_info.json`` and ``state.json`` so that ``datasets.load_from_disk`` reads the shards."""
    from datasets import Features  # only here: importing datasets costs seconds

    features = Features.from_arrow_schema(schema)
    info = {"citation": "", "description": "", "features": features.to_dict(), "homepage": "", "license": ""}
    state = {
        "_data_files": [{"filename": name} for name in shard_names],
        "_fingerprint": fingerprint[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    commit_bytes(json.dumps(info, indent=2, sort_keys=True).encode(), directory / DATASET_INFO_NAME)
    commit_bytes(json.dumps(state, indent=2, sort_keys=True).encode(), directory / DATASET_STATE_NAME)
