"""Reading rows of a Parquet or Arrow file from a row range, and hashing what was read.

Dictionary-encoded, ``large_string`` and ``string_view`` text and id columns are decoded to plain strings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import fsspec
import fsspec.utils
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.inputs.files import DEFAULT_RULES, BadRow, InputFile, RowBatch, TextRules, reading
from pipeline.inputs.lines import _raw_text, _row_id

log = logging.getLogger("embedpipe")


def open_arrow(uri: str) -> Any:
    """Open an Arrow IPC file or stream (what ``datasets`` writes) as a record batch reader."""
    source = pa.memory_map(uri) if "://" not in uri else fsspec.open(uri, "rb").open()
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        file_reader = pa.ipc.open_file(source)
        return pa.RecordBatchReader.from_batches(
            file_reader.schema, (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        )


def columnar_row_counts(file: InputFile) -> list[int]:
    """Rows per row group (Parquet) or per record batch (Arrow): the grain units are cut at."""
    with reading(file, f"({file.format})"):
        if file.format == "parquet":
            with fsspec.open(file.uri, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        with open_arrow(file.uri) as reader:
            return [batch.num_rows for batch in reader]


def _columnar_table(file: InputFile, first_row: int, num_rows: int, columns: list[str]) -> pa.Table:
    if file.format == "parquet":
        with fsspec.open(file.uri, "rb") as fh:
            pf = pq.ParquetFile(fh)
            meta, groups, start = pf.metadata, [], 0
            skip = None
            for i in range(meta.num_row_groups):
                stop = start + meta.row_group(i).num_rows
                if stop > first_row and start < first_row + num_rows:
                    groups.append(i)
                    skip = start if skip is None else skip
                start = stop
            table = pf.read_row_groups(groups, columns=columns) if groups else pf.schema_arrow.empty_table()
            return table.slice(first_row - (skip or 0), num_rows)
    batches, start = [], 0
    with open_arrow(file.uri) as reader:
        for batch in reader:
            stop = start + batch.num_rows
            if stop > first_row and start < first_row + num_rows:
                batches.append(batch.select(columns))
            start = stop
            if start >= first_row + num_rows:
                break
    schema = batches[0].schema if batches else None
    table = pa.Table.from_batches(batches, schema=schema) if batches else None
    if table is None:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    skip = first_row - (start - sum(b.num_rows for b in batches))
    return table.slice(skip, num_rows)


def _decoded(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns decoded, and large_string / string_view cast to large_string."""
    for i, column in enumerate(table.columns):
        kind = column.type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
            kind = pa.large_string() if not pa.types.is_string(kind) else kind
        if kind != column.type:
            table = table.set_column(i, table.field(i).name, column.cast(kind))
    return table


def columns_read(text_column: str, id_column: str | None) -> list[str]:
    """The columns the readers take from a Parquet or Arrow file, in order."""
    return [text_column] + ([id_column] if id_column and id_column != text_column else [])


def read_columnar_table(file: InputFile, first_row: int, num_rows: int, columns: list[str]) -> pa.Table:
    """Rows [first_row, first_row + num_rows) of ``columns`` of a Parquet or Arrow file, strings decoded."""
    with reading(file, f"rows {first_row}-{first_row + num_rows - 1}"):
        table = _columnar_table(file, first_row, num_rows, columns)
    return _decoded(table)


# Versions the canonical form below: a digest of one form is never compared with another's.
_COLUMNS_DIGEST_TAG = b"embedpipe-columns-v1"


