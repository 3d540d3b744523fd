"""Input files as the plan sees them (format, compression, content tag), rows and bad rows, and opening them.

Every path goes through fsspec, so local paths and URIs (``s3://``, ``gs://``, ``memory://`` ...) work alike.
A compressed file whose decompressor is missing (``.zst`` without ``zstandard``) is a :class:`ConfigError`
naming the file and what to install.
"""

from __future__ import annotations

import logging
import posixpath
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import fsspec.utils
import pyarrow as pa

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
    etag: str | None = None
    """A content tag the store keeps for the object (S3 ETag, GCS md5Hash, ...), None on a local disk.
    Not in :meth:`fingerprint`: it lets a resume skip re-hashing an unchanged object (see
    :mod:`pipeline.inputs.identity`)."""

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


# Keys of ``fs.info`` whose value changes whenever the object's bytes change: s3fs (ETag), gcsfs (md5Hash,
# else etag), adlfs (etag). Not a 32-bit checksum (crc32c: too weak to stand for the bytes), and an
# HTTP ETag only when strong (a weak ``W/`` ETag may stay the same across a change of bytes).
_CONTENT_TAGS = ("md5Hash", "ETag", "etag")


def content_tag(info: dict[str, Any]) -> str | None:
    """The store's content tag of an object (``"ETag:<value>"``), None when it keeps none (a local disk)."""
    for key in _CONTENT_TAGS:
        value = info.get(key)
        if isinstance(value, str) and value.strip('"') and not value.startswith("W/"):
            return f"{key}:{value}"
    return None


# What opening and decoding a damaged or unreadable file raises (gzip: EOFError, BadGzipFile is an OSError).
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, pa.ArrowException)


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
