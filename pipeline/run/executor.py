"""Which engine runs a job (``ray.executor``), and the engine's life for the job.

See :mod:`pipeline.run.engine`: the local engine (worker processes, no Ray) or the Ray engine.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.run.engine import WORKER_ENV, Engine

if TYPE_CHECKING:
    from pipeline.config import JobConfig

log = logging.getLogger("embedpipe")


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
        if address:  # only the environment names a cluster: the config's explicit choice wins, but say so
            log.warning("RAY_ADDRESS is %r, but ray.executor: local runs this job on this machine without Ray",
                        address)
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
    from pipeline.run.ray_engine import RayEngine, ray_session

    with ray_session(config):
        yield RayEngine()
