"""Checking, before any work, that the configured text and id columns are in the input.

A JSONL column is checked on a sample (the first :data:`COLUMN_SAMPLE_ROWS` rows of each file): the job
is refused only when no sampled row has it; a row without it is quarantined with the reason.
Parquet/Arrow text and id columns may be plain, large, view or dictionary-encoded strings.
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec
import fsspec.utils
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.inputs.columnar import open_arrow
from pipeline.inputs.files import _BOM, InputFile, open_binary, reading

log = logging.getLogger("embedpipe")


# JSONL rows sampled per file when checking that the text (and id) column exists.
COLUMN_SAMPLE_ROWS = 100


def _sample_json_objects(file: InputFile, limit: int = COLUMN_SAMPLE_ROWS) -> tuple[list[dict[str, Any]], int, int]:
    """The JSON objects among the first ``limit`` rows (non-blank lines) of a JSONL file.

    Returns (objects, rows sampled, line number of the last one). Lines that are not
    JSON objects are passed over here: the row reader quarantines them with the reason.
    """
    objects: list[dict[str, Any]] = []
    sampled = last_line = 0
    with reading(file, "(sampling columns)"), open_binary(file.uri) as fh:
        for line_no, line in enumerate(fh, start=1):
            if line_no == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            if not line.strip():
                continue
            sampled, last_line = sampled + 1, line_no
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                objects.append(obj)
            if sampled >= limit:
                break
    return objects, sampled, last_line


def _is_text_type(kind: pa.DataType) -> bool:
    """A string column in any of Arrow's layouts: string, large_string, string_view, or a dictionary of them."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def columnar_schema(file: InputFile) -> pa.Schema:
    """The Arrow schema of a Parquet or Arrow file."""
    with reading(file, f"({file.format} schema)"):
        if file.format == "parquet":
            with fsspec.open(file.uri, "rb") as fh:
                return pq.ParquetFile(fh).schema_arrow
        with open_arrow(file.uri) as reader:
            return reader.schema


def check_columns(files: list[InputFile], text_column: str, id_column: str | None) -> None:
    """Check that the text (and id) columns exist, before any work starts.

    JSONL files are checked on a sample, their first :data:`COLUMN_SAMPLE_ROWS` rows: a
    column is missing only when no sampled row has it (a row without it is quarantined
    when read). Parquet and Arrow files are checked on their schema.

    Raises:
        ConfigError: a column is missing, naming the key, the file, the rows sampled and the columns it has.
    """
    wanted = [("input.text_column", text_column)] + ([("input.id_column", id_column)] if id_column else [])
    for file in files:
        if file.format == "text":
            if id_column:
                raise ConfigError(f"input.id_column: {file.name} is plain text (one document per line), it has no columns")
            continue
        if file.format == "jsonl":
            objects, sampled, last_line = _sample_json_objects(file)
            if not objects:
                continue  # no JSON object among the sampled rows: each is quarantined with its reason
            have: list[str] = list(dict.fromkeys(key for obj in objects for key in obj))
            for key, column in wanted:
                if not any(column in obj for obj in objects):
                    raise ConfigError(
                        f"{key}: column {column!r} not found in {file.name}: none of the {sampled} rows sampled "
                        f"(lines 1-{last_line}) has it (they have: {_names(have)})")
            continue
        schema = columnar_schema(file)
        have = schema.names
        field_type = schema.field(text_column).type if text_column in have else None
        if field_type is not None and not _is_text_type(field_type):
            raise ConfigError(f"input.text_column: column {text_column!r} of {file.name} is {field_type}, not a string")
        for key, column in wanted:
            if column not in have:
                raise ConfigError(f"{key}: column {column!r} not found in {file.name} (it has: {_names(have)})")


def _names(names: list[str], keep: int = 20) -> str:
    shown = ", ".join(map(str, names[:keep]))
    return shown + (f" … ({len(names)} in all)" if len(names) > keep else "")
