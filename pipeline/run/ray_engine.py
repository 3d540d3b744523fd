"""The Ray engine: a job's tasks and encoder actors as Ray tasks and actors (the only module importing Ray).

See :mod:`pipeline.run.engine` for the interface. Ray retries lost tasks and restarts lost actors
itself; the driver resubmits what Ray gives up on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.run.engine import TaskFailed, WorkerLost

if TYPE_CHECKING:
    from pipeline.config import JobConfig


@contextmanager
def ray_session(config: JobConfig) -> Iterator[None]:
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
