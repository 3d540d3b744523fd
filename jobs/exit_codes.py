"""The one map from embedpipe's errors to exit statuses, for every command.

0 done; 1 the job failed (a unit, a shard, bad input past the quarantine limit, the driver's own
writes); 2 bad usage or config; 3 the output is locked by another live job.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from pipeline.errors import ConfigError, InputError, JobFailed, LockHeld

EXIT_CODES: dict[type[Exception], int] = {JobFailed: 1, InputError: 1, ConfigError: 2, LockHeld: 3}
HANDLED = tuple(EXIT_CODES)


def fail(exc: Exception) -> None:
    """Print ``exc`` as embedpipe's one error line and exit with its status."""
    code = next(code for kind, code in EXIT_CODES.items() if isinstance(exc, kind))
    click.echo(f"embedpipe: error: {exc}", err=True)
    sys.exit(code)


def as_job_failure(exc: OSError) -> JobFailed:
    """The driver's own writes failed (a full disk, a read-only or vanished output): the job failed, resumable."""
    where = f"{exc.filename}: " if exc.filename else ""
    return JobFailed(f"{where}{exc.strerror or exc}; committed shards are kept, rerun the same command "
                     "once the cause is fixed")


@contextmanager
def errors_to_exit_codes() -> Iterator[None]:
    """Turn embedpipe's errors raised inside the block into their exit status and one line on stderr."""
    try:
        yield
    except HANDLED as exc:
        fail(exc)
    except OSError as exc:
        fail(as_job_failure(exc))
