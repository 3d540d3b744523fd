"""Input files: find them, tell their format, check their columns, read rows.

Every path goes through fsspec, so local paths and URIs (``s3://``, ``gs://``,
``memory://`` ...) work alike. Rows are read in batches of (id, text) pairs; a
row that cannot be used becomes a :class:`BadRow` with its position and reason
instead of being dropped or stopping the job.

Hostile inputs, read right:

- A UTF-8 byte order mark at the start of a JSONL or text file is dropped; byte
  offsets (the plan's ``byte_start``/``byte_stop``) still count it.
- An input path that exists is that file or directory, even when its name holds
  glob characters (``data[1].jsonl``); it is a glob pattern only when no such path exists.
- A compressed file whose decompressor is missing (``.zst`` without ``zstandard``)
  is a :class:`ConfigError` naming the file and what to install, found at discovery.
- Parquet/Arrow text and id columns that are dictionary-encoded, ``large_string``
  or ``string_view`` are decoded to plain strings.
- Files of a directory input that are not read (a suffix the readers do not take,
  a name starting with ``_`` or ``.``, the job's own output directory) are logged
  on the ``embedpipe`` logger and listed in :attr:`Discovery.skipped`.
- Blank (empty or whitespace-only) JSONL lines are not rows: they are skipped and
  counted apart (:attr:`RowBatch.blank`), never quarantined. In a text file an
  empty line is an empty document, a row like any other.
- A JSONL column is checked on a sample (the first :data:`COLUMN_SAMPLE_ROWS` rows
  of each file): the job is refused only when no sampled row has it; a row
  without it is quarantined with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import fsspec.utils
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, InputError

log = logging.getLogger("embedpipe")

LINE_FORMATS = ("jsonl", "text")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".txt": "text", ".text": "text",
    ".parquet": "parquet", ".pq": "parquet",
    ".arrow": "arrow",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# What decompressing each suffix needs, for the message when it is missing here.
_DECOMPRESSORS = {
    ".gz": "Python's zlib module (a Python built with zlib)",
    ".bz2": "Python's bz2 module (a Python built with libbz2)",
    ".xz": "Python's lzma module (a Python built with liblzma)",
    ".zst": "the 'zstandard' package (pip install zstandard)",
}
_BOM = b"\xef\xbb\xbf"
# JSONL rows sampled per file when checking that the text (and id) column exists.
COLUMN_SAMPLE_ROWS = 100
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
    """Rows read from one stretch of a file: good rows as (ids, texts), bad rows apart.

    ``blank`` counts the blank JSONL lines passed over: they are not rows (not in ``rows_read``).
    """

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    blank: int = 0

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


@dataclass(frozen=True)
class SkippedFile:
    """A file (or a folder of files) under a directory or glob input that is not read, and why."""

    path: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Discovery:
    """What an input path names: the files to read, and those passed over with the reason."""

    files: list[InputFile]
    skipped: list[SkippedFile] = field(default_factory=list)


# Skipped files logged one by one before the rest are summed up in one line (``plan`` lists them all).
_SKIPS_LOGGED = 20


def discover(path: str, configured_format: str = "auto", exclude: str | None = None) -> list[InputFile]:
    """List the input files named by a file, glob or directory, sorted by name (see :func:`find_inputs`)."""
    return find_inputs(path, configured_format, exclude).files


def find_inputs(path: str, configured_format: str = "auto", exclude: str | None = None) -> Discovery:
    """The input files named by a file, glob or directory, sorted by name, and the files passed over.

    An existing path is itself (a file whose name holds ``*?[`` is that file); a glob
    only when no such path exists. Under a directory, files whose suffix no reader
    takes and names starting with ``_`` or ``.`` are skipped; under a directory or a
    glob, so is everything inside ``exclude`` (the job's output directory, so that a
    rerun does not read its own shards and manifest back as input). Skipped files are
    logged on the ``embedpipe`` logger and returned in :attr:`Discovery.skipped`.

    Raises:
        ConfigError: nothing matches, a file's format cannot be told from its name, or
            a file is compressed with a codec that cannot be decompressed here.
    """
    fs, root = fsspec.core.url_to_fs(path)
    protocol = _protocol(fs)
    skipped: list[SkippedFile] = []
    if fs.isdir(root):
        base = root
        paths = _datasets_dir_files(fs, root) or _directory_files(fs, root, configured_format, exclude, skipped)
    elif fs.exists(root):
        # An existing path is itself, never a pattern, even when its name holds glob characters.
        base, paths = posixpath.dirname(root), [root]
    elif _has_glob(root):
        base = _glob_root(root)
        paths = _outside(fs, base, sorted(p for p in fs.glob(root) if fs.isfile(p)), exclude, skipped)
    else:
        _raise_if_unreachable(fs, root)
        raise ConfigError(f"input.path: {path} does not exist")
    _log_skipped(path, skipped)
    files = []
    for p in paths:
        name = posixpath.relpath(p, base) if base else p
        fmt = detect_format(p, configured_format)
        if fmt is None:
            raise ConfigError(f"input.format: cannot tell the format of {p} from its name; set input.format")
        codec = compression_of(p)
        if codec is not None and fmt not in LINE_FORMATS:
            raise ConfigError(f"input.path: {p}: a compressed {fmt} file cannot be read ({fmt} files are read as "
                              "they are stored; Parquet compresses inside the file); decompress it")
        info = fs.info(p)
        if not info.get("size"):
            raise InputError(f"{p}: cannot be read: the file is empty (0 bytes); "
                             "remove it from the input if that is intended")
        uri = p if protocol in ("file", "local") else f"{protocol}://{p}"
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
        files.append(InputFile(uri=uri, name=name, format=fmt, size=int(info.get("size") or 0),
                               mtime=None if mtime is None else str(mtime)))
    if not files:
        passed = f" ({len(skipped)} skipped: {_few_skipped(skipped)})" if skipped else ""
        raise ConfigError(f"input.path: no readable input files in {path}{passed}")
    return Discovery(files, skipped)


def _protocol(fs: Any) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_local(fs: Any) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def _directory_files(fs: Any, root: str, configured_format: str, exclude: str | None,
                     skipped: list[SkippedFile]) -> list[str]:
    """The readable files under a directory input; the others go to ``skipped`` with the reason."""
    hidden_folders: dict[str, int] = {}
    keep = []
    for p in _outside(fs, root, sorted(fs.find(root)), exclude, skipped):
        rel = posixpath.relpath(p, root)
        parts = rel.split("/")
        hidden = next((i for i, part in enumerate(parts) if part.startswith((".", "_"))), None)
        if hidden == len(parts) - 1:
            skipped.append(SkippedFile(rel, f"the name starts with {parts[hidden][0]!r} (hidden files are not read)"))
        elif hidden is not None:
            folder = "/".join(parts[: hidden + 1]) + "/"
            hidden_folders[folder] = hidden_folders.get(folder, 0) + 1
        elif detect_format(p, configured_format) is None:
            suffixes = ", ".join(_SUFFIX_FORMATS)
            skipped.append(SkippedFile(rel, f"no reader takes its suffix (they take {suffixes}, optionally with "
                                            f"{', '.join(_COMPRESSIONS)}); set input.format to read every file in one format"))
        else:
            keep.append(p)
    for folder, count in hidden_folders.items():
        first = folder.rstrip("/").rsplit("/", 1)[-1][0]
        skipped.append(SkippedFile(folder, f"the folder's name starts with {first!r} (hidden: {_files(count)} "
                                           "not read)"))
    skipped.sort(key=lambda s: s.path)
    return keep


def _outside(fs: Any, base: str, paths: list[str], exclude: str | None, skipped: list[SkippedFile]) -> list[str]:
    """``paths`` less those inside ``exclude`` (the output directory), which is noted in ``skipped`` once."""
    inside = _relative_exclusion(fs, base, exclude)
    if inside is None:
        return paths
    keep = [p for p in paths if not _within(posixpath.relpath(p, base), inside)]
    if len(keep) < len(paths):
        left_out = len(paths) - len(keep)
        skipped.append(SkippedFile((inside or ".") + "/",
                                   f"the job's output directory (output.path): {_files(left_out)} not input"))
    return keep


def _files(count: int) -> str:
    return "its 1 file is" if count == 1 else f"its {count} files are"


def _within(rel: str, folder: str) -> bool:
    return folder == "" or rel == folder or rel.startswith(folder + "/")


def _relative_exclusion(fs: Any, base: str, exclude: str | None) -> str | None:
    """Where ``exclude`` lies under ``base``: a relative folder, '' when ``base`` is inside it, None when apart."""
    if not exclude:
        return None
    try:
        other, target = fsspec.core.url_to_fs(str(exclude))
    except (ValueError, ImportError):
        return None
    if _protocol(other) != _protocol(fs):
        return None
    base, target = base.rstrip("/") or "/", target.rstrip("/") or "/"
    if _is_local(fs):
        base, target = os.path.realpath(base), os.path.realpath(target)
    rel = posixpath.relpath(target, base)
    if rel == ".":
        return ""
    if rel == ".." or rel.startswith("../"):
        return "" if not posixpath.relpath(base, target).startswith("..") else None
    return rel


def _log_skipped(path: str, skipped: list[SkippedFile]) -> None:
    for entry in skipped[:_SKIPS_LOGGED]:
        hidden = "hidden" in entry.reason or "output directory" in entry.reason
        log.log(logging.INFO if hidden else logging.WARNING, "input %s: skipping %s: %s", path, entry.path, entry.reason)
    if len(skipped) > _SKIPS_LOGGED:
        log.warning("input %s: skipping %d more files (embedpipe plan lists them all)", path,
                    len(skipped) - _SKIPS_LOGGED)


def _few_skipped(skipped: list[SkippedFile], keep: int = 3) -> str:
    shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:keep])
    return shown + (f"; … ({len(skipped)} in all)" if len(skipped) > keep else "")


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


# What opening and decoding a damaged or unreadable file raises (gzip: EOFError, BadGzipFile is an OSError).
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, pa.ArrowException)
try:  # a Python built without liblzma has no lzma module: .xz inputs are then refused by compression_of
    import lzma

    _READ_ERRORS += (lzma.LZMAError,)
except ImportError:  # pragma: no cover
    pass
try:
    import zstandard

    _READ_ERRORS += (zstandard.ZstdError,)
except ImportError:  # pragma: no cover - without it, compression_of refuses .zst inputs (a ConfigError)
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


def compression_of(name: str) -> str | None:
    """The fsspec codec that decompresses ``name``, by its suffix (None: not compressed).

    Raises:
        ConfigError: the suffix is a compression the readers take (.gz, .bz2, .xz, .zst) but its
            decompressor is missing here, naming the file and what to install; never raw bytes read.
    """
    lower = name.lower()
    for suffix, needs in _DECOMPRESSORS.items():
        if lower.endswith(suffix):
            codec = fsspec.utils.infer_compression(lower)
            if codec is None:
                raise ConfigError(f"input.path: {name}: cannot decompress {suffix} here: it needs {needs}; "
                                  "install it, or decompress the file")
            return codec
    return fsspec.utils.infer_compression(lower)


def open_binary(uri: str) -> Any:
    """Open a file for reading bytes, decompressing by suffix (.gz etc.; see :func:`compression_of`)."""
    return fsspec.open(uri, "rb", compression=compression_of(uri)).open()


# ---------------------------------------------------------------- columns


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
        return None, None, f"no {text_column!r} field (input.text_column) in this row"
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
    if byte_start == 0 and data.startswith(_BOM):
        data = data[len(_BOM):]  # a byte order mark, not text: the plan's offsets still count it
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
        if file.format == "jsonl" and not line.strip():
            batch.blank += 1  # not a row: counted apart, never quarantined
            continue
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
    if batch.rows_read or batch.blank:
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


def read_columnar_rows(file: InputFile, first_row: int, num_rows: int, text_column: str,
                       id_column: str | None, batch_rows: int, rules: TextRules = DEFAULT_RULES) -> Iterator[RowBatch]:
    """Read rows [first_row, first_row + num_rows) of a Parquet or Arrow file."""
    columns = [text_column] + ([id_column] if id_column and id_column != text_column else [])
    with reading(file, f"rows {first_row}-{first_row + num_rows - 1}"):
        table = _columnar_table(file, first_row, num_rows, columns)
    table = _decoded(table)
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
