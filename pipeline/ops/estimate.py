"""How long a job would take: wall seconds per stage from measured rates and the job's shape (pure functions).

:mod:`pipeline.ops.preview` measures the rates on a sample (see :mod:`pipeline.ops.measure`); this module
turns them into times by replaying how the stages schedule their work:

- tokenize: one task per unit, each holding one CPU slot, handed out in unit order to the first free slot
  (:mod:`pipeline.run.driver`). A task takes its unit's tokens over one worker's measured rate, divided by its
  threads in a job of fewer units than CPUs (:func:`pipeline.tokenize.stage.tokenize_threads`; 1.97x on
  2 threads for one 20,000-row file), so the stage never ends before its largest unit.
- embed: a shard's rows, sorted by length, are cut into pieces of ``piece_rows`` that any actor can take
  (:mod:`pipeline.encode.pieces`), each batched by :func:`pipeline.encode.forward.plan_batches`. The positions
  a piece computes, padding included, come from applying that batching to the sampled lengths spread over the
  shard's rows. A piece takes its positions over one actor's measured rate; pieces go longest first to the
  actor free soonest (:mod:`pipeline.run.encoder_pool`), so even one shard uses every actor, and more actors
  help only down to the longest piece. A shard's pieces start once its token shard is committed (in ``run``)
  and the models are loaded.
- run: both schedules replayed together; on a CPU cluster the tokenize tasks and the encoder actors share the
  cores, so the work of both (the actors' model loads included) over the cores bounds it too. Roughly
  max(tokenize, embed) plus the first shard's tokenize time (or the model load, if longer) plus fixed costs.

Assumptions: actors scale linearly (CPU actors are single-threaded, one per core: a 2-core run measured 1.70x
from one actor to two, whole processes); an actor given more than one thread (past MAX_CPU_ACTORS cores) runs
at the rate measured here (MiniLM: 2 threads ran 1.0x one thread); reading and writing shards, the object
store, and other load on the machine are not modelled; the fixed costs are those measured in
docs/benchmarks.md on a 2-core machine.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.tokenize.stage import tokenize_threads

# Seconds of a command before work starts (interpreter, imports, plan, the engine's start) and after it ends
# (shutdown): a 50-row tokenize job took 1.19 s on the local executor and 6.83 s on a Ray cluster of its own,
# of which 1.4 s is Ray's shutdown (docs/benchmarks.md, 2026-12-01).
START_S = {"local": 1.0, "ray": 5.4}
EXIT_S = {"local": 0.2, "ray": 1.4}


@dataclass(frozen=True)
class Cluster:
    """The cluster a run would use, and where that shape came from (for the output)."""

    executor: str  # "local" | "ray"
    cpus: int
    gpus: int
    source: str

    def describe(self) -> str:
        gpus = f", {self.gpus} GPUs" if self.gpus else ""
        return f"{self.cpus} CPUs{gpus} ({self.source})"


@dataclass(frozen=True)
class Encoders:
    """The encoder actors a run would start (:func:`pipeline.run.encoder_pool.size_encoders`) and how they batch."""

    device: str  # "cpu" | "cuda"
    actors: int
    booked_cpus: float  # CPU slots each actor holds, which the tokenize tasks of a run cannot use
    piece_rows: int
    max_tokens_per_batch: int
    max_width: int | None = None  # the stored row width, which no batch exceeds
    packed: bool = False  # batches run unpadded: the computed positions are the real tokens


@dataclass(frozen=True)
class Rates:
    """Measured on this machine: one tokenize worker, one encoder actor (None: not measured), fixed costs."""

    tokenize_tokens_per_s: float
    encode_tokens_per_s: float | None = None  # positions computed per second, padding included
    model_load_s: float = 0.0  # an actor's start: torch import and model load
    driver_import_s: float = 0.0  # the driver imports torch before any work of a job that embeds


@dataclass(frozen=True)
class Estimate:
    """Seconds from the command's start until each stage's last shard is committed, and the command's total
    (None: not estimated), with the shape of the work behind them."""

    tokenize: float | None
    embed: float | None
    total: float | None
    tokenize_slots: int
    pieces: int = 0
    computed_tokens: int = 0  # positions the embed stage would compute, padding included
    padding: float | None = None  # computed positions / the rows' own lengths: what batching adds

    def seconds(self) -> dict[str, float | None]:
        return {k: None if v is None else round(v, 1) for k, v in
                (("tokenize", self.tokenize), ("embed", self.embed), ("total", self.total))}


def spread(lengths: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` lengths drawn evenly from the quantiles of the sampled ``lengths``, sorted: a shard of that size
    with the sample's length distribution, as its length order (the order its pieces are cut from) sees it."""
    ordered = np.sort(np.asarray(lengths, dtype=np.int64))
    if not len(ordered) or rows <= 0:
        return np.zeros(0, np.int64)
    return ordered[(np.arange(rows) * len(ordered)) // rows]


def piece_costs(lengths: np.ndarray, shard_rows: int, encoders: Encoders) -> list[int]:
    """Positions each piece of a shard of ``shard_rows`` rows computes, padding included, in piece order:
    the shard's length-sorted rows cut into pieces, each batched as :func:`~pipeline.encode.forward.plan_batches`
    batches it (widths rounded up to a multiple of 8, at most ``max_tokens_per_batch`` positions a batch)."""
    from pipeline.encode.forward import WIDTH_MULTIPLE, padded_width, plan_batches  # imports torch

    shard = spread(lengths, shard_rows)
    costs = []
    for start in range(0, max(len(shard), 1), encoders.piece_rows):
        piece = shard[start:start + encoders.piece_rows]
        if encoders.packed:
            costs.append(int(piece.sum()))
            continue
        batches = plan_batches(piece, encoders.max_tokens_per_batch, WIDTH_MULTIPLE, encoders.max_width)
        costs.append(sum(len(b) * padded_width(int(piece[b].max()), WIDTH_MULTIPLE, encoders.max_width)
                         for b in batches if len(b)))
    return costs


def list_schedule(durations: Sequence[float], workers: int, ready: Sequence[float] | None = None,
                  start: float = 0.0) -> list[float]:
    """Finish time of each job handed out in order to the worker free soonest (at ``start``, not before its
    ``ready`` time): how the engines' queues run tasks on slots and pieces on actors."""
    free = [start] * max(1, workers)
    heapq.heapify(free)
    finished = []
    for i, duration in enumerate(durations):
        begin = max(heapq.heappop(free), ready[i] if ready is not None else start)
        heapq.heappush(free, begin + duration)
        finished.append(begin + duration)
    return finished


def estimate_job(stages: Sequence[str], cluster: Cluster, unit_tokens: Sequence[float], shard_rows: Sequence[int],
                 lengths: np.ndarray, rates: Rates, encoders: Encoders | None) -> Estimate:
    """Wall seconds of ``stages`` ("tokens", "embeddings") of a job on ``cluster`` (see the module docstring).

    Args:
        unit_tokens: per unit, the real tokens its rows tokenize into (estimated from the sample).
        shard_rows: per shard (one per unit), its rows.
        lengths: per sampled row, the positions the encoder computes for it before batching (real tokens, or
            the stored width when the model sees the padding).
        rates: measured rates; without an encoder rate the embed stage and the total are not estimated.
        encoders: the actors a run would start (None when the stages do not embed).
    """
    embeds = "embeddings" in stages and encoders is not None
    tokenizes = "tokens" in stages
    start = START_S[cluster.executor] + (rates.driver_import_s if embeds else 0.0)
    slots = cluster.cpus
    if embeds and tokenizes:  # the actors' booked slots are not the tokenize tasks' to use
        slots = int(cluster.cpus - encoders.actors * encoders.booked_cpus + 1e-9)
    slots = max(1, slots)
    # A job of fewer units than CPUs tokenizes each unit on several threads (the driver's rule).
    threads = tokenize_threads(cluster.cpus, len(unit_tokens))
    token_work = [t / rates.tokenize_tokens_per_s / threads for t in unit_tokens] if tokenizes else []
    committed = list_schedule(token_work, slots, start=start) if tokenizes else [start] * len(shard_rows)
    tokenize_end = max(committed, default=start) if tokenizes else None
    if not embeds:
        total = None if tokenize_end is None else tokenize_end + EXIT_S[cluster.executor]
        return Estimate(tokenize_end, None, total, slots)
    by_size = {rows: piece_costs(lengths, rows, encoders) for rows in set(shard_rows)}  # most shards: one size
    costs = [by_size[rows] for rows in shard_rows]
    computed = sum(map(sum, costs))
    unbatched = sum(int(spread(lengths, rows).sum()) for rows in shard_rows)
    base = Estimate(tokenize_end, None, None, slots, sum(map(len, costs)), computed,
                    round(computed / max(unbatched, 1), 4))
    if rates.encode_tokens_per_s is None:
        return base
    rate, loaded = rates.encode_tokens_per_s, start + rates.model_load_s
    pieces, ready = [], []
    for shard, shard_costs in enumerate(costs):  # shards in commit order, each one's longest piece first
        for cost in reversed(shard_costs):
            pieces.append(cost / rate)
            ready.append(max(committed[shard] if tokenizes else start, loaded))
    order = np.argsort(ready, kind="stable")
    embed_end = max(list_schedule([pieces[i] for i in order], encoders.actors, [ready[i] for i in order],
                                  start=loaded), default=loaded)
    if tokenizes and encoders.device == "cpu":  # the tasks and the actors (their loads too) share the cores
        work = sum(unit_tokens) / rates.tokenize_tokens_per_s + sum(pieces) + encoders.actors * rates.model_load_s
        embed_end = max(embed_end, start + work / max(1, cluster.cpus))
    return Estimate(tokenize_end, embed_end, embed_end + EXIT_S[cluster.executor], slots, base.pieces,
                    computed, base.padding)

