"""The embed path exactly as an encoder actor runs it: plan_embed on the driver's config, a ShardEncoder,
``embed_shard(out_dir, name)`` over committed token shards, in one process.

The token shards travel compressed; :func:`materialize` rewrites them with the pipeline's own ``write_shard``
into ``<work>/tokens/`` (uncompressed, as the tokenize stage commits them), so that ``embed_shard`` reads
what it reads in a real job. :func:`phase_timers` times the steps of ``embed_shard`` by wrapping the module
functions it calls (read, encode, Arrow, commit, report) for the duration of a pass; nothing else changes.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gpu_kit import flops, layout
from gpu_kit.models import read_config
from gpu_kit.prepare import job_config


def materialize(kit: Path, set_name: str, work: Path) -> list[str]:
    """The kit's shards of ``set_name`` committed uncompressed to ``work/tokens/``; their names."""
    from pipeline.output.contract import TOKENS
    from pipeline.output.shards import write_shard

    if work.exists():
        shutil.rmtree(work)
    names = []
    for path in layout.shard_paths(kit, set_name):
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        write_shard(table, work / TOKENS / path.name)
        names.append(path.name)
    return names


def shard_lengths(work: Path, names: list[str]) -> list[np.ndarray]:
    from pipeline.output.contract import TOKENS
    from pipeline.output.shards import read_shard

    return [read_shard(work / TOKENS / name).column("length").to_numpy() for name in names]


def make_spec(kit: Path, shard_set: layout.ShardSet, model_dir: Path, device: str, dtype: str,
              output_dtype: str) -> Any:
    """The EmbedSpec the driver would hand its encoder actors for this job (``plan_embed``)."""
    from pipeline.encode.stage import plan_embed
    from pipeline.tokenize.loading import load_tokenize_spec

    config = job_config(kit / layout.TOKENIZER, shard_set, model=str(model_dir), dtype=dtype,
                        output_dtype=output_dtype, device=device)
    return plan_embed(config, load_tokenize_spec(config), device, None)


