"""Where a job's tasks and encoder actors run: a Ray cluster, or worker processes on this machine.

The driver (:mod:`pipeline.run.driver`) and the encoder pool speak only this small interface:
submit a function as a task, start an actor and call its methods, wait for any of a set of
results, get one. Getting a result raises :class:`TaskFailed` when the function itself raised
(its exception is ``cause``) and :class:`WorkerLost` when the process or node running it is gone
(worth running again). Two engines implement it:

- :class:`RayEngine`: Ray tasks and actors on a Ray cluster (joined, or started for the job);
- :class:`pipeline.run.local_engine.LocalEngine`: worker processes on this machine, with no Ray
  at all (no cluster to start or stop: seconds less per command).

``ray.executor`` chooses (see :func:`choose_executor`); both run the same pure stage functions on
the same commit and resume path, so an output's bytes do not depend on the executor.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import JobConfig

log = logging.getLogger("embedpipe")

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


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing torch or Ray (``CUDA_VISIBLE_DEVICES`` honoured)."""
    try:
        found = len(list(Path("/proc/driver/nvidia/gpus").iterdir()))
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    return min(found, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))


def choose_executor(config: JobConfig) -> str:
    """``local`` or ``ray`` for the job (``ray.executor``; ``auto`` picks one as below).

    auto: Ray when a cluster is named (``ray.address``, ``RAY_ADDRESS``), Ray is already initialized
    in this process, or a GPU is visible (the local executor runs encoders on CPU only); otherwise
    local worker processes, which start in well under a second where a Ray cluster takes seconds.

    Raises:
        ConfigError: ``executor: local`` with a cluster address, or with ``encoder.device: cuda``.
    """
    executor = config.ray.executor
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if executor == "local":
        if config.ray.address:
            raise ConfigError(f"ray.executor: 'local' runs on this machine without Ray, but ray.address is "
                              f"{config.ray.address!r}; unset one of them")
        if config.encoder.device == "cuda":
            raise ConfigError("ray.executor: 'local' runs encoders on CPU only; use executor: ray (or auto) "
                              "for encoder.device: cuda")
        return "local"
    if executor == "ray" or address or _ray_initialized() or visible_gpus():
        return "ray"
    return "local"


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to ask
    return bool(ray and ray.is_initialized())


@contextmanager
def engine_session(config: JobConfig, expected_tasks: int | None = None) -> Iterator[Engine]:
    """The job's engine, started for the block and shut down after it (see :func:`choose_executor`)."""
    if choose_executor(config) == "local":
        from pipeline.run.local_engine import LocalEngine, local_cpus

        engine = LocalEngine(local_cpus(config.ray.num_cpus), env=WORKER_ENV)
        engine.prestart(expected_tasks)
        try:
            yield engine
        finally:
            engine.shutdown()
        return
    with _ray_session(config):
        yield RayEngine()


@contextmanager
def _ray_session(config: JobConfig) -> Iterator[None]:
    """Join the connected Ray cluster, else start or join the configured one (shut down on exit)."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    if address:
        ray.init(address=address, **kwargs)
    else:  # "local": a new cluster, even when one started by `ray start` runs on this machine
        ray.init(address="local", num_cpus=config.ray.num_cpus, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


class RayEngine:
    """Tasks and actors on the connected Ray cluster (Ray retries lost tasks and restarts lost actors)."""

    name = "ray"

    def __init__(self) -> None:
        import ray

        self._ray = ray
        self._remote: dict[tuple[Any, float], Any] = {}

    def resources(self) -> dict[str, float]:
        resources = self._ray.cluster_resources()
        return {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)}

    def describe(self) -> dict[str, Any]:
        resources = self.resources()
        nodes = [n for n in self._ray.nodes() if n.get("Alive")]
        return {"executor": "ray", "address": self._ray.get_runtime_context().gcs_address, "nodes": len(nodes),
                "cpus": resources["CPU"], "gpus": resources["GPU"]}

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def submit(self, fn: Callable[..., Any], *args: Any, num_cpus: float) -> Any:
        key = (fn, num_cpus)
        if key not in self._remote:
            self._remote[key] = self._ray.remote(num_cpus=num_cpus, max_retries=3, retry_exceptions=False)(fn)
        return self._remote[key].remote(*args)

    def start_actor(self, cls: type, *args: Any, resources: dict[str, float]) -> Any:
        return self._ray.remote(max_restarts=2, max_task_retries=2, **resources)(cls).remote(*args)

    def call(self, actor: Any, method: str, *args: Any, num_returns: int = 1) -> Any:
        bound = getattr(actor, method)
        return (bound.options(num_returns=num_returns) if num_returns > 1 else bound).remote(*args)

    def kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except self._ray.exceptions.RayError:
            pass

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        ready, _ = self._ray.wait(handles, num_returns=1, timeout=timeout)
        return ready

    def get(self, handle: Any) -> Any:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(handle)
        except exceptions.RayTaskError as exc:  # the task itself raised
            raise TaskFailed(exc.cause or exc) from None
        except exceptions.RayError as exc:  # the process or node running it was lost
            raise WorkerLost(type(exc).__name__, str(exc)) from None


def current_node() -> str:
    """Where this task runs, for the run report: the Ray node id, or ``local``."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return "local"
