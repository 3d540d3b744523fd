"""The local executor: a job's tasks and encoder actors in worker processes on this machine, without Ray.

Each worker is a plain ``python -m pipeline.run.local_worker`` process talking over a socket pair
(no cluster to start or stop: a worker is ready in a fraction of a second, where ``ray.init`` and
``ray.shutdown`` cost seconds). Tasks wait in a queue until their CPU slots are free, exactly as Ray
books them (a tokenize task 1 CPU, an encoder actor what :func:`~pipeline.run.encoder_pool.size_encoders`
says), and go to an idle task worker; an actor is a worker of its own that keeps its object (the loaded
model) between calls. A worker that dies (kill -9, the OOM killer) fails the calls it held with
:class:`~pipeline.run.engine.WorkerLost`, and the driver runs them again, as it does for Ray. Results
travel back pickled over the socket; the driver holds them until the task that needs them is sent.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from pipeline.run.engine import TaskFailed, WorkerLost

_EPSILON = 1e-9
# Modules a task worker imports as soon as it starts, while the driver still plans the job.
_TASK_MODULES = ("pipeline.run.tasks",)


def local_cpus(num_cpus: int | None) -> int:
    """CPU slots of the local executor: ``ray.num_cpus`` if set, else the cores this process may use."""
    if num_cpus:
        return num_cpus
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(eq=False)
class LocalRef:
    """The result of one task or call, filled in when its worker answers."""

    done: bool = False
    ok: bool = False
    value: Any = None  # the result, or the TaskFailed / WorkerLost to raise


@dataclass(eq=False)
class _Call:
    message: tuple[Any, ...]
    refs: tuple[LocalRef, ...]
    num_cpus: float = 0.0  # slots a task holds while it runs (actors book theirs once)


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen
    conn: Connection
    actor: bool
    booked: float = 0.0  # an actor's CPU slots, given back when it dies
    calls: deque[_Call] = field(default_factory=deque)  # sent, not yet answered, in order
    alive: bool = True


class LocalEngine:
    """Tasks and actors in local worker processes (see the module docstring)."""

    name = "local"

    def __init__(self, cpus: int, env: dict[str, str]) -> None:
        self.cpus = cpus
        self._env = {**os.environ, **env}
        self._free = float(cpus)
        self._ids = itertools.count()
        self._idle: list[_Worker] = []
        self._workers: list[_Worker] = []
        self._queue: list[tuple[_Call, tuple[Any, ...]]] = []  # tasks waiting for CPU slots, with their args

    # ------------------------------------------------------------ the Engine interface

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.cpus), "GPU": 0.0}

    def describe(self) -> dict[str, Any]:
        return {"executor": "local", "address": None, "nodes": 1, "cpus": float(self.cpus), "gpus": 0.0}

    def put(self, value: Any) -> Any:
        return value  # no object store: each task gets its own pickled copy

    def submit(self, fn: Any, *args: Any, num_cpus: float) -> LocalRef:
        ref = LocalRef()
        self._queue.append((_Call(("task", next(self._ids), fn), (ref,), num_cpus), args))
        self._dispatch()
        return ref

    def start_actor(self, cls: type, *args: Any, resources: dict[str, float]) -> _Worker:
        worker = self._spawn(actor=True)
        worker.booked = float(resources.get("num_cpus", 0.0))
        self._free -= worker.booked
        self._send(worker, _Call(("init", next(self._ids), cls, args), (LocalRef(),)))
        return worker

    def call(self, actor: _Worker, method: str, *args: Any, num_returns: int = 1) -> Any:
        refs = tuple(LocalRef() for _ in range(num_returns))
        call = _Call(("call", next(self._ids), method, args), refs)
        if actor.alive:
            self._send(actor, call)
        else:
            self._fail(call, WorkerLost("ActorDied", f"local encoder process {actor.process.pid} is gone"))
        return refs[0] if num_returns == 1 else refs

    def kill(self, actor: _Worker) -> None:
        if actor.alive:
            actor.process.kill()
            self._lost(actor)

    def wait(self, handles: list[LocalRef], timeout: float) -> list[LocalRef]:
        deadline = time.monotonic() + timeout
        while True:
            done = [h for h in handles if h.done]
            left = deadline - time.monotonic()
            if done or left <= 0:
                return done
            self._pump(left)

    def get(self, handle: LocalRef) -> Any:
        while not handle.done:
            self._pump(0.5)
        if handle.ok:
            return handle.value
        raise handle.value

    # ------------------------------------------------------------ start and stop

    def prestart(self, tasks: int | None) -> None:
        """Start the task workers the first tasks will need now, so their start overlaps the driver's."""
        for _ in range(min(self.cpus, tasks if tasks is not None else self.cpus) - len(self._idle)):
            self._idle.append(self._spawn(actor=False))

    def shutdown(self) -> None:
        """Stop every worker at once. An idle one holds nothing; a busy one is abandoned as after a kill -9
        (the job is failing or stopping, and a commit is atomic). Killing, rather than letting each
        interpreter tear down its imports, saves the driver a wait of about half a second."""
        for worker in self._workers:
            worker.process.kill()
            worker.conn.close()
        for worker in self._workers:
            worker.process.wait()
        self._workers.clear()
        self._idle.clear()

    # ------------------------------------------------------------ inside

    def _spawn(self, actor: bool) -> _Worker:
        ours, theirs = socket.socketpair()
        modules = () if actor else _TASK_MODULES
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.run.local_worker", str(theirs.fileno()), *modules],
            pass_fds=[theirs.fileno()], env=self._env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        theirs.close()
        worker = _Worker(process, Connection(ours.detach()), actor)
        self._workers.append(worker)
        return worker

    def _dispatch(self) -> None:
        """Send queued tasks whose CPU slots are free to idle workers (first fit, in submission order)."""
        index = 0
        while index < len(self._queue):
            call, args = self._queue[index]
            if call.num_cpus > self._free + _EPSILON:
                index += 1
                continue
            del self._queue[index]
            try:
                resolved = tuple(self._value(arg) for arg in args)
            except (TaskFailed, WorkerLost) as exc:  # an input of the task failed: so does the task
                self._fail(call, exc)
                continue
            call.message = (*call.message, resolved)
            self._free -= call.num_cpus
            self._send(self._idle.pop() if self._idle else self._spawn(actor=False), call)

    @staticmethod
    def _value(arg: Any) -> Any:
        if not isinstance(arg, LocalRef):
            return arg
        if not arg.done:
            raise RuntimeError("a task was given a result that is not ready")  # the driver never does
        if not arg.ok:
            raise arg.value
        return arg.value

    def _send(self, worker: _Worker, call: _Call) -> None:
        worker.calls.append(call)
        try:
            worker.conn.send(call.message)
        except OSError:  # the worker died: _lost fails this call with the others
            self._lost(worker)

    def _pump(self, timeout: float) -> None:
        """Read the answers that arrive within ``timeout`` seconds; notice workers that died."""
        busy = {w.conn: w for w in self._workers if w.alive and w.calls}
        if not busy:
            time.sleep(min(timeout, 0.05))
            return
        for conn in wait(list(busy), timeout):
            worker = busy[conn]
            try:
                call_id, ok, value = conn.recv()
            except (EOFError, OSError):
                self._lost(worker)
                continue
            call = worker.calls.popleft()
            assert call.message[1] == call_id, (call.message[1], call_id)
            if ok:
                values = value if len(call.refs) > 1 else (value,)
                for ref, result in zip(call.refs, values):
                    ref.done, ref.ok, ref.value = True, True, result
            else:
                self._fail(call, TaskFailed(value))
            if not worker.actor:
                self._free += call.num_cpus
                self._idle.append(worker)
        self._dispatch()

    def _lost(self, worker: _Worker) -> None:
        """A worker died: fail what it held, give its slots back, and forget it."""
        if not worker.alive:
            return
        worker.alive = False
        worker.conn.close()
        try:
            code = worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            code = worker.process.wait()
        what = "encoder process" if worker.actor else "task process"
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        lost = WorkerLost("WorkerLost", f"local {what} {worker.process.pid} died ({how})")
        while worker.calls:
            call = worker.calls.popleft()
            self._free += call.num_cpus
            self._fail(call, lost)
        self._free += worker.booked
        worker.booked = 0.0
        self._workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)

    @staticmethod
    def _fail(call: _Call, error: Exception) -> None:
        for ref in call.refs:
            ref.done, ref.ok, ref.value = True, False, error
