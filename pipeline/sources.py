"""Input files: find them, tell their format, check their columns, read rows.

Every path goes through fsspec, so local paths and URIs (``s3://``, ``gs://``,
``memory://`` ...) work alike. Rows are read in batches of (id, text) pairs; a
row that cannot be used becomes a :class:`BadRow` with its position and reason
instead of being dropped or stopping the job.
"""

from __future__ import annotations

import json
import lzma
import os
import posixpath
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, InputError

LINE_FORMATS = ("jsonl", "text")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".txt": "text", ".text": "text",
    ".parquet": "parquet", ".pq": "parquet",
    ".arrow": "arrow",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# How much of a bad row's raw value is kept in quarantine (the rest is cut, and says so).
_RAW_KEEP_CHARS = 10_000


@dataclass(frozen=True)
class InputFile:
    """One input file: its full URI, the short name used in row ids, and what fingerprints it."""

    uri: str
    name: str
    format: str
    size: int
    mtime: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "uri": self.uri, "format": self.format, "size": self.size, "mtime": self.mtime}


@dataclass(frozen=True)
class BadRow:
    """A row that goes to quarantine: where it is, why, and its raw value (escaped)."""

    source: str
    position: str
    reason: str
    raw: str

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "position": self.position, "reason": self.reason, "raw": self.raw}


@dataclass
class RowBatch:
    """Rows read from one stretch of a file: good rows as (ids, texts), bad rows apart."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return len(self.texts) + len(self.bad)


@dataclass(frozen=True)
class TextRules:
    """What makes a text unusable beyond its type: NUL bytes (by policy) and size."""

    nul_bytes: str = "reject"  # reject | strip | keep
    max_text_bytes: int | None = None

    def check(self, text: str) -> tuple[str | None, str]:
        """(the text to tokenize, '') or (None, reason)."""
        if "\x00" in text:
            if self.nul_bytes == "reject":
                return None, f"NUL byte at character {text.index(chr(0))} (input.nul_bytes: reject)"
            if self.nul_bytes == "strip":
                text = text.replace("\x00", "")
        # A UTF-8 character is 1-4 bytes: only encode when the length alone cannot decide.
        if self.max_text_bytes is not None and len(text) > self.max_text_bytes // 4:
            size = len(text.encode("utf-8", errors="surrogatepass"))
            if size > self.max_text_bytes:
                return None, f"text is {size:,} bytes, over input.max_text_bytes ({self.max_text_bytes:,})"
        return text, ""


DEFAULT_RULES = TextRules()


def _strip_compression(name: str) -> str:
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_format(name: str, configured: str) -> str | None:
    """The format of a file: the configured one, else guessed from its suffix (None if unknown)."""
    if configured != "auto":
        return configured
    base = _strip_compression(name.lower())
    return _SUFFIX_FORMATS.get(posixpath.splitext(base)[1])


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _glob_root(path: str) -> str:
    parts = path.split("/")
    for i, part in enumerate(parts):
        if _has_glob(part):
            return "/".join(parts[:i])
    return posixpath.dirname(path)


def _datasets_dir_files(fs: Any, root: str) -> list[str] | None:
    """The data files of a ``datasets.save_to_disk`` directory, in their order, or None."""
    state_path = posixpath.join(root, "state.json")
    if not fs.exists(state_path):
        return None
    with fs.open(state_path, "r") as fh:
        state = json.load(fh)
    return [posixpath.join(root, item["filename"]) for item in state.get("_data_files", [])]


def discover(path: str, configured_format: str = "auto") -> list[InputFile]:
    """List the input files named by a file, glob or directory, sorted by name.

    Raises:
        ConfigError: nothing matches, or a file's format cannot be told from its name.
    """
    fs, root = fsspec.core.url_to_fs(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if _has_glob(root):
        base, paths = _glob_root(root), sorted(fs.glob(root))
        paths = [p for p in paths if fs.isfile(p)]
    elif fs.isdir(root):
        base = root
        paths = _datasets_dir_files(fs, root) or sorted(p for p in fs.find(root) if not _is_hidden(p, root))
    elif fs.exists(root):
        base, paths = posixpath.dirname(root), [root]
    else:
        _raise_if_unreachable(fs, root)
        raise ConfigError(f"input.path: {path} does not exist")
    files = []
    for p in paths:
        name = posixpath.relpath(p, base) if base else p
        fmt = detect_format(p, configured_format)
        if fmt is None:
            if fs.isdir(root) and not _has_glob(root):
                continue  # a directory may hold READMEs and the like; skip what we cannot read
            raise ConfigError(f"input.format: cannot tell the format of {p} from its name; set input.format")
        info = fs.info(p)
        if not info.get("size"):
            raise InputError(f"{p}: cannot be read: the file is empty (0 bytes); "
                             "remove it from the input if that is intended")
        uri = p if protocol in ("file", "local") else f"{protocol}://{p}"
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
        files.append(InputFile(uri=uri, name=name, format=fmt, size=int(info.get("size") or 0),
                               mtime=None if mtime is None else str(mtime)))
    if not files:
        raise ConfigError(f"input.path: no readable input files in {path}")
    return files


def _raise_if_unreachable(fs: Any, root: str) -> None:
    """A local path that "does not exist" only because it cannot be looked at: say so."""
    if "local" not in fs.protocol and "file" not in fs.protocol:
        return
    try:
        os.stat(root)
    except PermissionError as exc:
        raise InputError(f"{root}: cannot be read: {exc.strerror}") from None
    except OSError:
        pass


def _is_hidden(path: str, root: str) -> bool:
    return any(part.startswith((".", "_")) for part in posixpath.relpath(path, root).split("/"))


# What opening and decoding a damaged or unreadable file raises (gzip: EOFError, BadGzipFile is an OSError).
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError, pa.ArrowException)
try:
    import zstandard

    _READ_ERRORS += (zstandard.ZstdError,)
except ImportError:  # pragma: no cover - fsspec reads .zst only with zstandard installed
    pass


@contextmanager
def reading(file: InputFile, where: str = "") -> Iterator[None]:
    """Turn a failure to open or decode ``file`` into an :class:`InputError` naming it, where, and why."""
    try:
        yield
    except _READ_ERRORS as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        at = f" {where}" if where else ""
        raise InputError(f"{file.uri}:{at} cannot be read: {reason}") from None


def open_binary(uri: str) -> Any:
    """Open a file for reading bytes, decompressing by suffix (.gz etc.)."""
    return fsspec.open(uri, "rb", compression="infer").open()


# ---------------------------------------------------------------- columns


def _first_json_object(file: InputFile) -> dict[str, Any] | None:
    with reading(file), open_binary(file.uri) as fh:
        for line_no, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    return None  # the row-level reader quarantines it with the reason
                return obj if isinstance(obj, dict) else None
    return None


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

    JSONL files are checked on their first object, Parquet and Arrow on their schema.

    Raises:
        ConfigError: a column is missing, naming the key, the file and the columns it has.
    """
    wanted = [("input.text_column", text_column)] + ([("input.id_column", id_column)] if id_column else [])
    for file in files:
        if file.format == "text":
            if id_column:
                raise ConfigError(f"input.id_column: {file.name} is plain text (one document per line), it has no columns")
            continue
        if file.format == "jsonl":
            obj = _first_json_object(file)
            if obj is None:
                continue
            have = list(obj)
        else:
            schema = columnar_schema(file)
            have = schema.names
            field_type = schema.field(text_column).type if text_column in have else None
            if field_type is not None and not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
                raise ConfigError(f"input.text_column: column {text_column!r} of {file.name} is {field_type}, not a string")
        for key, column in wanted:
            if column not in have:
                raise ConfigError(f"{key}: column {column!r} not found in {file.name} (it has: {', '.join(map(str, have))})")


