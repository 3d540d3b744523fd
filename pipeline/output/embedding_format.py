"""The Arrow side of embedding shards, without torch: stored dtypes, the field, wrapping and reading its values.

An embedding column is a fixed-size list of D values per row (pooled output) or of L fixed-size lists of
D values (per-token output). numpy and Arrow have no bfloat16, so bfloat16 is stored as its 16-bit pattern
in uint16 (exact, and half the bytes of float32); the field metadata ``embedpipe.dtype`` names the stored
dtype, which is how readers tell those bits from plain uint16.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa

from pipeline.output.contract import DTYPE_METADATA_KEY

OutputDtype = Literal["float32", "float16", "bfloat16"]

NUMPY_DTYPES: dict[str, type] = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
ARROW_DTYPES: dict[str, pa.DataType] = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}


def embedding_arrow_field(name: str, dim: int, seq_len: int | None, output_dtype: OutputDtype) -> pa.Field:
    """The Arrow field of an embedding column: D values per row, or L x D for per-token output."""
    value_type = pa.list_(ARROW_DTYPES[output_dtype], dim)
    if seq_len is not None:
        value_type = pa.list_(value_type, seq_len)
    return pa.field(name, value_type, metadata={DTYPE_METADATA_KEY: output_dtype.encode()})


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
    """Per row, how many values are NaN or infinite (float16 output overflows to inf past 65504)."""
    if output_dtype == "bfloat16":
        exponent = np.uint16(0x7F80)  # all exponent bits set: inf or NaN
        bad = (embeddings & exponent) == exponent
    else:
        bad = ~np.isfinite(embeddings)
    if not len(embeddings):  # a shard whose rows were all quarantined (numpy cannot infer -1 next to 0)
        return np.zeros(0, np.int64)
    return bad.reshape(len(embeddings), -1).sum(axis=1)
