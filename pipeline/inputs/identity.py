"""Input identity by content: what each token shard was made from, and whether the input still holds it.

A file rewritten with the same size and its modification time restored (``rsync -t``, ``cp -p``,
checkouts) has the same fingerprint (names, sizes, mtimes) but other bytes. So the tokenize task hashes
each work unit's input as it reads it, in the one read the rows come from, and records the digest in
the shard's report (``input_sha256``, in the manifest per shard):

- line files (JSONL, text, compressed or not): SHA-256 of exactly the unit's byte range
  [byte_start, byte_stop) of the decompressed stream, BOM included. For an uncompressed file it can be
  checked by hand: ``tail -c +$((byte_start + 1)) FILE | head -c $((byte_stop - byte_start)) | sha256sum``.
- Parquet and Arrow files: SHA-256 of the values of the columns read (text, and id when configured), for
  the unit's rows, in a canonical byte form (:func:`pipeline.inputs.columnar.hash_columns`): the same
  values stored with another compression, encoding or row-group layout give the same digest, a change
  of any value read gives another. Columns that are not read cannot change the shard and are not hashed.

SHA-256, not BLAKE2b: on CPUs with SHA instructions (x86 SHA-NI: AMD Zen, Intel Ice Lake and later;
ARMv8 crypto extensions) OpenSSL's SHA-256 is about twice as fast as hashlib's BLAKE2b (measured on an
AMD EPYC with SHA-NI, one core: 1.2-1.8 GB/s against 0.5-0.9 GB/s), it is the hash the manifest already
uses for shards, and coreutils checks it. Either is far faster than tokenizing (~1-2 MB/s per core with
MiniLM): hashing while reading adds ~0.1-0.3% to a tokenize task, on a 50 MB JSONL corpus.

On resume (:func:`check_committed_inputs`, called by the driver before the output is touched), the
unit of every committed token shard of an unfinished tokens stage is read and hashed again and
compared; a difference is refused naming the file and the byte or row range, unless ``--force``,
which starts the job over. Where the store keeps a content tag for the object (S3 ETag, GCS md5Hash;
:func:`pipeline.inputs.files.content_tag`) and it is the one recorded when the shard was made, the
object is unchanged and is not read again. A finished tokens stage is not re-hashed: its rerun does
nothing (as cheap as before), and an increment only adds new files' units.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.inputs.columnar import columns_read, hash_columns, read_columnar_table
from pipeline.inputs.files import LINE_FORMATS, compression_of, open_binary, reading
from pipeline.inputs.plan import WorkUnit

log = logging.getLogger("embedpipe")

DIGEST_KEY = "input_sha256"
"""The key of a token shard's report (and manifest record) holding the digest of its unit's input."""
ETAG_KEY = "input_etag"
"""The key holding the store's content tag of the input file when the shard was made (object stores)."""
_READ_CHUNK = 8 * 1024 * 1024
# Threads re-hashing at once (hashlib and file reads release the GIL); each holds one chunk or unit.
_MAX_WORKERS = 8
# Findings shown in the refusal message (all are logged).
_SHOWN = 5


def input_hasher() -> Any:
    """A new hash object for a unit's input (SHA-256; see the module docstring for why)."""
    return hashlib.sha256()


def _range_digest(fh: Any, start: int, stop: int) -> tuple[str, int]:
    """(digest of bytes [start, stop) of an open file, bytes found): read and hashed in chunks."""
    fh.seek(start)
    hasher, left = input_hasher(), stop - start
    while left > 0:
        chunk = fh.read(min(left, _READ_CHUNK))
        if not chunk:
            break
        hasher.update(chunk)
        left -= len(chunk)
    return hasher.hexdigest(), stop - start - left


def unit_digest(unit: WorkUnit, text_column: str, id_column: str | None) -> str:
    """The digest of a unit's input as it is now: what the tokenize task records as ``input_sha256``.

    Raises:
        InputError: the file cannot be read (naming it).
    """
    if unit.file.format in LINE_FORMATS:
        with reading(unit.file, f"bytes {unit.byte_start}-{unit.byte_stop}"), open_binary(unit.file.uri) as fh:
            return _range_digest(fh, unit.byte_start, unit.byte_stop)[0]
    hasher = input_hasher()
    table = read_columnar_table(unit.file, unit.first_row, unit.num_rows, columns_read(text_column, id_column))
    hash_columns(hasher, table)
    return hasher.hexdigest()


