"""The encoder actors of a job: sized for the cluster, started without blocking, fed pieces of shards, replaced.

Part of the run layer (with :mod:`pipeline.run.driver`): each actor is a
:class:`~pipeline.encode.stage.ShardEncoder` in its own process, loading its model once, started on
the job's engine (:mod:`pipeline.run.engine`: Ray actors, or local worker processes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import JobConfig
from pipeline.encode.pieces import Piece, longest_first, piece_count
from pipeline.encode.stage import EmbedSpec, ShardEncoder, embedding_schema, plan_embed
from pipeline.errors import ConfigError
from pipeline.run.engine import Engine, TaskFailed, WorkerLost
from pipeline.run.report import peak_rss_mb
from pipeline.run.tasks import assemble_task
from pipeline.tokenize.core import TokenizeSpec

log = logging.getLogger("embedpipe")

# Pieces queued on each encoder actor: one computing, one ready to start.
PIECES_PER_ACTOR = 2
# The task that gathers a shard's pieces and commits it: short, mostly I/O.
ASSEMBLE_CPUS = 0.25
# CPU encoder actors (each loads the model): see encoder_resources.
MAX_CPU_ACTORS = 8


@dataclass(frozen=True)
class EncoderPlan:
    """The encoder actors a job starts: how many, the Ray resources of each, and what they run."""

    count: int
    resources: dict[str, float]
    spec: EmbedSpec
    with_chunk: bool  # embedding shards carry the token shards' chunk column (tokenizer.stride)


def plan_encoders(config: JobConfig, spec: TokenizeSpec, resources: dict[str, float]) -> EncoderPlan:
    """Size the encoder actors for the cluster's ``resources`` (CPU, GPU) and check the encoder settings
    (ConfigError)."""
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    device, count, booked, threads = size_encoders(config.encoder.device, cpus=cpus, gpus=gpus)
    embed = plan_embed(config, spec, device, threads)
    if embed.static and device == "cuda":  # a table lookup and a mean, on the CPU: GPU actors would idle the GPUs
        device, count, booked, threads = size_encoders("cpu", cpus=cpus, gpus=gpus)
        embed = plan_embed(config, spec, device, threads)
    return EncoderPlan(count, booked, embed, spec.stride is not None)


def size_encoders(device: str, cpus: int, gpus: int) -> tuple[str, int, dict[str, float], int | None]:
    """(device, actor count, per-actor resources, torch threads) for a cluster of ``cpus`` and ``gpus``.

    Raises:
        ConfigError: ``device: cuda`` on a cluster without a GPU.
    """
    if device == "cuda" and gpus == 0:
        raise ConfigError("encoder.device: 'cuda' but the Ray cluster has no GPU; use device: auto or cpu")
    if device in ("auto", "cuda") and gpus:
        # One actor per GPU, each booking a CPU to feed it, but never every CPU slot: the tokenize tasks and
        # the commit tasks need one, or a cluster with as many GPUs as CPUs waits forever.
        return "cuda", gpus, {"num_gpus": 1, "num_cpus": min(1.0, max(0.0, (cpus - 1) / gpus))}, None
    # On a CPU, one single-threaded actor per core: for encoder-sized matrices torch's intra-op threads
    # barely help (MiniLM: 2 threads ran 1.0x one thread; 2 one-thread processes 2.0x), and one thread
    # makes a row's bytes independent of the machine's core count. Each actor books half a CPU so that
    # tokenize tasks keep half the slots; tokenizing is short next to encoding on a CPU. At most
    # MAX_CPU_ACTORS copies of the model are loaded; beyond that each actor gets more threads. A shard's
    # pieces spread over all actors, so even a one-shard job keeps every core busy.
    # A one-CPU cluster books nothing for its actor: with half its CPU booked, a tokenize task (1 CPU) queued
    # behind the actor's start could never find a slot. (A whole run did not show that wait here, Ray happened
    # to schedule the queued tasks first; the booking makes it impossible rather than unlikely.)
    actors = max(1, min(cpus, MAX_CPU_ACTORS))
    return "cpu", actors, {"num_cpus": 0.5 if cpus >= 2 else 0.0}, max(1, cpus // actors)


class EncoderActor(ShardEncoder):
    """The encoder actor: a :class:`ShardEncoder` whose piece statuses also carry the actor's peak memory."""

    def embed_piece(self, out_dir: str, name: str, piece: int,
                    read_ahead: str | None = None) -> tuple[dict[str, Any], Piece]:
        status, result = super().embed_piece(out_dir, name, piece, read_ahead)
        status["peak_rss_mb"] = peak_rss_mb()
        status["pid"] = os.getpid()
        return status, result


@dataclass
class _Shard:
    """One token shard being embedded: its pieces not yet handed out, and the results of those done."""

    name: str
    pieces: int
    todo: list[int]
    done: dict[int, Any] = field(default_factory=dict)  # piece -> reference to its Piece
    peak_rss_mb: float = 0.0
    encoders: set[int] = field(default_factory=set)  # the processes that computed its pieces
    computed_tokens: int = 0  # positions the forwards computed, padding included
    # How the actors got the token shard: read while their last piece computed ("ahead"), or before this one.
    token_reads: dict[str, int] = field(default_factory=lambda: {"ahead": 0, "here": 0})


