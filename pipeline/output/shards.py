"""Shard files: Arrow IPC streams committed atomically, read back, and the ``datasets`` metadata.

A shard is serialized in memory as an Arrow IPC *stream* (what ``datasets``
memory-maps), checksummed, and committed by :func:`pipeline.output.commit.commit_bytes`
(staging name, fsync, rename; one whole upload on an object store). A reader
therefore sees either no shard or a whole one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.output.commit import CommittedFile, commit_bytes, file_sha256
from pipeline.output.contract import DATASET_INFO_NAME, DATASET_STATE_NAME
from pipeline.output.features import dataset_features
from pipeline.output.storage import Location, is_remote, output_path

# Rows per IPC record batch, as datasets' ArrowWriter does by default.
BATCH_ROWS = 1000


def serialize_table(table: pa.Table) -> pa.Buffer:
    """The table as Arrow IPC stream bytes, cut into record batches of BATCH_ROWS rows."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=BATCH_ROWS)
    return sink.getvalue()


def write_shard(table: pa.Table, final_path: Path) -> CommittedFile:
    """Serialize and atomically commit one shard."""
    return commit_bytes(memoryview(serialize_table(table)), final_path)


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


def write_dataset_metadata(directory: Location, schema: pa.Schema, shard_names: list[str], fingerprint: str) -> None:
    """Write ``dataset_info.json`` and ``state.json`` so that ``datasets.load_from_disk`` reads the shards."""
    info = {"citation": "", "description": "", "features": dataset_features(schema), "homepage": "", "license": ""}
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
