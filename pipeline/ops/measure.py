"""What ``embedpipe plan`` measures for its time estimate (:mod:`pipeline.ops.estimate`): the cluster a run
would use, one tokenize worker's rate, and one encoder actor's load time and rate, on this machine.

Each is measured the way the run's workers do the work: the tokenizer single-threaded (the workers'
environment, :data:`pipeline.run.engine.WORKER_ENV`), the encoder loaded as an actor loads it
(:attr:`pipeline.encode.stage.ShardEncoder.model`) and run by ``encode_rows`` on the sampled rows for a
bounded time. Nothing is written and no Ray cluster is started or joined.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from pipeline.config import JobConfig
from pipeline.ops.estimate import Cluster, Encoders, Rates, estimate_job
from pipeline.run.engine import WORKER_ENV
from pipeline.tokenize.core import TokenizeSpec, TokenRows, get_tokenizer, to_table, tokenize_texts

# Timing the tokenizer: repeated over the sample until this many seconds, at most _TOKENIZE_REPEATS times
# (a 1,000-row sample tokenizes in ~10 ms, too short to time once).
_TOKENIZE_MIN_S = 0.2
_TOKENIZE_REPEATS = 20
# Timing the encoder: after one warm-up batch, rows until this many seconds or the sample is used up.
ENCODE_BUDGET_S = 2.0


def cluster_for(config: JobConfig, cpus: int | None = None, gpus: int | None = None) -> tuple[Cluster | None, str]:
    """The cluster a run would use: (its shape, or None when unknown, and a sentence on where it came from).

    ``cpus`` / ``gpus`` (``plan --cpus / --gpus``) override what is found. A named Ray cluster is not
    contacted (plan joins no cluster): its shape is unknown unless given.
    """
    from pipeline.run.executor import choose_executor, visible_gpus
    from pipeline.run.local_engine import local_cpus

    executor = choose_executor(config)
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if executor == "local":
        found = (local_cpus(config.ray.num_cpus), 0,
                 "local executor, ray.num_cpus" if config.ray.num_cpus else "local executor, this machine's cores")
    elif address:
        found = (None, None, f"Ray cluster at {address}, not contacted by plan")
    else:
        found = (local_cpus(config.ray.num_cpus), visible_gpus(),
                 "a local Ray cluster, " + ("ray.num_cpus" if config.ray.num_cpus else "this machine's cores"))
    if cpus is not None or gpus is not None:
        if gpus:  # the local executor runs encoders on CPU only: a cluster with GPUs is a Ray one
            executor = "ray"
        given = " and ".join(f"--{k} {v}" for k, v in (("cpus", cpus), ("gpus", gpus)) if v is not None)
        found = (cpus if cpus is not None else found[0], gpus if gpus is not None else (found[1] or 0),
                 f"{given}, {executor} executor")
    if found[0] is None:
        return None, f"{found[2]}: its shape is unknown; give plan --cpus N [--gpus N]"
    return Cluster(executor, int(found[0]), int(found[1] or 0), found[2]), found[2]


@contextmanager
def worker_environment() -> Iterator[None]:
    """This process's environment set as a tokenize worker's (one tokenizer thread), restored after."""
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """No "Loading weights" bar on the terminal while the model loads (workers set HF_HUB_DISABLE_PROGRESS_BARS
    before importing huggingface_hub; here it is already imported: the bars are switched off, then back on)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    transformers = sys.modules.get("transformers")  # which keeps a switch of its own once imported
    was_disabled = are_progress_bars_disabled()
    was_enabled = transformers is not None and transformers.utils.logging.is_progress_bar_enabled()
    disable_progress_bars()
    if was_enabled:
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


