"""The encoder actors of a job: sized for the cluster, started without blocking, fed shards, replaced.

Part of the Ray layer (with :mod:`pipeline.run.driver`): each actor is a
:class:`~pipeline.encode.stage.ShardEncoder` in its own process, loading its model once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import JobConfig
from pipeline.encode.stage import EmbedSpec, ShardEncoder, plan_embed
from pipeline.errors import ConfigError
from pipeline.run.report import peak_rss_mb
from pipeline.tokenize.core import TokenizeSpec

log = logging.getLogger("embedpipe")

# Shards queued on each encoder actor: one computing, one ready to start.
SHARDS_PER_ACTOR = 2
# CPU encoder actors (each loads the model): see encoder_resources.
MAX_CPU_ACTORS = 8


@dataclass(frozen=True)
class EncoderPlan:
    """The encoder actors a job starts: how many, the Ray resources of each, and what they run."""

    count: int
    resources: dict[str, float]
    spec: EmbedSpec


def plan_encoders(config: JobConfig, spec: TokenizeSpec) -> EncoderPlan:
    """Size the encoder actors for the cluster at hand and check the encoder settings (ConfigError)."""
    device, count, resources, threads = encoder_resources(config)
    return EncoderPlan(count, resources, plan_embed(config, spec, device, threads))


def encoder_resources(config: JobConfig) -> tuple[str, int, dict[str, float], int | None]:
    """(device, actor count, per-actor resources, torch threads) for the cluster at hand."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    device = config.encoder.device
    if device == "cuda" and gpus == 0:
        raise ConfigError("encoder.device: 'cuda' but the Ray cluster has no GPU; use device: auto or cpu")
    if device in ("auto", "cuda") and gpus:
        return "cuda", gpus, {"num_gpus": 1, "num_cpus": 1}, None
    # On a CPU, one single-threaded actor per core: for encoder-sized matrices torch's intra-op threads
    # barely help (MiniLM: 2 threads ran 1.0x one thread; 2 one-thread processes 2.0x), and one thread
    # makes a row's bytes independent of the machine's core count. Each actor books half a CPU so that
    # tokenize tasks keep half the slots; tokenizing is short next to encoding on a CPU. At most
    # MAX_CPU_ACTORS copies of the model are loaded; beyond that each actor gets more threads.
    actors = max(1, min(cpus, MAX_CPU_ACTORS))
    return "cpu", actors, {"num_cpus": 0.5}, max(1, cpus // actors)


class EncoderActor(ShardEncoder):
    """The Ray encoder actor: a :class:`ShardEncoder` whose reports also carry the actor's peak memory."""

    def embed_shard(self, out_dir: str, name: str) -> dict[str, Any]:
        report = super().embed_shard(out_dir, name)
        report["peak_rss_mb"] = peak_rss_mb()
        return report


@dataclass
class EncoderPool:
    """The running actors, the model loads not yet seen, and which actor computes which shard."""

    plan: EncoderPlan
    actors: list[Any] = field(default_factory=list)
    loading: list[Any] = field(default_factory=list)
    load: dict[int, int] = field(default_factory=dict)
    in_flight: dict[Any, tuple[int, Any, str]] = field(default_factory=dict)

    def start(self) -> None:
        """Start the actors. The driver does not block on their model loads: shards tokenized meanwhile are
        recorded as they finish, and embedding calls queue on the actors until their models are in memory."""
        self.actors = [self._new() for _ in range(self.plan.count)]
        self.loading = [actor.ready.remote() for actor in self.actors]
        self.load = {i: 0 for i in range(len(self.actors))}

    def submit(self, waiting: list[str], out_dir: str) -> None:
        """Hand waiting shards to the least loaded actors, up to SHARDS_PER_ACTOR each."""
        while waiting and self.actors and min(self.load.values()) < SHARDS_PER_ACTOR:
            index = min(self.load, key=self.load.get)
            name = waiting.pop(0)
            self.in_flight[self.actors[index].embed_shard.remote(out_dir, name)] = (index, self.actors[index], name)
            self.load[index] += 1

    def loaded(self, ref: Any) -> None:
        """Take one model load's outcome; errors in the model's settings surface here, as ConfigError."""
        import ray

        self.loading.remove(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ConfigError):
                raise exc.cause from None
            raise
        except ray.exceptions.RayActorError:
            pass  # the actor died while loading: its shards are retried on a replacement (see the driver)

    def finished(self, ref: Any) -> tuple[str, Any]:
        """The shard name and actor of a finished embedding call (its result is the driver's to read)."""
        index, handle, name = self.in_flight.pop(ref)
        self.load[index] -= 1
        return name, (index, handle)

    def replace(self, which: tuple[int, Any]) -> None:
        """A new actor in place of one whose calls failed for a system reason (Ray gave up on it: its
        restarts used up, or its node gone), unless it was already replaced; scheduled on a live node."""
        import ray

        index, handle = which
        if self.actors[index] is not handle:
            return
        log.warning("replacing an encoder actor that Ray could not recover")
        try:
            ray.kill(handle, no_restart=True)
        except ray.exceptions.RayError:
            pass
        self.actors[index] = self._new()

    def _new(self) -> Any:
        import ray

        actor = ray.remote(max_restarts=2, max_task_retries=2, **self.plan.resources)(EncoderActor)
        return actor.remote(self.plan.spec)