def _where(unit: WorkUnit) -> str:
    if unit.file.format in LINE_FORMATS:
        return (f"bytes {unit.byte_start}-{unit.byte_stop} "
                f"(lines {unit.first_row + 1}-{unit.first_row + unit.num_rows})")
    return f"rows {unit.first_row}-{unit.first_row + unit.num_rows - 1}"


def _finding(unit: WorkUnit, record: dict[str, Any], now: str, short: int = 0) -> str:
    what = f"{unit.file.uri}: {_where(unit)} changed since tokens/{record.get('name')} was made from it"
    if short:
        return f"{what} (the file now ends {short} bytes before the unit's end)"
    return f"{what} (sha256 {record[DIGEST_KEY][:12]}… then, {now[:12]}… now)"


def _check_one(unit: WorkUnit, record: dict[str, Any], text_column: str, id_column: str | None) -> str | None:
    try:
        now = unit_digest(unit, text_column, id_column)
    except InputError as exc:
        return f"{unit.file.uri}: {_where(unit)} (tokens/{record.get('name')}) cannot be read again: {exc}"
    return None if now == record[DIGEST_KEY] else _finding(unit, record, now)


def _check_compressed_file(pairs: list[tuple[WorkUnit, dict[str, Any]]]) -> list[tuple[int, str | None]]:
    """A compressed line file's units in one pass (a seek in a compressed stream re-reads from the start)."""
    pairs = sorted(pairs, key=lambda pair: pair[0].byte_start)
    file = pairs[0][0].file
    found: list[tuple[int, str | None]] = []
    try:
        with reading(file, "(checking committed units)"), open_binary(file.uri) as fh:
            for unit, record in pairs:
                now, got = _range_digest(fh, unit.byte_start, unit.byte_stop)
                short = unit.byte_stop - unit.byte_start - got
                same = now == record[DIGEST_KEY] and not short
                found.append((unit.index, None if same else _finding(unit, record, now, short)))
    except InputError as exc:
        return [(unit.index, f"{file.uri}: {_where(unit)} (tokens/{record.get('name')}) cannot be read again: {exc}")
                for unit, record in pairs]
    return found


def changed_units(manifest: Mapping[str, Any], units: Iterable[WorkUnit], text_column: str,
                  id_column: str | None, workers: int | None = None) -> list[str]:
    """Findings, one per committed token shard whose unit's input now differs from what it was made from.

    ``manifest`` is the output's existing manifest: its tokens shards (each with the ``unit`` index and
    ``input_sha256``) and its plan (each unit's file and byte or row range, as the shard was made).
    ``units`` is this run's plan: it gives the input files as they are now (by name). Each finding names
    the file, the byte range and lines (line files) or rows (Parquet/Arrow), and the shard. Shards whose
    record has no digest (written by an embedpipe that did not hash its input yet) cannot be checked
    and are passed over with a warning. An object whose store tag (ETag) is the one recorded is not read.
    """
    shards = list(_tokens_stage(manifest).get("shards", {}).values())
    planned = {u.get("index"): u for u in (manifest.get("plan") or {}).get("units") or [] if isinstance(u, dict)}
    files = {u.file.name: u.file for u in units}
    findings: list[tuple[int, str | None]] = []
    singles: list[tuple[WorkUnit, dict[str, Any]]] = []
    by_file: dict[str, list[tuple[WorkUnit, dict[str, Any]]]] = {}
    unchecked = tagged = 0
    for record in shards:
        index = record.get("unit") if isinstance(record, dict) else None
        plan = planned.get(index) if isinstance(index, int) else None
        if plan is None or not isinstance(record.get(DIGEST_KEY), str) or not _is_range(plan):
            unchecked += 1
            continue
        file = files.get(plan["file"])
        if file is None:
            gone = f"{plan['file']}: no longer among the input files (tokens/{record.get('name')} was made from it)"
            findings.append((plan["index"], gone))
            continue
        if file.format in LINE_FORMATS and (plan.get("byte_start") is None or plan.get("byte_stop") is None):
            unchecked += 1  # planned as another format: the plan or config check refuses the job
            continue
        if file.etag and record.get(ETAG_KEY) == file.etag:
            tagged += 1  # the store says the object is the one read then: not read again
            continue
        unit = WorkUnit(plan["index"], file, plan["first_row"], plan["num_rows"], plan.get("byte_start"),
                        plan.get("byte_stop"))
        if file.format in LINE_FORMATS and compression_of(file.uri):
            by_file.setdefault(file.uri, []).append((unit, record))
        else:
            singles.append((unit, record))
    if unchecked:
        log.warning("resume: %d committed token shards record no input digest (written by an older embedpipe) "
                    "or no unit of the plan: their input cannot be checked for changes", unchecked)
    started = time.monotonic()
    jobs = len(singles) + len(by_file)
    if jobs:
        workers = workers or max(1, min(_MAX_WORKERS, os.cpu_count() or 1, jobs))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            single = pool.map(lambda pair: (pair[0].index, _check_one(*pair, text_column, id_column)), singles)
            grouped = pool.map(_check_compressed_file, by_file.values())
            findings += list(single)
            findings += [item for group in grouped for item in group]
    found = [text for _, text in sorted(findings, key=lambda item: item[0]) if text]
    hashed = len(singles) + sum(map(len, by_file.values()))
    log.info("resume: input of %d committed token shards checked: %d re-hashed, %d by the store's tag, in %.1f s: "
             "%d changed", hashed + tagged, hashed, tagged, time.monotonic() - started, len(found),
             extra={"fields": {"event": "input_check", "hashed": hashed, "by_tag": tagged, "changed": len(found)}})
    return found


