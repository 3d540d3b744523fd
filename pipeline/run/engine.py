"""Where a job's tasks and encoder actors run: a Ray cluster, or worker processes on this machine.

The driver (:mod:`pipeline.run.driver`) and the encoder pool speak only this small interface:
submit a function as a task, start an actor and call its methods, wait for any of a set of
results, get one. Getting a result raises :class:`TaskFailed` when the function itself raised
(its exception is ``cause``) and :class:`WorkerLost` when the process or node running it is gone
(worth running again). Two engines implement it:

- :class:`pipeline.run.ray_engine.RayEngine`: Ray tasks and actors on a Ray cluster (joined, or
  started for the job);
- :class:`pipeline.run.local_engine.LocalEngine`: worker processes on this machine, with no Ray
  at all (no cluster to start or stop: seconds less per command).

``ray.executor`` chooses (:mod:`pipeline.run.executor`); both run the same pure stage functions on
the same commit and resume path, so an output's bytes do not depend on the executor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

# Set in every task and actor process (not as a Ray runtime_env, which costs ~1 s of worker start-up):
# tokenizers' own thread pool must not fight the engine's CPU slots; a worker draws no progress bars
# (transformers' "Loading weights" in each encoder would interleave with the driver's display).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class TaskFailed(Exception):
    """The task or actor method raised ``cause``: a fault of the work itself, not worth blind retries."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class WorkerLost(Exception):
    """The process or node running a task or actor is gone (killed, out of memory, node lost)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class Engine(Protocol):
    """What the driver needs from an executor (see the module docstring)."""

    name: str

    def resources(self) -> dict[str, float]:
        """Total ``CPU`` and ``GPU`` slots."""

    def describe(self) -> dict[str, Any]:
        """The cluster, for the run record: executor, address, nodes, cpus, gpus."""

    def put(self, value: Any) -> Any:
        """A handle to pass ``value`` to many tasks without copying it for each (where the engine can)."""

    def submit(self, fn: Callable[..., Any], *args: Any, num_cpus: float) -> Any:
        """Run ``fn(*args)`` as a task holding ``num_cpus`` slots; returns a result handle."""

    def start_actor(self, cls: type, *args: Any, resources: dict[str, float]) -> Any:
        """Start ``cls(*args)`` in a process of its own, holding ``resources`` while it lives."""

    def call(self, actor: Any, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Call ``actor.method(*args)``; calls run one at a time, in order. ``num_returns`` > 1: a tuple."""

    def kill(self, actor: Any) -> None:
        """Stop an actor for good (its calls not yet done raise :class:`WorkerLost`)."""

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        """The handles among ``handles`` that are done (at least one, unless ``timeout`` seconds pass)."""

    def get(self, handle: Any) -> Any:
        """The result, or :class:`TaskFailed` / :class:`WorkerLost`."""


def current_node() -> str:
    """Where this task runs, for the run report: the Ray node id, or ``local``."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return "local"
