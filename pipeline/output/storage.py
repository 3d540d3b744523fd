"""Where an output lives: a local directory, or an object store / remote filesystem by its fsspec URL.

Every module that touches an output directory takes its paths from :func:`output_path`, which gives a
``pathlib.Path`` for a local directory and a ``upath.UPath`` (the same API over fsspec) for a URL such
as ``s3://bucket/prefix``, ``gs://…`` or ``az://…``. Joining, listing, ``stat`` and reading then work the
same way for both; only committing a file and locking differ (see :mod:`pipeline.output.shards`,
:mod:`pipeline.output.lock`).

Credentials and endpoints come from the environment the way each fsspec backend reads them
(``AWS_*`` for s3fs, ``GOOGLE_APPLICATION_CREDENTIALS`` for gcsfs, or ``FSSPEC_<PROTOCOL>_<OPTION>``
for any option of any backend), never from the job config, so no secret lands in the manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from upath import UPath

_LOCAL_PROTOCOLS = ("", "file", "local")

Location = Union[Path, "UPath"]
"""An output location as :func:`output_path` resolves it, once, where a command or a worker task starts:
the one object the layers below take (they do not coerce strings again)."""


def output_path(location: str | Path) -> Location:
    """The output ``location`` as a path object: ``pathlib.Path`` when local, ``UPath`` for a URL."""
    if isinstance(location, Path):
        return location
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" in text:
        from upath import UPath  # fsspec: a tenth of a second to import, for remote outputs only

        return UPath(text)
    return Path(text)


def is_remote(path: Any) -> bool:
    """Whether ``path`` (from :func:`output_path`) lives on a remote filesystem rather than a local disk."""
    return getattr(path, "protocol", "") not in _LOCAL_PROTOCOLS


def put_object(path: Any, data: bytes | memoryview) -> None:
    """Upload ``data`` as the whole object at remote ``path`` in one call.

    An object store makes an object visible only when its upload completes (a single PUT, or the
    completion of a multipart upload), so readers see the whole object or nothing; an upload that
    fails part-way leaves nothing behind but an incomplete multipart upload, which is never listed.
    """
    path.fs.pipe_file(path.path, bytes(data))


def create_exclusive(path: Any, data: bytes) -> bool:
    """Create remote ``path`` holding ``data`` unless it exists (a conditional write); False if it existed.

    Needs a backend with exclusive create (``mode="xb"``): S3 and S3-compatible stores with conditional
    writes (s3fs), GCS (gcsfs) and Azure (adlfs).
    """
    try:
        with path.fs.open(path.path, "xb") as fh:
            fh.write(data)
    except FileExistsError:
        return False
    return True


def remove_tree(path: Any) -> None:
    """Delete a file or a whole directory (prefix) if it exists."""
    if is_remote(path):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
        return
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

