"""Every exception embedpipe raises on purpose, in one place.

The CLI maps them to exit codes: ConfigError -> 2, LockHeld -> 3,
JobFailed / InputError -> 1.
"""

from __future__ import annotations


class EmbedpipeError(Exception):
    """Base class: an error whose message is meant for the user as it is."""


class ConfigError(EmbedpipeError):
    """The job's configuration is invalid; raised before any work starts."""


class InputError(EmbedpipeError):
    """An input file cannot be read: the message names the file, the position and the reason."""


class JobFailed(EmbedpipeError):
    """A work unit failed after its retries; committed shards stay for the next run."""


class LockHeld(EmbedpipeError):
    """Another live job holds the output directory."""


class Interrupted(EmbedpipeError):
    """The job was stopped by a signal (SIGTERM, SIGINT); what was committed stays, a rerun resumes."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
