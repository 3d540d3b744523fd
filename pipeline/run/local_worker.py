"""One worker process of the local executor: runs the calls it receives over a socket, one at a time.

Started by :class:`pipeline.run.local_engine.LocalEngine` as ``python -m pipeline.run.local_worker FD
[MODULE...]`` (the modules are imported at once, while the driver still prepares the job). Messages are
pickled tuples: ``("task", id, fn, args)`` runs ``fn(*args)``; ``("init", id, cls, args)`` makes the
process an actor holding ``cls(*args)``; ``("call", id, method, args)`` calls a method of it. Each is
answered ``(id, True, result)`` or ``(id, False, exception)``. The process ignores SIGINT (the driver
decides how a job stops), dies with the driver (``PR_SET_PDEATHSIG`` on Linux; elsewhere it notices
the closed socket between calls), and exits when the driver closes the socket.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the driver dies, so no worker outlives a killed job."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the driver died before the prctl took effect
        os._exit(1)


def _sendable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 (any pickling failure)
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def serve(conn: Connection) -> None:
    """Answer calls until the driver closes the connection."""
    instance: Any = None
    init_error: BaseException | None = None
    while True:
        try:
            kind, call_id, target, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if kind == "task":
                result = target(*args)
            elif kind == "init":
                instance, result = target(*args), None
            elif init_error is not None:
                raise init_error
            else:
                result = getattr(instance, target)(*args)
            reply = (call_id, True, result)
        except Exception as exc:  # noqa: BLE001 (every failure of the work goes back to the driver)
            if kind == "init":
                init_error = exc
            reply = (call_id, False, _sendable(exc))
        try:
            conn.send(reply)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            return
        except Exception as exc:  # noqa: BLE001 (the result itself could not be pickled)
            conn.send((call_id, False, RuntimeError(f"cannot send the result back: {exc}")))


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    fd = int(argv[0])
    conn = Connection(fd)
    for module in argv[1:]:
        importlib.import_module(module)
    serve(conn)


if __name__ == "__main__":
    main(sys.argv[1:])
