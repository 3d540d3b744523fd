"""The part both datasets share: an output directory's shards opened lazily, rows gathered, batches formatted."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.batch import Batch
from pipeline.data.columns import Column, ColumnSpec, Ragged, ShardReader, select_columns
from pipeline.data.layout import DataError, Output, filesystem, open_output, shard_buffer
from pipeline.output.embedding_format import arrow_to_numpy, decode_embeddings, field_dims
from pipeline.output.quantize import BINARY, SCALAR

Format = Literal["torch", "numpy"]
TokenDtype = Literal["int64", "stored"]
# Integer token columns widened to int64 by default: what embedding layers and HF models take.
TOKEN_INT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "length", "chunk", "position_ids")


class OutputReader:
    """Selected columns of an output directory's committed shards, gathered by (shard, row).

    Shards open on first use in each process (memory-mapped when local, fetched whole otherwise);
    with ``max_open_shards`` the least recently used are closed, which bounds the memory of a
    stream over object storage. Nothing is opened until rows are asked for, and the open shards are
    not pickled: DataLoader workers open their own.
    """

    def __init__(self, out_dir: str, stages: str | tuple[str, ...] = "tokens", columns: list[str] | None = None,
                 *, format: Format = "torch", token_dtype: TokenDtype = "int64", allow_incomplete: bool = False,
                 storage_options: dict[str, Any] | None = None, max_open_shards: int | None = None,
                 unpack_bits: bool = False, dequantize: bool = False) -> None:
        if format not in ("torch", "numpy"):
            raise DataError(f"format: {format!r}; choose 'torch' or 'numpy'")
        if token_dtype not in ("int64", "stored"):
            raise DataError(f"token_dtype: {token_dtype!r}; choose 'int64' or 'stored'")
        self.output: Output = open_output(out_dir, stages, allow_incomplete=allow_incomplete,
                                          storage_options=storage_options)
        self.specs: dict[str, ColumnSpec] = select_columns(self.output.schemas, columns)
        self.format, self.token_dtype, self.max_open_shards = format, token_dtype, max_open_shards
        # Quantized embedding columns decoded on the way out (see decode_embeddings): name -> its field.
        self.unpack_bits, self.dequantize = unpack_bits, dequantize
        self._decoded = {name: self.output.schemas[spec.stage].field(name) for name, spec in self.specs.items()
                         if (spec.stored in BINARY and (unpack_bits or dequantize))
                         or (spec.stored in SCALAR and dequantize)}
        self.shard_rows = np.array([s.rows for s in self.output.shards], dtype=np.int64)
        self.shard_starts = np.concatenate(([0], np.cumsum(self.shard_rows)))
        self._open: OrderedDict[int, ShardReader] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}

    @property
    def rows(self) -> int:
        return int(self.shard_starts[-1])

    def shard(self, index: int) -> ShardReader:
        """The reader of shard ``index``, opened on first use (least recently used closed past the limit)."""
        reader = self._open.get(index)
        if reader is not None:
            self._open.move_to_end(index)
            return reader
        fs = filesystem(self.output.root, self.output.storage_options)
        stages = {spec.stage for spec in self.specs.values()} or {self.output.stages[0]}
        files = {stage: shard_buffer(self.output.shards[index].files[stage], fs) for stage in stages}
        reader = ShardReader(files, self.specs)
        if reader.rows != self.output.shards[index].rows:
            raise DataError(f"{self.output.shards[index].files}: {reader.rows} rows, the manifest says "
                            f"{self.output.shards[index].rows}")
        self._open[index] = reader
        while self.max_open_shards and len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return reader

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within shard) of global row numbers; IndexError outside [-rows, rows)."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < -self.rows or index.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        index = np.where(index < 0, index + self.rows, index)
        shard = np.searchsorted(self.shard_starts, index, side="right") - 1
        return shard, index - self.shard_starts[shard]

    def delivered_dtype(self, spec: ColumnSpec) -> np.dtype:
        """Token integers widened to int64 unless stored dtypes were asked for; everything else as stored."""
        if self.token_dtype == "int64" and spec.name in TOKEN_INT_COLUMNS and spec.kind != "string":
            return np.dtype(np.int64)
        return spec.dtype

    def gather(self, shard: np.ndarray, local: np.ndarray) -> dict[str, Column]:
        """The selected columns of rows (shard[i], local[i]), in that order, in their delivered dtypes (numpy).

        Fixed-shape columns are written straight into the batch's arrays, converted on the way: one
        allocation per column whatever the number of shards the rows come from.
        """
        fixed = {name: np.empty((len(shard), *spec.shape), dtype=self.delivered_dtype(spec))
                 for name, spec in self.specs.items() if spec.kind == "fixed"}
        if not len(shard) or (shard == shard[0]).all():
            one = self.shard(int(shard[0]) if len(shard) else 0)
            out: dict[str, Column] = {**fixed, **one.gather(local, fixed)}
        else:
            order = np.argsort(shard, kind="stable")
            groups = np.split(order, np.flatnonzero(np.diff(shard[order])) + 1)
            parts = [self.shard(int(shard[group[0]])).gather(local[group], fixed, group) for group in groups]
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            out = {**fixed, **{name: _reorder([p[name] for p in parts], back) for name in parts[0]}}
        for name, value in out.items():
            if isinstance(value, Ragged):
                out[name] = value.astype(self.delivered_dtype(self.specs[name]), copy=False)
        for name, field in self._decoded.items():
            out[name] = decode_embeddings(out[name], field, unpack=self.unpack_bits, to_float=self.dequantize)
        return {name: out[name] for name in self.specs}

    def format_batch(self, columns: dict[str, Column]) -> Batch:
        """The gathered columns as the caller asked: tensors (bfloat16 decoded by a view) or numpy arrays."""
        out = Batch()
        for name, value in columns.items():
            if self.format == "torch" and isinstance(value, np.ndarray):
                value = to_tensor(value, None if name in self._decoded else self.specs[name].stored)
            out[name] = value
        return out


def _reorder(parts: list[Column], back: np.ndarray) -> Column:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)[back]
    if isinstance(parts[0], Ragged):
        return Ragged.concat(parts).take(back)
    flat = [item for part in parts for item in part]
    return [flat[i] for i in back]


def to_tensor(array: np.ndarray, stored: str | None = None) -> torch.Tensor:
    """A tensor sharing the array's memory; bfloat16 bit patterns (uint16) become torch.bfloat16 by a view."""
    if stored == "bfloat16":
        array = array.view(np.int16)  # same bits; torch reads int16 everywhere
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if stored == "bfloat16" else tensor


def arrow_to_tensor(array: pa.Array | pa.ChunkedArray, field: pa.Field) -> torch.Tensor:
    """An embedding column as a (N, D) or (N, L, D) tensor of its stored dtype (bfloat16 decoded as bfloat16).

    A single chunk is not copied: the tensor shares the Arrow buffer, which is read-only (do not write to it).
    """
    _, stored = field_dims(field)
    return to_tensor(arrow_to_numpy(array, field), stored)