def _tokens_stage(manifest: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The manifest's tokens stage record, ``{}`` when it has none (or it is not a record)."""
    stages = (manifest or {}).get("stages")
    tokens = stages.get("tokens") if isinstance(stages, Mapping) else None
    if not isinstance(tokens, Mapping):
        return {}
    return tokens if isinstance(tokens.get("shards"), Mapping) else {**tokens, "shards": {}}


def _is_range(plan: Mapping[str, Any]) -> bool:
    """Whether a plan record holds what re-reading its unit needs (a damaged manifest may not)."""
    return (isinstance(plan.get("file"), str) and isinstance(plan.get("index"), int)
            and all(isinstance(plan.get(key), int) for key in ("first_row", "num_rows"))
            and all(plan.get(key) is None or isinstance(plan.get(key), int) for key in ("byte_start", "byte_stop")))


def check_committed_inputs(old: Mapping[str, Any] | None, units: Iterable[WorkUnit], text_column: str,
                           id_column: str | None, force: bool = False) -> list[str]:
    """Before resuming an unfinished tokens stage: refuse when the input of a committed shard changed.

    Returns the findings (see :func:`changed_units`): empty when there is nothing to resume (no
    manifest, or its tokens stage is complete: a finished job's rerun re-hashes nothing), or when no
    committed unit's input changed. With ``force`` the findings are returned for the caller to start
    the job over (see :func:`pipeline.output.manifest.differences`, ``input.content_changed``).

    Raises:
        ConfigError: a committed shard's input changed and ``force`` is off, naming the files and ranges.
    """
    tokens = _tokens_stage(old)
    if old is None or tokens.get("status") == "complete" or not tokens.get("shards"):
        return []
    findings = changed_units(old, units, text_column, id_column)
    if findings and not force:
        raise ConfigError(input_changed_message(findings))
    for finding in findings:
        log.warning("input changed (--force: the job starts over): %s", finding)
    return findings


def input_changed_message(findings: list[str]) -> str:
    """The refusal: which files changed under committed shards, the first few ranges, and what to do."""
    more = ""
    if len(findings) > _SHOWN:
        names = list(dict.fromkeys(f.split(": ", 1)[0] for f in findings))
        more = f"; … ({len(findings)} shards in all, made from {', '.join(names)})"
    return (f"input changed under committed shards: {'; '.join(findings[:_SHOWN])}{more}. Resuming would mix "
            "shards of two versions of the input: use --force to start the job over, or another output directory")
