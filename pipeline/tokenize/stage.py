"""One work unit of the tokenize stage, start to finish, without Ray.

read the unit's rows -> tokenize -> pad -> commit ``tokens/<shard>`` and, when
rows were rejected, ``quarantine/tokens-<shard>.jsonl``; return a report that
the driver records in the manifest. The report carries ``input_sha256``, the
digest of the unit's input as it was read (see :mod:`pipeline.inputs.identity`),
which a resume checks against the input before keeping the shard.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.faults import fault_point
from pipeline.inputs.columnar import read_columnar_rows
from pipeline.inputs.files import LINE_FORMATS, BadRow, RowBatch, TextRules
from pipeline.inputs.identity import input_hasher
from pipeline.inputs.lines import read_line_rows
from pipeline.inputs.plan import WorkUnit
from pipeline.output.commit import write_jsonl
from pipeline.output.shards import write_shard
from pipeline.output.storage import output_path
from pipeline.tokenize.core import TokenizeSpec, TokenRows, get_tokenizer, length_histogram, to_table, tokenize_texts
from pipeline.tokenize.pack import PackedBlocks, pack_documents, packed_table

# Texts handed to the tokenizer at once: bounds the Rust encodings alive at a time.
BATCH_ROWS = 1024


@dataclass(frozen=True)
class ReadSpec:
    """How to read rows out of input files (from ``input.*``)."""

    text_column: str
    id_column: str | None
    rules: TextRules = TextRules()


def read_unit(unit: WorkUnit, read: ReadSpec, hasher: Any | None = None) -> Iterator[RowBatch]:
    """Iterate the unit's rows in batches (good rows and bad rows apart).

    ``hasher`` (see :func:`pipeline.inputs.identity.input_hasher`) is fed the unit's input as it is read.
    """
    if unit.file.format in LINE_FORMATS:
        return read_line_rows(unit.file, unit.first_row, unit.num_rows, unit.byte_start, unit.byte_stop,
                              read.text_column, read.id_column, BATCH_ROWS, read.rules, hasher)
    return read_columnar_rows(unit.file, unit.first_row, unit.num_rows, read.text_column, read.id_column, BATCH_ROWS,
                              read.rules, hasher)


def tokenize_unit(unit: WorkUnit, read: ReadSpec, spec: TokenizeSpec,
                  hasher: Any | None = None) -> tuple[Any, TokenRows, list[BadRow], int]:
    """Tokenize every good row of a unit; returns (Arrow table, unpadded rows, bad rows, blank JSONL lines)."""
    rows, bad, blank = _tokenize_rows(unit, read, spec, hasher)
    table = pack_unit(spec, unit.index, rows)[0] if spec.pack else to_table(spec, rows)
    return table, rows, bad, blank


def pack_unit(spec: TokenizeSpec, unit_index: int, rows: TokenRows) -> tuple[pa.Table, PackedBlocks]:
    """A unit's documents packed into blocks (see :mod:`pipeline.tokenize.pack`), as a table and the counts."""
    packed = pack_documents(rows.flat_ids, rows.lengths, spec.max_length, spec.pack_separator_id,
                            spec.pack_remainder, spec.pad_id or 0)
    id_type = pa.from_numpy_dtype(np.dtype(spec.id_dtype))
    return packed_table(packed, unit_index, rows.ids, id_type), packed


def _packed_report(spec: TokenizeSpec, rows: TokenRows, packed: PackedBlocks) -> dict[str, Any]:
    """The packing counts a shard's manifest record carries (verify re-derives them from the blocks)."""
    return {
        "packed": True,
        "separator_id": spec.pack_separator_id,
        "document_tokens": packed.document_tokens,
        "separator_tokens": packed.separator_tokens,
        "dropped_tokens": packed.dropped_tokens,
        "dropped_documents": packed.dropped_documents,
        # Documents with no token at all (empty, no special tokens, no separator): in no block.
        "empty_documents": int(np.count_nonzero(rows.lengths == 0)) if packed.separator_tokens == 0 else 0,
        "pieces": len(packed.piece_lengths),
    }


def _tokenize_rows(unit: WorkUnit, read: ReadSpec, spec: TokenizeSpec,
                   hasher: Any | None, threads: int = 1) -> tuple[TokenRows, list[BadRow], int]:
    bad: list[BadRow] = []
    blank = 0

    def good_rows() -> Iterator[tuple[list[str], list[str]]]:
        nonlocal blank
        for batch in read_unit(unit, read, hasher):
            bad.extend(batch.bad)
            blank += batch.blank
            if batch.texts:
                yield batch.ids, batch.texts

    parts = tokenize_batches(spec, good_rows(), threads)
    if not parts:
        parts.append(tokenize_texts(spec, [], []))
    return TokenRows.concat(parts), bad, blank


