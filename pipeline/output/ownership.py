"""Which entries of an output directory embedpipe wrote, and removing only those.

The rule (README "Nothing lost"): OUT must be absent, empty, or an embedpipe output (its
``manifest.json`` is embedpipe's). Inside an embedpipe output embedpipe owns its manifest, lock and
reports, and in each stage folder and ``quarantine/`` the files it names (shards, the datasets
metadata, quarantine files, the ``.staging`` folder); everything else is the user's and is never
deleted or overwritten, ``--force`` or not.
"""

from __future__ import annotations

from typing import Any

from pipeline.output.contract import (
    DATASET_INFO_NAME,
    DATASET_STATE_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    QUARANTINE_DIR,
    QUARANTINE_FILE,
    REPORT_FILE,
    REPORTS_DIR,
    SHARD_FILE,
    STAGES,
    STAGING_DIR,
)
from pipeline.output.storage import is_remote, remove_tree

_FOLDERS_WRITTEN = (*STAGES, QUARANTINE_DIR)


def _owned_in(folder: str, name: str) -> bool:
    """Whether embedpipe names a file ``name`` inside its ``folder``."""
    if name == STAGING_DIR:
        return True
    if folder in STAGES:
        return bool(SHARD_FILE.fullmatch(name)) or name in (DATASET_INFO_NAME, DATASET_STATE_NAME)
    if folder == QUARANTINE_DIR:
        return bool(QUARANTINE_FILE.fullmatch(name))
    if folder == REPORTS_DIR:
        return bool(REPORT_FILE.fullmatch(name))
    return False


def _children(path: Any) -> list[Any]:
    try:
        return sorted(path.iterdir(), key=lambda p: p.name) if path.is_dir() else []
    except FileNotFoundError:
        return []


def foreign_entries(out_dir: Any) -> list[str]:
    """Entries of ``out_dir`` (relative paths) that embedpipe would not have written, sorted."""
    foreign = []
    for entry in _children(out_dir):
        if entry.name in (MANIFEST_NAME, LOCK_NAME):
            continue
        if entry.name in (*_FOLDERS_WRITTEN, REPORTS_DIR) and entry.is_dir():
            foreign += [f"{entry.name}/{child.name}" for child in _children(entry)
                        if not _owned_in(entry.name, child.name)]
        else:
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def files_in_the_way(out_dir: Any) -> list[str]:
    """Files at the paths a new job writes (its stage and quarantine folders): ones it must never overwrite.

    Used where ``out_dir`` holds no embedpipe manifest, so nothing in it can be taken as embedpipe's.
    """
    found = []
    for folder in _FOLDERS_WRITTEN:
        for child in _children(out_dir / folder):
            if not (child.name == STAGING_DIR and not _children(child)):
                found.append(f"{folder}/{child.name}")
    if (out_dir / MANIFEST_NAME).exists():
        found.insert(0, MANIFEST_NAME)
    return found


def remove_owned(out_dir: Any, folders: tuple[str, ...]) -> list[str]:
    """Delete what embedpipe wrote in ``folders`` of ``out_dir``; keep everything else. Returns what went."""
    removed = []
    for folder in folders:
        directory = out_dir / folder
        for child in _children(directory):
            if _owned_in(folder, child.name):
                remove_tree(child)
                removed.append(f"{folder}/{child.name}")
        if not is_remote(directory) and directory.is_dir() and not _children(directory):
            directory.rmdir()
    return removed
