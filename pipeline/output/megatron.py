"""Megatron-LM's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), written streaming and committed atomically.

The layout is megatron-core's ``megatron/core/datasets/indexed_dataset.py`` (``_IndexWriter``/``_IndexReader``):

    PREFIX.bin  every sequence's tokens end to end, in the index's dtype, no header
    PREFIX.idx  b"MMIDIDX\\x00\\x00" | <Q version 1 | <B dtype code | <Q sequence count | <Q document count
                | int32 sequence lengths | int64 sequence pointers (byte offsets into .bin)
                | int64 document indices (0, then the sequence index ending each document)

One sequence per document here, so the document indices are 0, 1, ..., n (document count n + 1, as
megatron-core's builder writes it). The writer keeps nothing per document in memory: tokens go to the
.bin as they come, lengths to a side file, and the index is assembled from that file in chunks.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.output.commit import fsync_dir

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType
DTYPE_CODES = {np.dtype("uint8"): 1, np.dtype("int8"): 2, np.dtype("int16"): 3, np.dtype("int32"): 4,
               np.dtype("int64"): 5, np.dtype("float64"): 6, np.dtype("float32"): 7, np.dtype("uint16"): 8}
_CHUNK = 1 << 20  # sequences per index chunk: 20 MB of index in memory at most


class MegatronFormatError(ValueError):
    """A .bin/.idx pair that is not what the writer meant to write."""


class MegatronWriter:
    """Write ``PREFIX.bin``/``PREFIX.idx`` under temporary names beside them; :meth:`commit` checks and renames.

    Use as a context manager: leaving it without :meth:`commit` (an error) removes the temporary files.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no Megatron code")
        tag = uuid.uuid4().hex[:12]
        directory, name = self.prefix.parent, self.prefix.name
        self.bin_tmp = directory / f".{name}.bin.{tag}.tmp"
        self.idx_tmp = directory / f".{name}.idx.{tag}.tmp"
        self._lengths_tmp = directory / f".{name}.lengths.{tag}.tmp"
        self.sequences = 0
        self.tokens = 0
        self._bin_digest = hashlib.sha256()

    def __enter__(self) -> MegatronWriter:
        self._bin = open(self.bin_tmp, "wb")
        self._lengths = open(self._lengths_tmp, "wb")
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in (self._bin, self._lengths):
            fh.close()
        for path in (self.bin_tmp, self.idx_tmp, self._lengths_tmp):
            path.unlink(missing_ok=True)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append sequences: ``tokens`` end to end, cut by ``lengths`` (one document each)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but the lengths sum to {int(lengths.sum())}")
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._bin_digest.update(data)
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self.sequences += len(lengths)
        self.tokens += len(tokens)

    def _write_index(self) -> None:
        self._lengths.flush()
        itemsize = self.dtype.itemsize
        with open(self.idx_tmp, "wb") as idx:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", INDEX_VERSION))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", self.sequences))
            idx.write(struct.pack("<Q", self.sequences + 1))
            for chunk in _chunks(self._lengths_tmp, np.int32):
                idx.write(chunk.tobytes())
            pointer = 0
            for chunk in _chunks(self._lengths_tmp, np.int32):
                ends = pointer + np.cumsum(chunk, dtype=np.int64) * itemsize
                idx.write(np.concatenate(([pointer], ends[:-1])).astype(np.int64).tobytes())
                pointer = int(ends[-1])
            for start in range(0, self.sequences + 1, _CHUNK):
                idx.write(np.arange(start, min(start + _CHUNK, self.sequences + 1), dtype=np.int64).tobytes())
            idx.flush()
            os.fsync(idx.fileno())

    def commit(self) -> None:
        """fsync both files, read them back (:func:`check_megatron`), and rename both into place."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._write_index()
        check_megatron(self.bin_tmp, self.idx_tmp, self.sequences, self.tokens, self._bin_digest.hexdigest())
        os.replace(self.bin_tmp, self.prefix.with_name(self.prefix.name + ".bin"))
        os.replace(self.idx_tmp, self.prefix.with_name(self.prefix.name + ".idx"))
        fsync_dir(self.prefix.parent)


def _chunks(path: Path, dtype: type) -> Iterator[np.ndarray]:
    """The values of a flat binary file, a chunk at a time (a generator: memory stays at one chunk)."""
    itemsize = np.dtype(dtype).itemsize
    with open(path, "rb") as fh:
        while True:
            data = fh.read(_CHUNK * itemsize)
            if not data:
                return
            yield np.frombuffer(data, dtype=dtype)


def read_index_header(idx_path: str | Path) -> tuple[np.dtype, int, int]:
    """(dtype, sequence count, document count) from a .idx header."""
    with open(idx_path, "rb") as fh:
        head = fh.read(34)
    if len(head) < 34 or head[:9] != INDEX_HEADER:
        raise MegatronFormatError(f"{idx_path}: not a Megatron index (bad header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:34])
    codes = {v: k for k, v in DTYPE_CODES.items()}
    if version != INDEX_VERSION or code not in codes:
        raise MegatronFormatError(f"{idx_path}: version {version}, dtype code {code}: not what embedpipe reads")
    return codes[code], sequences, documents


def check_megatron(bin_path: str | Path, idx_path: str | Path, sequences: int, tokens: int, bin_sha256: str) -> None:
    """Read a .bin/.idx pair back: header, sizes, pointers, document indices and the .bin's digest.

    Raises:
        MegatronFormatError: any of them is not what was written.
    """
    dtype, count, documents = read_index_header(idx_path)
    if count != sequences or documents != sequences + 1:
        raise MegatronFormatError(f"{idx_path}: {count} sequences, {documents} documents; wrote {sequences}")
    expected = 34 + count * (4 + 8) + documents * 8
    if os.path.getsize(idx_path) != expected:
        raise MegatronFormatError(f"{idx_path}: {os.path.getsize(idx_path)} bytes, expected {expected}")
    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = index[34:34 + 4 * count].view(np.int32)
    pointers = index[34 + 4 * count:34 + 12 * count].view(np.int64)
    doc_index = index[34 + 12 * count:].view(np.int64)
    want = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64))) * dtype.itemsize if count else pointers
    if not np.array_equal(pointers, want) or int(lengths.sum(dtype=np.int64)) != tokens:
        raise MegatronFormatError(f"{idx_path}: sequence pointers or lengths disagree with the tokens written")
    if not np.array_equal(doc_index, np.arange(documents)):
        raise MegatronFormatError(f"{idx_path}: document indices are not 0..{sequences}")
    if os.path.getsize(bin_path) != tokens * dtype.itemsize:
        raise MegatronFormatError(f"{bin_path}: {os.path.getsize(bin_path)} bytes for {tokens} tokens")
    digest = hashlib.sha256()
    with open(bin_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != bin_sha256:
        raise MegatronFormatError(f"{bin_path}: read back, its bytes differ from those written")