def tokenize_threads(cpus: int, units_left: int) -> int:
    """Threads for a tokenize task submitted while ``units_left`` units (this one included) are not yet
    committed, on ``cpus`` CPUs: one, unless fewer units than CPUs are left, i.e. a job (or what a rerun has
    left of one) of fewer units than CPUs, whose tasks each tokenize on their share of the CPUs. The task
    still books one CPU: encoder actors may hold the rest, idle until a token shard is committed. The rows
    are the same for any thread count (:func:`tokenize_batches`)."""
    return max(1, cpus // max(1, units_left))


def tokenize_batches(spec: TokenizeSpec, batches: Iterator[tuple[list[str], list[str]]],
                     threads: int = 1) -> list[TokenRows]:
    """Tokenize (ids, texts) batches in order, on ``threads`` threads when more than one.

    The Rust tokenizer releases the GIL while it encodes, so threads tokenize a unit's batches side by side
    (what lets a job of fewer units than CPUs use every CPU). Each text is tokenized on its own, so the rows,
    concatenated in input order, are the same whatever the thread count. The batches are read (and the
    input hashed) in order on the calling thread, with at most ``2 * threads`` batches in flight.
    """
    if threads <= 1:
        return [tokenize_texts(spec, ids, texts) for ids, texts in batches]
    get_tokenizer(spec)  # built once, before the threads share it
    parts: list[TokenRows] = []
    pending: deque[Future[TokenRows]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="tokenize") as pool:
        for ids, texts in batches:
            step = -(-len(texts) // threads)  # one read batch spread over every thread
            for start in range(0, len(texts), step):
                pending.append(pool.submit(tokenize_texts, spec, ids[start:start + step], texts[start:start + step]))
            while len(pending) > 2 * threads:
                parts.append(pending.popleft().result())
        parts.extend(future.result() for future in pending)
    return parts


def run_unit(unit: WorkUnit, name: str, read: ReadSpec, spec: TokenizeSpec, out_dir: str,
             threads: int = 1) -> dict[str, Any]:
    """Tokenize one unit (on ``threads`` threads, see :func:`tokenize_batches`) and commit its shard
    ``tokens/<name>`` (and quarantine file); return the shard's report."""
    started = time.perf_counter()
    hasher = input_hasher()
    rows, bad, blank = _tokenize_rows(unit, read, spec, hasher, threads)
    packing: dict[str, Any] = {}
    if spec.pack:
        table, packed = pack_unit(spec, unit.index, rows)
        packing = _packed_report(spec, rows, packed)
    else:
        table = to_table(spec, rows)
    fault_point("tokenize.before_commit")
    out = output_path(out_dir)
    committed = write_shard(table, out / "tokens" / name)
    quarantine_file = None
    if bad:
        records = [b.to_json() | {"stage": "tokenize", "shard": name} for b in bad]
        quarantine_file = f"tokens-{name[:-len('.arrow')]}.jsonl"
        write_jsonl(records, out / "quarantine" / quarantine_file)
    fault_point("tokenize.after_commit")
    truncated = int(np.count_nonzero(rows.untruncated > (spec.max_length or 0))) if spec.truncation else 0
    return {
        "name": name,
        "unit": unit.index,
        "source": unit.describe(),
        "threads": threads,
        "seconds": round(time.perf_counter() - started, 3),  # read, tokenize and commit, in the task
        # Blank JSONL lines are not rows: rows_in + blank_lines = the unit's lines, rows_in = texts + quarantined.
        "rows_in": unit.num_rows - blank,
        "blank_lines": blank,
        "rows": table.num_rows,
        "texts": len(rows.untruncated),
        "quarantined": len(bad),
        "quarantine_file": quarantine_file,
        # Packed: the real tokens in the blocks (= document_tokens + separator_tokens - dropped_tokens).
        "tokens": int(packed.tokens) if spec.pack else int(rows.lengths.sum()),
        "untruncated_tokens": int(rows.untruncated.sum()),
        "truncated_rows": truncated,
        "length_histogram": length_histogram(spec, rows.untruncated),
        "bytes": committed.bytes,
        "sha256": committed.sha256,
        # What the shard was made from (checked on resume): the unit's bytes (line files) or values (columnar).
        "input_sha256": hasher.hexdigest(),
        **({"input_etag": unit.file.etag} if unit.file.etag else {}),
        **packing,
    }