def tokenize_sample(spec: TokenizeSpec, samples: list[tuple[list[str], list[str]]],
                    timed: bool) -> tuple[TokenRows | None, float | None]:
    """Tokenize each sampled unit's (ids, texts) as a tokenize task does (tokenize, lay out the table),
    single-threaded; returns (the rows, and with ``timed`` one worker's rate in real tokens/s)."""
    with worker_environment():
        get_tokenizer(spec)  # built once per worker: not part of the rate
        if timed and samples:  # nor the first table's one-time costs (~0.4 s of pyarrow set-up)
            _lay_out(spec, tokenize_texts(spec, *samples[0]))
        started = time.perf_counter()
        parts = [tokenize_texts(spec, ids, texts) for ids, texts in samples]
        for rows in parts if timed else []:
            _lay_out(spec, rows)
        elapsed, repeats = time.perf_counter() - started, 1
        while timed and parts and elapsed < _TOKENIZE_MIN_S and repeats < _TOKENIZE_REPEATS:
            again = time.perf_counter()
            for ids, texts in samples:
                _lay_out(spec, tokenize_texts(spec, ids, texts))
            elapsed, repeats = elapsed + time.perf_counter() - again, repeats + 1
    if not parts:
        return None, None
    rows = TokenRows.concat(parts)
    tokens = int(rows.lengths.sum()) * repeats
    return rows, (tokens / elapsed if timed and elapsed > 0 and tokens else None)


def _lay_out(spec: TokenizeSpec, rows: TokenRows) -> Any:
    """The shard table a tokenize task makes of ``rows`` (packed into blocks with ``tokenizer.pack``)."""
    if spec.pack:
        from pipeline.tokenize.stage import pack_unit

        return pack_unit(spec, 0, rows)[0]
    return to_table(spec, rows)


def import_torch() -> float:
    """Seconds to import torch here (0 when it already was): what the driver of a job that embeds pays."""
    if "torch" in sys.modules:
        return 0.0
    started = time.perf_counter()
    import torch  # noqa: F401

    return time.perf_counter() - started


@dataclass(frozen=True)
class EncoderRate:
    """One encoder actor measured here: its load, and its positions computed per second (padding included)."""

    load_s: float
    tokens_per_s: float
    rows: int
    computed_tokens: int
    seconds: float
    device: str
    dtype: str
    threads: int | None

    def to_json(self) -> dict[str, Any]:
        return {"model_load_s": round(self.load_s, 2), "encoder_tokens_per_s": round(self.tokens_per_s, 1),
                "encoder_rows": self.rows, "encoder_computed_tokens": self.computed_tokens,
                "encoder_seconds": round(self.seconds, 2), "device": self.device, "dtype": self.dtype,
                "torch_threads": self.threads}


def sample_arrays(embed_spec: Any, spec: TokenizeSpec, rows: TokenRows) -> tuple[tuple[Any, Any, Any], np.ndarray]:
    """The sampled rows as the encoder reads them from a token shard, and per row the positions it computes."""
    from pipeline.encode.forward import compute_lengths
    from pipeline.encode.stage import token_arrays

    arrays = token_arrays(to_table(spec, rows))
    if embed_spec.static:  # a table lookup of the real tokens
        lengths = rows.lengths.astype(np.int64)
    else:
        lengths = compute_lengths(*arrays, embed_spec.options, padding_side=embed_spec.padding_side)
    return arrays, lengths


