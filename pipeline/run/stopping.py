"""Stopping a job cleanly on SIGTERM or SIGINT.

Schedulers (Kubernetes, systemd, Slurm) send SIGTERM first and SIGKILL after a grace period
(Kubernetes: 30 s), and a person presses Ctrl-C. On the first signal the driver stops submitting
work, records the shards that finish within ``grace`` seconds, then stops: the manifest says
``interrupted``, Ray is shut down, the lock released, the run report written, and the command exits
128 + the signal number (143 for SIGTERM, 130 for SIGINT). A second signal stops at once. Work
abandoned in flight leaves at most files under ``.staging/`` (removed by the next run) or a shard
committed but not listed, which the rerun writes again byte for byte.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEFAULT_GRACE = 10.0
"""Seconds to let in-flight shards finish: well under Kubernetes' default 30 s before SIGKILL."""


class StopRequest:
    """Set by a signal; polled by the driver between waits."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.signum: int | None = None
        self.deadline: float | None = None
        self.now = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.now = True  # a second signal: do not wait for anything
            return
        self.signum = signum
        self.deadline = time.monotonic() + self.grace

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def out_of_time(self) -> bool:
        return self.now or (self.deadline is not None and time.monotonic() >= self.deadline)

    def error(self, committed: str) -> Interrupted:
        name = signal.Signals(self.signum).name if self.signum else "a signal"
        return Interrupted(f"interrupted by {name}: {committed}; rerun the same command to resume",
                           self.signum or signal.SIGTERM)

    def check(self, committed: str = "nothing was committed") -> None:
        """Raise :class:`Interrupted` if a signal came (for the phases before any work is submitted)."""
        if self.requested:
            raise self.error(committed)


@contextmanager
def stop_on_signals(grace: float = DEFAULT_GRACE) -> Iterator[StopRequest]:
    """Catch SIGTERM and SIGINT into a :class:`StopRequest` for the block (main thread only)."""
    request = StopRequest(grace)
    if threading.current_thread() is not threading.main_thread():
        yield request  # signals are delivered to the main thread only: nothing to catch here
        return
    previous = {s: signal.signal(s, request) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def install(request: StopRequest) -> None:
    """Install ``request`` again (after ``ray.init``, which may set handlers of its own)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, request)
