"""Columns of a memory-mapped shard as numpy views, and gathering rows from them in one vectorized step.

A shard is an Arrow IPC stream of record batches (1,000 rows each), so a column's values lie in one
buffer per batch, all inside the shard's file buffer. A fixed-shape column (``input_ids`` of a
``max_length`` shard, an embedding) is read through a *sliding-window* view of the file: row ``r`` of
batch ``c`` is the window starting at that batch's offset plus ``r`` row sizes, so one numpy fancy
index copies a whole batch of rows from any record batches, without touching the rest of the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import pyarrow as pa

from pipeline.data.layout import DataError
from pipeline.output.contract import DTYPE_METADATA_KEY

Kind = Literal["fixed", "ragged", "string"]


@dataclass(frozen=True)
class Ragged:
    """Rows of different lengths: all values end to end, and ``offsets`` (rows + 1) where each row starts."""

    values: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.values[self.offsets[row]:self.offsets[row + 1]]

    def to_list(self) -> list[np.ndarray]:
        return [self[i] for i in range(len(self))]

    def astype(self, dtype: np.dtype, copy: bool = True) -> Ragged:
        return Ragged(self.values.astype(dtype, copy=copy), self.offsets)

    def take(self, rows: np.ndarray) -> Ragged:
        """The given rows, in that order (one vectorized gather)."""
        starts, lengths = self.offsets[rows], self.lengths[rows]
        return Ragged(self.values[segment_indices(starts, lengths)], _offsets(lengths))

    @staticmethod
    def from_rows(rows: list[np.ndarray]) -> Ragged:
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        values = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return Ragged(values, _offsets(lengths))

    @staticmethod
    def concat(parts: list[Ragged]) -> Ragged:
        lengths = np.concatenate([p.lengths for p in parts])
        return Ragged(np.concatenate([p.values for p in parts]), _offsets(lengths))


Column = Union[np.ndarray, Ragged, list]


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def segment_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the values of each segment [start, start + length), end to end."""
    offsets = _offsets(lengths)
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])


@dataclass(frozen=True)
class ColumnSpec:
    """A column to read: which stage holds it, how it is laid out, its element dtype and per-row shape."""

    name: str
    stage: str
    kind: Kind
    dtype: np.dtype | None = None
    shape: tuple[int, ...] = ()
    stored: str | None = None  # embedpipe.dtype of an embedding column (bfloat16 travels as uint16)


def column_spec(name: str, stage: str, field: pa.Field) -> ColumnSpec:
    """How to read ``field``: strings, variable-length lists, or fixed shapes of numbers."""
    value_type = field.type
    if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
        return ColumnSpec(name, stage, "string")
    if pa.types.is_list(value_type) and pa.types.is_string(value_type.value_type):  # a packed block's documents
        return ColumnSpec(name, stage, "string")
    kind: Kind = "fixed"
    if pa.types.is_list(value_type) or pa.types.is_large_list(value_type):
        kind, value_type = "ragged", value_type.value_type
    dims = []
    while kind == "fixed" and pa.types.is_fixed_size_list(value_type):
        dims.append(value_type.list_size)
        value_type = value_type.value_type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
        raise DataError(f"column {name!r} of {stage}: {field.type} is not a layout this reader knows")
    stored = (field.metadata or {}).get(DTYPE_METADATA_KEY)
    return ColumnSpec(name, stage, kind, np.dtype(value_type.to_pandas_dtype()), tuple(dims),
                      stored.decode() if stored else None)


def select_columns(schemas: dict[str, pa.Schema], columns: list[str] | None) -> dict[str, ColumnSpec]:
    """Specs of the asked columns (default: every column but the string ``id``); shared names come from tokens."""
    available: dict[str, ColumnSpec] = {}
    for stage, schema in schemas.items():
        for field in schema:
            available.setdefault(field.name, column_spec(field.name, stage, field))
    names = [n for n in available if n != "id"] if columns is None else list(columns)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DataError(f"columns {unknown} are not in {' + '.join(schemas)}; available: {list(available)}")
    return {name: available[name] for name in names}


def _address(values: pa.Array, base: pa.Buffer, what: str) -> int:
    """Byte offset of an array's first value inside the file buffer."""
    if values.null_count:
        raise DataError(f"{what}: {values.null_count} null values")
    data = values.buffers()[1]
    offset = data.address + values.offset * values.type.bit_width // 8 - base.address
    if not 0 <= offset <= base.size:
        raise DataError(f"{what}: values are not stored in the shard file (compressed shards are not supported)")
    return offset