def measure_encoder(embed_spec: Any, spec: TokenizeSpec, rows: TokenRows,
                    budget_s: float = ENCODE_BUDGET_S) -> EncoderRate:
    """Load the encoder as an actor does and time ``encode_rows`` on the sampled ``rows`` (laid out as token
    shard rows): a warm-up batch, then rows in a fixed random order until ``budget_s`` or the sample is used up.

    The torch threads are the actor's, but no more than this machine's cores.
    """
    from pipeline.encode.forward import encode_rows
    from pipeline.encode.stage import ShardEncoder, _take
    from pipeline.run.local_engine import local_cpus

    if embed_spec.num_threads:
        embed_spec = replace(embed_spec, num_threads=min(embed_spec.num_threads, local_cpus(None)))
    started = time.perf_counter()
    with worker_environment(), _no_progress_bars():  # as an actor loads it
        model = ShardEncoder(embed_spec).model
    load_s = time.perf_counter() - started
    arrays, lengths = sample_arrays(embed_spec, spec, rows)
    options = embed_spec.options
    order = np.random.default_rng(0).permutation(len(lengths))
    per_batch = max(1, options.max_tokens_per_batch // max(1, int(lengths.mean())))

    def run(chosen: np.ndarray) -> int:
        ids, mask, type_ids = (_take(column, chosen) for column in arrays)
        if embed_spec.static:
            model.encode(ids, mask)
            return int(lengths[chosen].sum())
        counts: dict[str, int] = {}
        encode_rows(model, ids, mask, type_ids, options, padding_side=embed_spec.padding_side, counts=counts)
        return counts.get("computed_tokens", 0)

    run(order[:per_batch])  # warm-up: first-call costs (kernels, allocations) are not the rate
    measured = order[per_batch:] if len(order) > per_batch else order
    computed, done, began = 0, 0, time.perf_counter()
    while done < len(measured) and time.perf_counter() - began < budget_s:  # a batch a call: ends near the budget
        computed += run(measured[done:done + per_batch])
        done += per_batch
    seconds = time.perf_counter() - began
    dtype = "float32" if embed_spec.static else str(options.dtype).removeprefix("torch.")
    return EncoderRate(load_s, computed / seconds if seconds > 0 else 0.0, min(done, len(measured)), computed,
                       seconds, embed_spec.device, dtype, embed_spec.num_threads)


@dataclass(frozen=True)
class JobSample:
    """The job's shape as the plan's sample estimates it, and the tokenizer rate measured on the sample."""

    unit_tokens: list[float]  # per unit, real tokens
    shard_rows: list[int]  # per shard, rows
    rows: TokenRows | None  # the sampled rows, tokenized
    tokenize_tokens_per_s: float | None


def estimate_plan(config: JobConfig, spec: TokenizeSpec, stages: tuple[str, ...], job: JobSample, can_embed: bool,
                  torch_import_s: float = 0.0, cpus: int | None = None, gpus: int | None = None) -> dict[str, Any]:
    """A plan's ``estimate``: the cluster assumed and where it came from, what was measured here, the seconds
    per stage (:func:`pipeline.ops.estimate.estimate_job`), and ``notes`` on what was not estimated and why.

    ``can_embed``: the encoder settings passed the run's checks (else the embed stage is not estimated).
    """
    from pipeline.errors import ConfigError

    result: dict[str, Any] = {"cluster": None, "measured": {}, "seconds": {"tokenize": None, "embed": None,
                                                                         "total": None}, "notes": []}
    notes, measured = result["notes"], result["measured"]
    try:
        cluster, source = cluster_for(config, cpus, gpus)
    except ConfigError as exc:
        notes.append(f"not estimated: {exc}")
        return result
    if job.tokenize_tokens_per_s:
        measured["tokenizer_tokens_per_s"] = round(job.tokenize_tokens_per_s, 1)
    busy = _busy(measured)
    if busy:
        notes.append(busy)
    if cluster is None:
        notes.append(f"not estimated: {source}")
        return result
    result["cluster"] = asdict(cluster)
    if job.rows is None or not job.tokenize_tokens_per_s:
        notes.append("not estimated: no rows to sample")
        return result
    rates, encoders, lengths = Rates(job.tokenize_tokens_per_s), None, job.rows.lengths
    if "embeddings" in stages and can_embed:
        encoders, lengths, rates = _embed_side(config, spec, cluster, job, rates, torch_import_s, measured, notes)
    elif "embeddings" in stages:
        notes.append("embed not estimated: the run would refuse the encoder settings (see below)")
    estimate = estimate_job(stages, cluster, job.unit_tokens, job.shard_rows, lengths, rates, encoders)
    result["seconds"] = estimate.seconds()
    result["work"] = {k: v for k, v in asdict(estimate).items() if k not in ("tokenize", "embed", "total")}
    if encoders is not None:
        result["work"] |= {"actors": encoders.actors, "device": encoders.device}
    return result


def _busy(measured: dict[str, Any]) -> str | None:
    """A note when other work holds this machine's cores: the rates measured here are then low, and a run here
    shares the cores too (its actors get less than the one core plan's single measurement had)."""
    from pipeline.run.local_engine import local_cpus

    try:
        load = os.getloadavg()[0]
    except OSError:  # not on this platform
        return None
    cores = local_cpus(None)
    measured["load_average"] = round(load, 2)
    if load - 1.0 < max(1.0, cores / 2):  # plan itself keeps one core busy while it measures
        return None
    return (f"this machine is busy (load average {load:.1f} on {cores} cores): the rates measured here are "
            "lower than on a quiet one, and a run here would get less of each core than the measurement did")


def _embed_side(config: JobConfig, spec: TokenizeSpec, cluster: Cluster, job: JobSample, rates: Rates,
                torch_import_s: float, measured: dict[str, Any],
                notes: list[str]) -> tuple[Encoders | None, np.ndarray, Rates]:
    """The run's encoders on ``cluster``, the sampled rows' computed lengths, and the rates with the encoder's
    measured here when it can be (on the device the run would use)."""
    from pipeline.errors import ConfigError
    from pipeline.run.encoder_pool import plan_encoders
    from pipeline.run.executor import visible_gpus

    try:  # the actors a run would start there (a static model's on CPUs, even on a GPU cluster)
        plan = plan_encoders(config, spec, {"CPU": cluster.cpus, "GPU": cluster.gpus})
    except ConfigError as exc:
        notes.append(f"embed not estimated: {exc}")
        return None, job.rows.lengths, rates
    embed_spec, count, booked = plan.spec, plan.count, plan.resources
    options = embed_spec.options
    encoders = Encoders(embed_spec.device, count, float(booked.get("num_cpus", 0.0)), embed_spec.piece_rows,
                        options.max_tokens_per_batch, spec.fixed_width,
                        embed_spec.static or (options.packed and options.use_attention_mask))  # no padding computed
    lengths = sample_arrays(embed_spec, spec, job.rows)[1]
    if embed_spec.device == "cuda" and not visible_gpus():
        notes.append(f"embed not estimated: the run's encoders would run on {cluster.gpus} GPUs and this machine "
                     "has none to measure the encoder on (a CPU rate says nothing of a GPU's); run plan on a "
                     "machine with one of the cluster's GPUs")
        return encoders, lengths, rates
    rate = measure_encoder(embed_spec, spec, job.rows)
    measured |= rate.to_json() | {"torch_import_s": round(torch_import_s, 2)}
    return encoders, lengths, replace(rates, encode_tokens_per_s=rate.tokens_per_s,
                                      model_load_s=torch_import_s + rate.load_s, driver_import_s=torch_import_s)


def _si(value: float) -> str:
    """310k, 4.1k, 1.2M: a rate at a glance."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= div:
            scaled = value / div
            return f"{scaled:.1f}{suffix}" if scaled < 10 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def format_estimate(estimate: dict[str, Any]) -> list[str]:
    """The plan's time lines for the terminal."""
    lines = []
    seconds, cluster, measured = estimate["seconds"], estimate["cluster"], estimate["measured"]
    parts = [f"{stage} ~{value:,.0f} s" for stage, value in seconds.items() if value is not None]
    if parts and cluster:
        lines.append(f"  time: {', '.join(parts)} on {Cluster(**cluster).describe()}")
    said = []
    if "tokenizer_tokens_per_s" in measured:
        said.append(f"tokenizer {_si(measured['tokenizer_tokens_per_s'])} tokens/s/worker")
    if "encoder_tokens_per_s" in measured:
        work = estimate.get("work", {})
        said.append(f"encoder {_si(measured['encoder_tokens_per_s'])} tokens/s/actor ({measured['device']} "
                    f"{measured['dtype']}; {work.get('actors')} actors, {work.get('pieces')} pieces, "
                    f"padding x{work.get('padding', 0):.2f}), model load {measured['model_load_s']:.1f} s")
    if said:
        lines.append(f"  measured here: {', '.join(said)}")
    lines += [f"  {note}" for note in estimate["notes"]]
    return lines
