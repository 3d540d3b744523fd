"""Duplicate row keys across a stage's shards, in memory bounded by a row budget, not by the corpus.

A row's key is its ``id`` (with ``chunk`` when long documents are chunked). With fewer rows than
``budget_rows`` the keys of all shards are checked in one pass. Beyond that the key space is cut into
ranges at quantiles of a sample of the keys, and each pass holds only the keys of one range: memory
stays near ``budget_rows`` keys (~50 bytes each) while the work grows by one read of the id columns per
pass (ids are a few percent of a token shard's bytes). A billion rows at the default budget: 20 passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.shards import read_shard

BUDGET_ROWS = 50_000_000
_SAMPLE_PER_SHARD = 256


@dataclass(frozen=True)
class Duplicate:
    """A key found more than once: where its first two occurrences are (shard name, row)."""

    key: str
    count: int
    first: tuple[str, int]
    second: tuple[str, int]

    def describe(self) -> str:
        return (f"id {self.key!r} ({self.count} rows): {self.first[0]} row {self.first[1]} and "
                f"{self.second[0]} row {self.second[1]}")


def row_keys(table: pa.Table) -> pa.Array:
    """The key of each row: ``id``, or ``id`` + unit separator + ``chunk`` for chunked rows."""
    ids = table.column("id").combine_chunks()
    if "chunk" in table.column_names:
        ids = pc.binary_join_element_wise(ids, pc.cast(table.column("chunk"), pa.string()), "\x1f")
    return pc.cast(ids, pa.large_string())


def find_duplicates(names: list[str], read_keys: Callable[[str], pa.Array], total_rows: int,
                    budget_rows: int = BUDGET_ROWS, keep: int = 5) -> tuple[int, list[Duplicate]]:
    """(number of rows whose key was seen before, up to ``keep`` duplicates with both positions).

    ``read_keys(name)`` gives a shard's row keys (see :func:`row_keys`); it is called once per pass.
    """
    extra, found = 0, []
    for low, high in _key_ranges(names, read_keys, total_rows, budget_rows):
        parts, where = [], []
        for name in names:
            keys = read_keys(name)
            if low is not None or high is not None:
                keep_mask = _in_range(keys, low, high)
                rows = np.flatnonzero(keep_mask.to_numpy(zero_copy_only=False))
                keys = keys.filter(keep_mask)
            else:
                rows = np.arange(len(keys))
            parts.append(keys)
            where.append((name, rows))
        if not parts:
            continue
        keys = pa.chunked_array(parts, type=pa.large_string())
        counts = pc.value_counts(keys)
        repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
        extra += int(pc.sum(repeated.field("counts")).as_py() or 0) - len(repeated)
        for value, count in zip(repeated.field("values")[: keep - len(found)], repeated.field("counts")):
            found.append(_positions(value.as_py(), count.as_py(), parts, where))
    return extra, found


def duplicates_in_stage(directory: Any, shard_rows: dict[str, int], keep: int = 5) -> tuple[int, list[Duplicate]]:
    """:func:`find_duplicates` over the committed shards (name -> rows) of a stage folder, read memory-mapped."""
    return find_duplicates(list(shard_rows), lambda name: row_keys(read_shard(directory / name)),
                           sum(shard_rows.values()), keep=keep)


def _key_ranges(names: list[str], read_keys: Callable[[str], pa.Array], total_rows: int,
                budget_rows: int) -> Iterator[tuple[str | None, str | None]]:
    passes = -(-total_rows // budget_rows)
    if passes <= 1:
        yield None, None
        return
    sample = []
    for name in names:
        keys = read_keys(name)
        if len(keys):
            picks = np.linspace(0, len(keys) - 1, min(len(keys), _SAMPLE_PER_SHARD)).astype(np.int64)
            sample.append(keys.take(pa.array(picks)))
    ordered = pc.unique(pa.chunked_array(sample, type=pa.large_string())).sort()
    cuts = sorted({ordered[int(i)].as_py() for i in np.linspace(0, len(ordered) - 1, passes + 1)[1:-1]})
    bounds = [None, *cuts, None]
    yield from zip(bounds[:-1], bounds[1:])


def _in_range(keys: pa.Array, low: str | None, high: str | None) -> pa.Array:
    mask = pa.array(np.ones(len(keys), bool))
    if low is not None:
        mask = pc.and_(mask, pc.greater_equal(keys, low))
    if high is not None:
        mask = pc.and_(mask, pc.less(keys, high))
    return mask


def _positions(key: str, count: int, parts: list[pa.Array], where: list[tuple[str, np.ndarray]]) -> Duplicate:
    seen: list[tuple[str, int]] = []
    for keys, (name, rows) in zip(parts, where):
        hits = np.flatnonzero(pc.equal(keys, key).to_numpy(zero_copy_only=False))
        seen += [(name, int(rows[i])) for i in hits[: 2 - len(seen)]]
        if len(seen) == 2:
            break
    return Duplicate(key, count, seen[0], seen[1])