def hash_columns(hasher: Any, table: pa.Table) -> None:
    """Feed ``hasher`` the values of ``table``'s columns in a canonical byte form.

    What a Parquet or Arrow unit's shard is made from is the values of the columns read, not the
    file's bytes (the same values may be stored with another compression, encoding or row-group
    layout). Per column: its name, kind, length and null count, then the digests (same algorithm as
    ``hasher``) of up to three streams: the validity (one byte per row, only when there are nulls);
    for strings (string, large_string, string_view or dictionary, all alike) each value's UTF-8
    length as little-endian int64, and all the UTF-8 bytes; for integers the values as little-endian
    64-bit; for anything else one JSON text per value. Streams run over the chunks without copying
    the text, so chunking, slice offsets and null slots' contents do not change the digest; any
    change of a value read does.
    """
    hasher.update(_COLUMNS_DIGEST_TAG + b"\0%d\0" % table.num_rows)
    for name, column in zip(table.column_names, table.columns):
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
            tag = b"text"
        elif pa.types.is_integer(kind):
            tag = b"uint64" if pa.types.is_uint64(kind) else b"int64"
        else:
            tag = b"json"
        validity, values, data = (hashlib.new(hasher.name) for _ in range(3))
        for chunk in chunks:
            if pa.types.is_dictionary(chunk.type):
                chunk = chunk.dictionary_decode()
            if column.null_count:
                validity.update(chunk.is_valid().to_numpy(zero_copy_only=False).view(np.uint8).tobytes())
            if tag == b"text":
                _hash_strings(values, data, chunk)
            elif tag != b"json":
                wide = chunk.cast(pa.uint64() if tag == b"uint64" else pa.int64())
                wide = wide.fill_null(0) if wide.null_count else wide
                values.update(wide.to_numpy().astype("<u8" if tag == b"uint64" else "<i8").tobytes())
            else:
                for value in chunk.to_pylist():
                    values.update(json.dumps(value, default=repr, ensure_ascii=False, sort_keys=True).encode() + b"\n")
        hasher.update(b"%s\0%s\0%d\0%d\0" % (name.encode("utf-8", "surrogatepass"), tag, len(column),
                                                column.null_count))
        for stream in (validity, values, data):
            hasher.update(stream.digest())


def _hash_strings(lengths: Any, data: Any, chunk: pa.Array) -> None:
    """Each value's UTF-8 length (little-endian int64) into ``lengths``, the UTF-8 bytes into ``data``."""
    if pa.types.is_string_view(chunk.type):
        chunk = chunk.cast(pa.large_string())
    if chunk.null_count:
        chunk = chunk.fill_null("")
    if not len(chunk):
        return
    width = 8 if pa.types.is_large_string(chunk.type) else 4
    buffers = chunk.buffers()
    offsets = np.frombuffer(buffers[1], dtype=f"<i{width}", count=len(chunk) + 1, offset=chunk.offset * width)
    lengths.update(np.diff(offsets).astype("<i8").tobytes())
    if buffers[2] is not None and offsets[-1] > offsets[0]:
        data.update(buffers[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0])))


def read_columnar_rows(file: InputFile, first_row: int, num_rows: int, text_column: str,
                       id_column: str | None, batch_rows: int, rules: TextRules = DEFAULT_RULES,
                       hasher: Any | None = None) -> Iterator[RowBatch]:
    """Read rows [first_row, first_row + num_rows) of a Parquet or Arrow file.

    ``hasher`` (a ``hashlib`` object), when given, is fed the values read (see :func:`hash_columns`).
    """
    table = read_columnar_table(file, first_row, num_rows, columns_read(text_column, id_column))
    if hasher is not None:
        hash_columns(hasher, table)
    for start in range(0, table.num_rows, batch_rows):
        part = table.slice(start, batch_rows)
        texts = part.column(text_column).to_pylist()
        ids = part.column(id_column).to_pylist() if id_column else [None] * len(texts)
        batch = RowBatch()
        for offset, (text, raw_id) in enumerate(zip(texts, ids)):
            row = first_row + start + offset
            row_id = _row_id(raw_id) if id_column else f"{file.name}:{row}"
            reason = ""
            if isinstance(text, str):
                text, reason = rules.check(text)
            if text is None and not reason:
                batch.bad.append(BadRow(file.name, f"row {row}", f"{text_column!r} is null, not a string", "null"))
            elif text is None:
                batch.bad.append(BadRow(file.name, f"row {row}", reason, _raw_text(part.column(text_column)[offset].as_py())))
            elif row_id is None:
                reason = f"id column {id_column!r} is null or not a string/integer"
                batch.bad.append(BadRow(file.name, f"row {row}", reason, _raw_text({"id": raw_id, "text": text})))
            else:
                batch.ids.append(row_id)
                batch.texts.append(text)
        yield batch