@dataclass
class EncoderPool:
    """The running actors, the model loads not yet seen, the shards being embedded piece by piece, and the
    assembling tasks that commit them.

    A shard is cut into pieces (:mod:`pipeline.encode.pieces`) handed to the least loaded actors, the
    longest first; when its last piece is done, one task gathers the pieces through the object store and
    commits the shard. So every actor is busy however few shards are left.
    """

    plan: EncoderPlan
    engine: Engine
    actors: list[Any] = field(default_factory=list)
    loading: list[Any] = field(default_factory=list)
    load: dict[int, int] = field(default_factory=dict)
    in_flight: dict[Any, tuple[int, Any, str, int]] = field(default_factory=dict)  # status ref -> (actor, name, piece)
    assembling: dict[Any, str] = field(default_factory=dict)
    shards: dict[str, _Shard] = field(default_factory=dict)

    def start(self) -> None:
        """Start the actors. The driver does not block on their model loads: shards tokenized meanwhile are
        recorded as they finish, and embedding calls queue on the actors until their models are in memory."""
        self.actors = [self._new() for _ in range(self.plan.count)]
        self.loading = [self.engine.call(actor, "ready") for actor in self.actors]
        self.load = {i: 0 for i in range(len(self.actors))}

    def busy(self) -> bool:
        """Whether any piece or commit is still running."""
        return bool(self.in_flight or self.assembling)

    def submit(self, waiting: list[str], rows: Callable[[str], int], out_dir: str) -> None:
        """Hand pieces to the least loaded actors, up to PIECES_PER_ACTOR each: the pieces of the shards
        already started first, then those of the next waiting shard (``rows``: a shard's row count)."""
        while self.actors and min(self.load.values()) < PIECES_PER_ACTOR:
            shard = next((s for s in self.shards.values() if s.todo), None)
            if shard is None:
                if not waiting:
                    return
                name = waiting.pop(0)
                pieces = piece_count(rows(name), self.plan.spec.piece_rows)
                shard = self.shards[name] = _Shard(name, pieces, longest_first(pieces))
            index = min(self.load, key=self.load.get)
            piece = shard.todo.pop(0)
            # Near a shard's end, the actors read the next waiting shard while they compute.
            ahead = waiting[0] if waiting and len(shard.todo) < len(self.actors) * PIECES_PER_ACTOR else None
            status, result = self.engine.call(self.actors[index], "embed_piece", out_dir, shard.name, piece, ahead,
                                              num_returns=2)
            self.in_flight[status] = (index, self.actors[index], shard.name, piece)
            shard.done[piece] = result  # a reference: the driver never fetches it
            self.load[index] += 1

    def loaded(self, ref: Any) -> None:
        """Take one model load's outcome; errors in the model's settings surface here, as ConfigError."""
        self.loading.remove(ref)
        try:
            self.engine.get(ref)
        except TaskFailed as exc:
            if isinstance(exc.cause, ConfigError):
                raise exc.cause from None
            raise
        except WorkerLost:
            pass  # the actor died while loading: its pieces are retried on a replacement (see the driver)

    def finished(self, ref: Any) -> tuple[str, int, tuple[int, Any]]:
        """The shard, piece and actor of a finished piece (its status is the driver's to read)."""
        index, handle, name, piece = self.in_flight.pop(ref)
        self.load[index] -= 1
        return name, piece, (index, handle)

    def piece_done(self, name: str, status: dict[str, Any], out_dir: str) -> None:
        """Note a piece's success; once the shard's last piece is done, start the task that commits it."""
        shard = self.shards.get(name)
        if shard is None:  # the shard failed or was abandoned meanwhile
            return
        shard.peak_rss_mb = max(shard.peak_rss_mb, status.get("peak_rss_mb", 0))
        shard.encoders.add(status["pid"])
        shard.computed_tokens += status["computed_tokens"]
        if status.get("read"):
            shard.token_reads[status["read"]] += 1
        running = {piece for _, _, n, piece in self.in_flight.values() if n == name}
        if shard.todo or running:
            return
        del self.shards[name]
        spec = self.plan.spec
        stats = {"pieces": shard.pieces, "encoders": len(shard.encoders), "computed_tokens": shard.computed_tokens,
                 "token_reads": shard.token_reads, "peak_rss_mb": shard.peak_rss_mb}
        ref = self.engine.submit(assemble_task, out_dir, name, embedding_schema(spec, self.plan.with_chunk),
                                 spec.stored_dtype, stats, *(shard.done[p] for p in range(shard.pieces)),
                                 num_cpus=ASSEMBLE_CPUS)
        self.assembling[ref] = name

    def retry_piece(self, name: str, piece: int) -> None:
        """Hand a piece out again (its actor was lost), ahead of the shard's other pieces."""
        shard = self.shards.get(name)
        if shard is not None:
            shard.todo.insert(0, piece)

    def drop(self, name: str) -> None:
        """Forget a shard whose piece failed: its other pieces' results are not committed."""
        self.shards.pop(name, None)

    def committed(self, ref: Any) -> str:
        """The shard of a finished commit task."""
        return self.assembling.pop(ref)

    def abandon_unstarted(self) -> None:
        """Stopping: shards with pieces not yet handed out are never committed; the rest may finish."""
        for name in [n for n, s in self.shards.items() if s.todo]:
            del self.shards[name]

    def replace(self, which: tuple[int, Any]) -> None:
        """A new actor in place of one whose calls failed for a system reason (Ray gave up on it: its
        restarts used up, or its node gone; a local worker process that died), unless it was already
        replaced; Ray schedules the new one on a live node."""
        index, handle = which
        if self.actors[index] is not handle:
            return
        log.warning("replacing an encoder actor that was lost (%s executor)", self.engine.name)
        self.engine.kill(handle)
        self.actors[index] = self._new()

    def _new(self) -> Any:
        return self.engine.start_actor(EncoderActor, self.plan.spec, resources=self.plan.resources)