@dataclass(frozen=True)
class FixedView:
    """A fixed-shape column of one shard: per record batch the offset of its rows in a sliding-window view."""

    windows: np.ndarray  # (positions, row_units): window i = the row-sized run of units starting at unit i
    batch_units: np.ndarray  # first unit of each record batch's values
    row_units: int
    spec: ColumnSpec

    @staticmethod
    def build(chunks: list[pa.Array], file: pa.Buffer, spec: ColumnSpec) -> FixedView:
        row_bytes = spec.dtype.itemsize * math.prod(spec.shape)
        offsets = []
        for chunk in chunks:
            values = chunk
            for _ in spec.shape:
                values = values.flatten()  # honours slice offsets
            offsets.append(_address(values, file, spec.name))
        # The widest unit (up to 8 bytes) dividing every offset and the row size: fewer, wider copies.
        unit = math.gcd(row_bytes, *offsets, 8)
        words = np.frombuffer(file, dtype=f"u{unit}", count=file.size // unit)
        row_units = row_bytes // unit
        windows = np.lib.stride_tricks.as_strided(
            words, shape=(max(len(words) - row_units + 1, 0), row_units), strides=(unit, unit), writeable=False)
        return FixedView(windows, np.asarray(offsets, dtype=np.int64) // unit, row_units, spec)

    def gather(self, batch: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Rows ``local`` of record batches ``batch`` as a fresh (n, *shape) array of the stored dtype."""
        picked = self.windows[self.batch_units[batch] + local * self.row_units]
        return picked.view(self.spec.dtype).reshape(len(local), *self.spec.shape)

    def gather_into(self, target: np.ndarray, at: np.ndarray | slice, batch: np.ndarray, local: np.ndarray) -> None:
        """Write the rows into ``target[at]``, converting to its dtype on the way (no intermediate batch)."""
        target[at] = self.gather(batch, local)


@dataclass(frozen=True)
class RaggedView:
    """A variable-length list column of one shard: each row's first value and length in a flat file view."""

    values: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    @staticmethod
    def build(chunks: list[pa.Array], file: pa.Buffer, spec: ColumnSpec) -> RaggedView:
        itemsize = spec.dtype.itemsize
        starts, lengths = [], []
        for chunk in chunks:
            offsets = chunk.offsets.to_numpy().astype(np.int64)
            first = _address(chunk.values, file, spec.name)
            if first % itemsize:
                raise DataError(f"{spec.name}: values not aligned to {itemsize} bytes in the shard file")
            starts.append(first // itemsize + offsets[:-1])
            lengths.append(np.diff(offsets))
        values = np.frombuffer(file, dtype=spec.dtype, count=file.size // itemsize)
        return RaggedView(values, np.concatenate(starts), np.concatenate(lengths))

    def gather(self, rows: np.ndarray) -> Ragged:
        lengths = self.lengths[rows]
        return Ragged(self.values[segment_indices(self.starts[rows], lengths)], _offsets(lengths))


class ShardReader:
    """The asked columns of one shard (one file per stage), gathered by row number."""

    def __init__(self, files: dict[str, pa.Buffer], specs: dict[str, ColumnSpec]) -> None:
        self._files = files  # keeps the memory maps alive as long as the views
        tables = {stage: pa.ipc.open_stream(buffer).read_all() for stage, buffer in files.items()}
        self._batch_starts = {}
        for stage, table in tables.items():
            sizes = [len(chunk) for chunk in table.column(0).chunks]
            self._batch_starts[stage] = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        self.rows = tables[next(iter(tables))].num_rows
        self._views: dict[str, FixedView | RaggedView | pa.ChunkedArray] = {}
        for name, spec in specs.items():
            column = tables[spec.stage].column(name)
            if spec.kind == "string":
                self._views[name] = column
            elif spec.kind == "ragged":
                self._views[name] = RaggedView.build(column.chunks, files[spec.stage], spec)
            else:
                self._views[name] = FixedView.build(column.chunks, files[spec.stage], spec)
        self._specs = specs

    def gather(self, rows: np.ndarray, into: dict[str, np.ndarray] | None = None,
               at: np.ndarray | slice = slice(None)) -> dict[str, Column]:
        """The asked columns at shard rows ``rows`` (in that order): arrays, Ragged, or lists of str.

        Fixed-shape columns that have an array in ``into`` are written to ``into[name][at]`` instead of
        being returned: a batch drawn from many shards is then assembled without intermediate copies.
        """
        located = {}
        for stage, starts in self._batch_starts.items():
            batch = np.searchsorted(starts, rows, side="right") - 1
            located[stage] = (batch, rows - starts[batch])
        out: dict[str, Column] = {}
        for name, view in self._views.items():
            if isinstance(view, FixedView):
                where = located[self._specs[name].stage]
                if into is not None and name in into:
                    view.gather_into(into[name], at, *where)
                else:
                    out[name] = view.gather(*where)
            elif isinstance(view, RaggedView):
                out[name] = view.gather(rows)
            else:
                out[name] = view.take(pa.array(rows)).to_pylist()
        return out
