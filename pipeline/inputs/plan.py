"""The plan: a deterministic split of the input files into work units, one shard each.

Line files (JSONL, text, compressed or not) are cut at line starts after
``shard_rows`` lines or ``max_unit_bytes`` bytes, whichever comes first, so one
huge file still feeds every worker. Parquet and Arrow files are cut by row ranges.
The same files and settings always give the same units, whatever runs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.inputs.columnar import columnar_row_counts
from pipeline.inputs.files import LINE_FORMATS, InputFile, open_binary, reading

# Bounds a unit's text in memory (a worker holds one unit's raw bytes at a time).
DEFAULT_MAX_UNIT_BYTES = 32 * 1024 * 1024
_SCAN_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class WorkUnit:
    """A stretch of one input file: rows [first_row, first_row + num_rows).

    For line files ``byte_start``/``byte_stop`` locate those lines in the
    (decompressed) byte stream.
    """

    index: int
    file: InputFile
    first_row: int
    num_rows: int
    byte_start: int | None = None
    byte_stop: int | None = None

    def describe(self) -> str:
        """Where the unit's rows are, for messages: file and line or row range."""
        last = self.first_row + self.num_rows
        if self.file.format in LINE_FORMATS:
            return f"{self.file.uri} lines {self.first_row + 1}-{last}"
        return f"{self.file.uri} rows {self.first_row}-{last - 1}"

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["file"] = self.file.name
        return record


def _line_ranges(file: InputFile, shard_rows: int, max_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (first_row, num_rows, byte_start, byte_stop) of each unit of a line file."""
    unit_start, unit_first_row = 0, 0
    rows_before_chunk, pos, last_byte = 0, 0, b"\n"
    with reading(file, "(counting lines)"), open_binary(file.uri) as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            line_ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + pos
            i = 0
            while i < len(line_ends):
                by_rows = i + shard_rows - (rows_before_chunk + i - unit_first_row) - 1
                by_bytes = i + int(np.searchsorted(line_ends[i:], unit_start + max_bytes - 1))
                j = min(by_rows, by_bytes)
                if j >= len(line_ends):
                    break
                stop = int(line_ends[j]) + 1
                next_first_row = rows_before_chunk + j + 1
                yield unit_first_row, next_first_row - unit_first_row, unit_start, stop
                unit_start, unit_first_row, i = stop, next_first_row, j + 1
            rows_before_chunk += len(line_ends)
            pos += len(chunk)
            last_byte = chunk[-1:]
    if pos > unit_start:
        total_rows = rows_before_chunk + (0 if last_byte == b"\n" else 1)
        yield unit_first_row, total_rows - unit_first_row, unit_start, pos


def _row_ranges(counts: list[int], shard_rows: int) -> Iterator[tuple[int, int]]:
    total = sum(counts)
    for start in range(0, total, shard_rows):
        yield start, min(shard_rows, total - start)


def plan_units(files: list[InputFile], shard_rows: int, max_unit_bytes: int = DEFAULT_MAX_UNIT_BYTES,
               first_index: int = 0) -> list[WorkUnit]:
    """Split the files into work units numbered from ``first_index`` (see the module docstring)."""
    units: list[WorkUnit] = []
    for file in files:
        if file.format in LINE_FORMATS:
            for first, count, start, stop in _line_ranges(file, shard_rows, max_unit_bytes):
                units.append(WorkUnit(first_index + len(units), file, first, count, start, stop))
        else:
            for first, count in _row_ranges(columnar_row_counts(file), shard_rows):
                units.append(WorkUnit(first_index + len(units), file, first, count))
    return units
