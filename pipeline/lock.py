"""One job per output directory: ``OUT/.lock``, held with ``flock`` for the life of the driver.

The kernel releases a ``flock`` when its holder dies, however it dies (kill -9
included), so a lock left by a dead job is simply free: the next job takes it
over and says whose it was. The file itself is never deleted (deleting a locked
file lets two jobs lock two different files); it records the holder's host, pid
and start time for the messages of ``LockHeld`` and ``embedpipe status``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import LockHeld
from pipeline.manifest import now

LOCK_NAME = ".lock"


@dataclass
class LockInfo:
    """Who holds (or last held) an output directory's lock."""

    host: str
    pid: int
    started_at: str
    command: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started_at}" + (f" ({self.command})" if self.command else "")


def _read_info(fd: int) -> LockInfo | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        return LockInfo(**json.loads(raw)) if raw.strip() else None
    except (ValueError, TypeError):
        return None


class OutputLock:
    """The lock of one output directory; use as a context manager around a job.

    Raises:
        LockHeld: another live process holds it (the message names the holder).
    """

    def __init__(self, out_dir: Path, command: str = "") -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.command = command
        self.fd: int | None = None
        self.previous: LockInfo | None = None  # the dead holder whose lock was taken over, if any

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_info(fd)
            os.close(fd)
            who = holder.describe() if holder else "another process"
            raise LockHeld(f"{self.path.parent} is locked by a running job: {who}; "
                           f"wait for it to finish (the lock is {self.path})") from None
        self.previous = _read_info(fd)
        info = LockInfo(socket.gethostname(), os.getpid(), now(), self.command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info.__dict__).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # an empty lock file reads as "free"; the flock goes with the close
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(out_dir: Path) -> LockInfo | None:
    """The live holder of ``out_dir``'s lock, or None when no job holds it (never blocks, never takes it)."""
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd) or LockInfo("?", 0, "?")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
