"""The one atomic commit path: bytes to a file under a staging name, fsynced, renamed into place.

On an object store the bytes are uploaded whole in one call (an object appears only when its upload
completes). A reader therefore sees either no file or a whole one. No Arrow here: ``status``,
``plan`` and the manifest use this without importing pyarrow (:mod:`pipeline.output.shards` adds
Arrow shards on top).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.faults import fault_point
from pipeline.output.contract import STAGING_DIR
from pipeline.output.storage import Location, is_remote, output_path, put_object


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
