"""Shard files: names, the one atomic commit path, and the ``datasets`` metadata.

A shard is serialized in memory as an Arrow IPC *stream* (what ``datasets``
memory-maps), checksummed, written under a staging name, fsynced, and renamed
into place. A reader therefore sees either no shard or a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.faults import fault_point

STAGING_DIR = ".staging"
# Rows per IPC record batch, as datasets' ArrowWriter does by default.
BATCH_ROWS = 1000


def shard_name(index: int, total: int) -> str:
    """``data-0000i-of-0000N.arrow``, the datasets naming scheme."""
    return f"data-{index:05d}-of-{total:05d}.arrow"


@dataclass(frozen=True)
class CommittedFile:
    """What a commit wrote: final path, size and sha256 of the bytes on disk."""

    path: str
    bytes: int
    sha256: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_bytes(data: bytes | memoryview, final_path: Path) -> CommittedFile:
    """Write ``data`` to ``final_path`` atomically: staging name, fsync, rename, fsync the directory.

    On any failure the staging file is removed and nothing appears at ``final_path``.
    """
    final_path = Path(final_path)
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
    _fsync_dir(final_path.parent)
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


def file_sha256(path: Path) -> str:
    """sha256 of a file on disk, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_shard(path: Path) -> pa.Table:
    """Read a whole shard (memory-mapped)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def clean_staging(directory: Path) -> int:
    """Remove leftovers of interrupted commits; returns how many files went."""
    staging = Path(directory) / STAGING_DIR
    if not staging.is_dir():
        return 0
    removed = 0
    for leftover in staging.iterdir():
        leftover.unlink()
        removed += 1
    return removed


def write_dataset_metadata(directory: Path, schema: pa.Schema, shard_names: list[str], fingerprint: str) -> None:
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
    directory = Path(directory)
    commit_bytes(json.dumps(info, indent=2, sort_keys=True).encode(), directory / "dataset_info.json")
    commit_bytes(json.dumps(state, indent=2, sort_keys=True).encode(), directory / "state.json")