# ---------------------------------------------------------------- rows


def _raw_text(raw: bytes | str | Any) -> str:
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", errors="backslashreplace")
    elif isinstance(raw, str):
        text = raw
    else:
        text = json.dumps(raw, default=repr, ensure_ascii=False)
    if len(text) > _RAW_KEEP_CHARS:
        return text[:_RAW_KEEP_CHARS] + f"... [cut: {len(text)} characters in all]"
    return text


def _row_id(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_line(line: bytes, fmt: str, text_column: str, id_column: str | None) -> tuple[str | None, str | None, str]:
    """Parse one line into (id or None, text, '') or (None, None, reason) when it is unusable."""
    if fmt == "text":
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            return None, line.decode("utf-8"), ""
        except UnicodeDecodeError as exc:
            return None, None, f"invalid UTF-8 at byte {exc.start}"
    if not line.strip():
        return None, None, "blank line (not a JSON object)"
    try:
        # orjson: ~3x faster than json here, and strict (rejects invalid UTF-8 and lone surrogates).
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        kind = "invalid UTF-8" if "UTF-8" in str(exc) else "malformed JSON"
        return None, None, f"{kind}: {exc}"
    if not isinstance(obj, dict):
        return None, None, f"not a JSON object but a {type(obj).__name__}"
    if text_column not in obj:
        return None, None, f"no {text_column!r} field"
    text = obj[text_column]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        return None, None, f"{text_column!r} is {kind}, not a string"
    if id_column is None:
        return None, text, ""
    row_id = _row_id(obj.get(id_column))
    if row_id is None:
        return None, None, f"id field {id_column!r} is missing or not a string/integer"
    return row_id, text, ""


def read_line_rows(file: InputFile, first_row: int, num_rows: int, byte_start: int, byte_stop: int,
                   text_column: str, id_column: str | None, batch_rows: int,
                   rules: TextRules = DEFAULT_RULES) -> Iterator[RowBatch]:
    """Read lines [first_row, first_row + num_rows) of a JSONL or text file, stored at [byte_start, byte_stop)."""
    with reading(file, f"lines {first_row + 1}-{first_row + num_rows}"), open_binary(file.uri) as fh:
        fh.seek(byte_start)
        data = fh.read(byte_stop - byte_start)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    if len(lines) != num_rows:
        raise InputError(
            f"{file.uri}: lines {first_row + 1}-{first_row + num_rows}: found {len(lines)} lines where the plan "
            f"counted {num_rows}; the file changed since the job was planned"
        )
    batch = RowBatch()
    for offset, line in enumerate(lines):
        line_no = first_row + offset + 1
        row_id, text, reason = parse_line(line, file.format, text_column, id_column)
        if text is not None:
            text, reason = rules.check(text)
        if text is None:
            batch.bad.append(BadRow(file.name, f"line {line_no}", reason, _raw_text(line)))
        else:
            batch.ids.append(row_id if row_id is not None else f"{file.name}:{line_no}")
            batch.texts.append(text)
        if batch.rows_read >= batch_rows:
            yield batch
            batch = RowBatch()
    if batch.rows_read:
        yield batch


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


def read_columnar_rows(file: InputFile, first_row: int, num_rows: int, text_column: str,
                       id_column: str | None, batch_rows: int, rules: TextRules = DEFAULT_RULES) -> Iterator[RowBatch]:
    """Read rows [first_row, first_row + num_rows) of a Parquet or Arrow file."""
    columns = [text_column] + ([id_column] if id_column and id_column != text_column else [])
    with reading(file, f"rows {first_row}-{first_row + num_rows - 1}"):
        table = _columnar_table(file, first_row, num_rows, columns)
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
