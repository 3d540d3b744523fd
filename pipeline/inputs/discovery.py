"""Finding the input files of ``input.path``: a file, a directory or a glob, local or fsspec.

An input path that exists is that file or directory, even when its name holds glob characters
(``data[1].jsonl``); it is a glob pattern only when no such path exists. Files of a directory input
that are not read (a suffix the readers do not take, a name starting with ``_`` or ``.``, the job's own
output directory) are logged on the ``embedpipe`` logger and listed in :attr:`Discovery.skipped`.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import fsspec.utils

from pipeline.errors import ConfigError, InputError
from pipeline.inputs.files import (
    _COMPRESSIONS,
    _SUFFIX_FORMATS,
    LINE_FORMATS,
    InputFile,
    compression_of,
    content_tag,
    detect_format,
)

log = logging.getLogger("embedpipe")


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
                               mtime=None if mtime is None else str(mtime), etag=content_tag(info)))
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
