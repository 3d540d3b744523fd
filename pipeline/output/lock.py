"""One job per output directory: ``OUT/.lock``, held with ``flock`` for the life of the driver.

The kernel releases a ``flock`` when its holder dies, however it dies (kill -9
included), so a lock left by a dead job is simply free: the next job takes it
over and says whose it was. The file itself is never deleted (deleting a locked
file lets two jobs lock two different files); it records the holder's host, pid
and start time for the messages of ``LockHeld`` and ``embedpipe status``.

An object store has no ``flock``. There the lock is a lease: ``OUT/.lock`` is
created with a conditional write (it fails if the object exists), holds an expiry
time that the driver renews every ``LEASE_SECONDS / 4``, and is deleted on release.
A lock whose lease ran out, or whose holder was a process on this host that is
gone, is taken over. The lease relies on the hosts' clocks agreeing to well
within ``LEASE_SECONDS``, and a driver cut off from the store for longer than the
lease loses the lock (a second job may then start).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import LockHeld
from pipeline.output.contract import LOCK_NAME
from pipeline.output.manifest import now
from pipeline.output.storage import create_exclusive, is_remote, output_path, put_object

log = logging.getLogger(__name__)

# How long an object-store lock outlives its holder's last renewal.
LEASE_SECONDS = float(os.environ.get("EMBEDPIPE_LOCK_LEASE_SECONDS", "60"))


@dataclass
class LockInfo:
    """Who holds (or last held) an output directory's lock."""

    host: str
    pid: int
    started_at: str
    command: str = ""
    expires_at: float | None = None  # object-store leases only: epoch seconds

    def alive(self) -> bool:
        """Whether an object-store lease still binds: not expired, and not left by a dead process of this host."""
        if self.expires_at is None or self.expires_at < time.time():
            return False
        return self.host != socket.gethostname() or _pid_alive(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started_at}" + (f" ({self.command})" if self.command else "")


def _read_info(fd: int) -> LockInfo | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        return LockInfo(**json.loads(raw)) if raw.strip() else None
    except (ValueError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held_message(out_dir: Any, holder: LockInfo | None, lock_path: Any) -> str:
    who = holder.describe() if holder else "another process"
    return f"{out_dir} is locked by a running job: {who}; wait for it to finish (the lock is {lock_path})"


def output_lock(out_dir: Path | str, command: str = "") -> FileLock | LeaseLock:
    """The lock of one output directory (a local path or an fsspec URL); use as a context manager around a job.

    Raises:
        LockHeld: another live process holds it (the message names the holder).
    """
    path = output_path(out_dir)
    return LeaseLock(path, command) if is_remote(path) else FileLock(path, command)


class FileLock:
    """``flock`` on ``OUT/.lock`` of a local (or shared POSIX) output directory."""

    def __init__(self, out_dir: Path, command: str = "") -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.command = command
        self.fd: int | None = None
        self.previous: LockInfo | None = None  # the dead holder whose lock was taken over, if any

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_info(fd)
            os.close(fd)
            raise LockHeld(_held_message(self.path.parent, holder, self.path)) from None
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

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class LeaseLock:
    """A renewed lease on ``OUT/.lock`` of an object-store output (see the module docstring)."""

    def __init__(self, out_dir: Any, command: str = "") -> None:
        self.path = out_dir / LOCK_NAME
        self.command = command
        self.info: LockInfo | None = None
        self.previous: LockInfo | None = None  # the dead or expired holder whose lock was taken over, if any
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _lease(self) -> bytes:
        assert self.info is not None
        self.info.expires_at = time.time() + LEASE_SECONDS
        return json.dumps(self.info.__dict__).encode()

    def acquire(self) -> LeaseLock:
        self.info = LockInfo(socket.gethostname(), os.getpid(), now(), self.command)
        if not create_exclusive(self.path, self._lease()):
            holder = _read_object(self.path)
            if holder is not None and holder.alive():
                raise LockHeld(_held_message(self.path.parent, holder, self.path))
            # A dead or expired holder's lock (or one released meanwhile): remove it, then race for it like anyone else.
            try:
                self.path.fs.rm_file(self.path.path)
            except FileNotFoundError:
                pass
            if not create_exclusive(self.path, self._lease()):
                raise LockHeld(_held_message(self.path.parent, _read_object(self.path), self.path))
            self.previous = holder
        self._renewer = threading.Thread(target=self._renew, name="embedpipe-lock-lease", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            try:
                put_object(self.path, self._lease())
            except Exception as exc:  # noqa: BLE001 - a store hiccup: the next renewal, well within the lease, retries
                log.warning("could not renew the lease on %s: %s", self.path, exc)

    def release(self) -> None:
        if self._renewer is None:
            return
        self._stop.set()
        self._renewer.join()
        self._renewer = None
        try:
            self.path.fs.rm_file(self.path.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> LeaseLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_object(path: Any) -> LockInfo | None:
    try:
        return LockInfo(**json.loads(path.read_bytes()))
    except (FileNotFoundError, ValueError, TypeError):  # gone, or not ours (uploads are whole: never half-written)
        return None


def lock_holder(out_dir: Path | str) -> LockInfo | None:
    """The live holder of ``out_dir``'s lock, or None when no job holds it (never blocks, never takes it)."""
    path = output_path(out_dir) / LOCK_NAME
    if is_remote(path):
        holder = _read_object(path)
        return holder if holder is not None and holder.alive() else None
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