@contextmanager
def phase_timers() -> Iterator[dict[str, float]]:
    """Seconds spent in each step of ``embed_shard`` while the block runs (summed over shards)."""
    from pipeline.encode import forward, pieces, stage

    totals: dict[str, float] = defaultdict(float)
    # The shard is read twice: by the encoder for its pieces, and by the commit for its ids.
    targets = [(stage, "read_shard_and_sha256", "read"), (pieces, "read_shard_and_sha256", "read"),
               (stage, "token_arrays", "arrays"), (forward, "encode_rows", "encode"),
               (pieces, "embeddings_to_arrow", "to_arrow"), (pieces, "write_shard", "commit"),
               (pieces, "count_nonfinite", "report"), (pieces, "_mean_norm", "report")]
    originals = [(module, attr, getattr(module, attr)) for module, attr, _ in targets]

    def timed(fn: Any, key: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - started
        return call

    for (module, attr, key), (_, _, fn) in zip(targets, originals):
        setattr(module, attr, timed(fn, key))
    try:
        yield totals
    finally:
        for module, attr, fn in originals:
            setattr(module, attr, fn)


def run_embed(encoder: Any, work: Path, names: list[str], *, min_passes: int, min_seconds: float,
              max_passes: int, deadline: float, warm_up_all: bool) -> dict[str, Any]:
    """Warm up, then whole passes over the shards until enough time is measured; per-pass times and phases."""
    started = time.perf_counter()
    encoder.ready()
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    for name in names if warm_up_all else names[:1]:
        encoder.embed_shard(str(work), name)
    warm_up_s = time.perf_counter() - started
    passes, phases, reports = [], [], []
    while len(passes) < max_passes:
        with phase_timers() as timers:
            started = time.perf_counter()
            reports = [encoder.embed_shard(str(work), name) for name in names]
            passes.append(time.perf_counter() - started)
        phases.append(dict(timers))
        enough = len(passes) >= min_passes and sum(passes) >= min_seconds
        if enough or deadline - time.perf_counter() < 2 * passes[-1]:
            break
    median = statistics.median(passes)
    middle = passes.index(min(passes, key=lambda p: abs(p - median)))
    return {"load_s": load_s, "warm_up_s": warm_up_s, "warmed_up_on": "every shard" if warm_up_all else names[0],
            "pass_s": passes, "median_pass_s": median, "phases_s": phases[middle], "reports": reports}


def rates(result: dict[str, Any], spec: Any, lengths: list[np.ndarray], shape: flops.Shape,
          peak_tflops: float) -> dict[str, Any]:
    """rows/s, real tokens/s and TFLOP/s of the median pass (and of its encode step alone)."""
    every = np.concatenate(lengths)
    rows, real = len(every), int(every.sum())
    full_width = None if spec.options.use_attention_mask else spec.seq_len
    real_flops = flops.total_flops(every, shape)
    computed = sum(flops.computed_flops(n, shape, spec.options.max_tokens_per_batch, spec.seq_len or 512,
                                        full_width) for n in lengths)
    # With the mask off every stored position is computed and is part of the output (CLIP's 77 x 768):
    # those are the model's FLOPs for the job; with the mask, the real tokens are.
    model_flops = computed if full_width else real_flops
    median, encode_s = result["median_pass_s"], result["phases_s"].get("encode", float("nan"))

    def per(seconds: float) -> dict[str, float]:
        return {"rows_per_s": rows / seconds, "real_tokens_per_s": real / seconds,
                "model_tflops": model_flops / seconds / 1e12, "real_token_tflops": real_flops / seconds / 1e12,
                "computed_tflops": computed / seconds / 1e12,
                "model_share_of_bf16_peak": model_flops / seconds / 1e12 / peak_tflops}

    return {"rows": rows, "real_tokens": real, "model_flops": model_flops, "real_token_flops": real_flops,
            "computed_flops": computed, "padding_waste": computed / max(real_flops, 1.0),
            "model_flops_counts": "every stored position (mask off)" if full_width else "real tokens",
            "embed_shard": per(median), "encode_rows_only": per(encode_s)}


def read_embeddings(work: Path, name: str) -> np.ndarray:
    """One committed embedding shard as float32 (bfloat16 bit patterns widened exactly)."""
    from pipeline.output.contract import EMBEDDINGS
    from pipeline.output.embedding_format import arrow_to_numpy, bfloat16_bits_to_float32, field_dims
    from pipeline.output.shards import read_shard

    table = read_shard(work / EMBEDDINGS / name)
    field = table.schema.field("embedding")
    values = arrow_to_numpy(table.column("embedding"), field)
    return bfloat16_bits_to_float32(values) if field_dims(field)[1] == "bfloat16" else values.astype(np.float32)


def embed_config(kit: Path, shard_set: layout.ShardSet, model_dir: Path, device: str, dtype: str,
                 output_dtype: str, work: Path, *, peak_tflops: float, deadline: float, quick: bool
                 ) -> tuple[dict[str, Any], Any, list[str]]:
    """One embed configuration end to end: shards, spec, encoder, passes, rates. Returns (results, encoder, names)."""
    from pipeline.encode.stage import ShardEncoder

    names = materialize(kit, shard_set.name, work)
    spec = make_spec(kit, shard_set, model_dir, device, dtype, output_dtype)
    encoder = ShardEncoder(spec)
    run = run_embed(encoder, work, names, min_passes=1 if quick else 2, min_seconds=0 if quick else 4.0,
                    max_passes=1 if quick else 6, deadline=deadline, warm_up_all=not quick)
    lengths = shard_lengths(work, names)
    shape = flops.Shape.of(read_config(model_dir))
    reports = run.pop("reports")
    out = {"set": shard_set.name, "device": device, "dtype": dtype, "output_dtype": output_dtype,
           "max_tokens_per_batch": spec.options.max_tokens_per_batch, "pooling": spec.options.pooling,
           "use_attention_mask": spec.options.use_attention_mask, "shards": len(names), **run,
           **rates(run, spec, lengths, shape, peak_tflops),
           "nonfinite_rows": sum(r["nonfinite_rows"] for r in reports),
           "report_rows": sum(r["rows"] for r in reports), "report_tokens": sum(r["tokens"] for r in reports)}
    return out, encoder, names
