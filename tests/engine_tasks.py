"""Functions and an actor class for tests/test_local_engine.py: importable by the engine's worker processes."""

from __future__ import annotations

import os
import signal
import time


def square(x: int) -> int:
    return x * x


def add(*values: int) -> int:
    return sum(values)


def stamp(seconds: float) -> tuple[int, float, float]:
    """(pid, start, end) of a task that sleeps ``seconds``."""
    start = time.monotonic()
    time.sleep(seconds)
    return os.getpid(), start, time.monotonic()


def fail(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def env(name: str) -> str | None:
    return os.environ.get(name)


def interrupt_self_then_answer() -> str:
    """A worker ignores SIGINT (a Ctrl-C reaches the whole process group; the driver decides)."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    return "still here"


class Counter:
    """An actor with state kept between calls."""

    def __init__(self, start: int) -> None:
        self.value = start

    def bump(self, by: int) -> int:
        self.value += by
        return self.value

    def pair(self) -> tuple[int, int]:
        return self.value, os.getpid()

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class BrokenActor:
    def __init__(self) -> None:
        raise RuntimeError("cannot start")

    def ping(self) -> str:
        return "pong"
