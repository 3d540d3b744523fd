"""The Arrow side of embedding shards, without torch: stored dtypes, the field, wrapping and reading its values.

An embedding column is a fixed-size list of D values per row (pooled output) or of L fixed-size lists of
D values (per-token output). numpy and Arrow have no bfloat16, so bfloat16 is stored as its 16-bit pattern
in uint16 (exact, and half the bytes of float32); the field metadata ``embedpipe.dtype`` names the stored
dtype, which is how readers tell those bits from plain uint16.

Quantized dtypes (:mod:`pipeline.output.quantize`): ``int8`` / ``uint8`` store D values of that type, and
the field metadata ``embedpipe.quantize_ranges`` holds the (2, D) calibration ranges (JSON), so a reader
can map them back to approximate floats from the shard alone; ``binary`` / ``ubinary`` store the bits
packed 8 per byte (ceil(D / 8) int8 / uint8 values), and ``embedpipe.dim`` says D.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import pyarrow as pa

from pipeline.output.contract import DIM_METADATA_KEY, DTYPE_METADATA_KEY, RANGES_METADATA_KEY
from pipeline.output.quantize import BINARY, QUANTIZED, SCALAR, dequantize, packed_width, unpack_bits

OutputDtype = Literal["float32", "float16", "bfloat16", "int8", "uint8", "binary", "ubinary"]
FLOAT_DTYPES = ("float32", "float16", "bfloat16")

NUMPY_DTYPES: dict[str, type] = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
                                 "int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
ARROW_DTYPES: dict[str, pa.DataType] = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16(),
                                        "int8": pa.int8(), "uint8": pa.uint8(), "binary": pa.int8(),
                                        "ubinary": pa.uint8()}


def embedding_arrow_field(name: str, dim: int, seq_len: int | None, output_dtype: OutputDtype,
                          ranges: np.ndarray | None = None) -> pa.Field:
    """The Arrow field of an embedding column: D values per row, or L x D for per-token output.

    ``binary`` / ``ubinary`` rows hold ceil(D / 8) packed bytes; ``ranges`` (int8 / uint8) go into the metadata.
    """
    metadata = {DTYPE_METADATA_KEY: output_dtype.encode()}
    width = dim
    if output_dtype in BINARY:
        width = packed_width(dim)
        metadata[DIM_METADATA_KEY] = str(dim).encode()
    if output_dtype in SCALAR and ranges is not None:
        metadata[RANGES_METADATA_KEY] = json.dumps(np.asarray(ranges, np.float32).tolist()).encode()
    value_type = pa.list_(ARROW_DTYPES[output_dtype], width)
    if seq_len is not None:
        value_type = pa.list_(value_type, seq_len)
    return pa.field(name, value_type, metadata=metadata)


def vector_dim(field: pa.Field) -> int:
    """D, the dimensions of each vector (for binary / ubinary: the bits, not the packed bytes)."""
    dims, stored = field_dims(field)
    if stored in BINARY:
        return int((field.metadata or {}).get(DIM_METADATA_KEY, str(dims[-1] * 8).encode()))
    return dims[-1]


def field_ranges(field: pa.Field) -> np.ndarray | None:
    """The (2, D) float32 calibration ranges of an int8 / uint8 embedding field, if it records them."""
    raw = (field.metadata or {}).get(RANGES_METADATA_KEY)
    return None if raw is None else np.asarray(json.loads(raw), dtype=np.float32)


def decode_embeddings(values: np.ndarray, field: pa.Field, *, unpack: bool = False,
                      to_float: bool = False) -> np.ndarray:
    """Stored embedding values (as :func:`arrow_to_numpy` gives them) decoded as asked.

    ``unpack``: binary / ubinary bits as (..., D) uint8 0/1. ``to_float``: float32 of every dtype:
    bfloat16 widened exactly, int8 / uint8 mapped back through the field's ranges (approximately, the
    bottom of each step), binary / ubinary bits as -1 / +1. Other dtypes are returned as stored.
    """
    _, stored = field_dims(field)
    if stored in BINARY and (unpack or to_float):
        bits = unpack_bits(values, stored, vector_dim(field))
        return bits.astype(np.float32) * 2 - 1 if to_float else bits
    if not to_float:
        return values
    if stored == "bfloat16":
        return bfloat16_bits_to_float32(values)
    if stored in SCALAR:
        ranges = field_ranges(field)
        return values.astype(np.float32) if ranges is None else dequantize(values, stored, ranges)
    return values.astype(np.float32, copy=False)


def field_dims(field: pa.Field) -> tuple[list[int], OutputDtype]:
    """The fixed-size dims ([D] or [L, D]) and stored dtype of an embedding field.

    Raises:
        ValueError: the field is not an embedpipe embedding column.
    """
    dims, value_type = [], field.type
    while pa.types.is_fixed_size_list(value_type):
        dims.append(value_type.list_size)
        value_type = value_type.value_type
    stored = (field.metadata or {}).get(DTYPE_METADATA_KEY, b"").decode()
    if stored not in ARROW_DTYPES or ARROW_DTYPES[stored] != value_type:
        raise ValueError(
            f"field {field.name!r}: {value_type} values with embedpipe.dtype {stored!r} are not embedpipe embeddings"
        )
    return dims, stored  # type: ignore[return-value]


def embeddings_to_arrow(embeddings: np.ndarray, field: pa.Field) -> pa.Array:
    """Wrap an (N, D) or (N, L, D) array as the field's fixed-size-list array, without copying its buffer."""
    dims, stored = field_dims(field)
    if embeddings.dtype != NUMPY_DTYPES[stored] or list(embeddings.shape[1:]) != dims:
        raise ValueError(f"embeddings of {embeddings.dtype} {embeddings.shape} do not fit field {field.type}")
    flat = np.ascontiguousarray(embeddings).reshape(-1)  # a view when already contiguous
    array = pa.Array.from_buffers(ARROW_DTYPES[stored], len(flat), [None, pa.py_buffer(flat)])
    for size in reversed(dims):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def arrow_to_numpy(array: pa.Array | pa.ChunkedArray, field: pa.Field) -> np.ndarray:
    """An embedding column as an (N, D) or (N, L, D) array of its stored numpy dtype (bfloat16 as uint16 bits).

    A single chunk is not copied: the array views the Arrow buffer, which is read-only.
    """
    dims, _ = field_dims(field)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if array.null_count:
        raise ValueError(f"field {field.name!r}: {array.null_count} null embeddings")
    values = array
    for _ in dims:
        values = values.flatten()  # honours slice offsets
    return values.to_numpy(zero_copy_only=True).reshape(len(array), *dims)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32: the same value, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def count_nonfinite(embeddings: np.ndarray, output_dtype: OutputDtype) -> np.ndarray:
    """Per row, how many values are NaN or infinite (float16 output overflows to inf past 65504; quantized
    values are integers, never NaN: count the float vectors before quantizing)."""
    if output_dtype in QUANTIZED:
        return np.zeros(len(embeddings), np.int64)
    if output_dtype == "bfloat16":
        exponent = np.uint16(0x7F80)  # all exponent bits set: inf or NaN
        bad = (embeddings & exponent) == exponent
    else:
        bad = ~np.isfinite(embeddings)
    if not len(embeddings):  # a shard whose rows were all quarantined (numpy cannot infer -1 next to 0)
        return np.zeros(0, np.int64)
    return bad.reshape(len(embeddings), -1).sum(axis=1)
