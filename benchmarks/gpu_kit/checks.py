"""The OOM back-off under a memory cap, and a torch.profiler summary of one shard.

OOM back-off: ``pipeline.encode.forward._encode_with_backoff`` catches ``torch.OutOfMemoryError``, calls
``DeviceSteps.release_after_oom`` and retries the batch in two halves (and cuts the shard's later batches as small). On CUDA the check caps the process's memory with
``torch.cuda.set_per_process_memory_fraction`` between the model's own memory and the peak of an uncapped
pass, so the largest batches no longer fit, and counts the back-offs through ``release_after_oom``. On a CPU
there is no such cap: the same measurement runs with an out-of-memory error raised for batches above half
the largest one (``simulated``), which keeps the check's code working without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gpu_kit.embed import phase_timers, read_embeddings
from gpu_kit.reference import compare, judge


@contextmanager
def count_backoffs() -> Iterator[list[int]]:
    """Count calls of ``release_after_oom`` (one per caught out-of-memory error) while the block runs."""
    from pipeline.encode import device

    calls = [0]
    originals = [(cls, cls.__dict__["release_after_oom"]) for cls in (device.DeviceSteps, device.CudaSteps)]

    def counting(original: Any) -> Any:
        def counted(self: Any) -> None:
            calls[0] += 1
            original(self)
        return counted

    for cls, original in originals:
        cls.release_after_oom = counting(original)
    try:
        yield calls
    finally:
        for cls, original in originals:
            cls.release_after_oom = original


@contextmanager
def simulated_oom(max_rows: int) -> Iterator[None]:
    """Make every batch of more than ``max_rows`` rows fail as if the device were out of memory."""
    import torch

    from pipeline.encode import forward

    original = forward._encode_batch

    def failing(model: Any, batch: dict, *args: Any) -> Any:
        if len(batch["input_ids"]) > max_rows:
            raise torch.OutOfMemoryError("simulated: batch above the check's row limit")
        return original(model, batch, *args)

    forward._encode_batch = failing
    try:
        yield
    finally:
        forward._encode_batch = original


def _largest_batch_rows(encoder: Any, lengths: np.ndarray) -> int:
    from pipeline.encode.forward import WIDTH_MULTIPLE, plan_batches

    spec = encoder.spec
    work = lengths if spec.options.use_attention_mask else np.full(len(lengths), spec.seq_len)
    return max(len(b) for b in plan_batches(work, spec.options.max_tokens_per_batch, WIDTH_MULTIPLE, spec.seq_len))


def oom_backoff(encoder: Any, work: Path, name: str, lengths: np.ndarray, device: str,
                threshold: float) -> dict[str, Any]:
    """Embed one shard uncapped, then under a memory cap (CUDA) or simulated OOM (CPU); compare the outputs."""
    started = time.perf_counter()
    encoder.embed_shard(str(work), name)
    uncapped_s = time.perf_counter() - started
    want = read_embeddings(work, name)
    out: dict[str, Any] = {"shard": name, "dtype": str(encoder.spec.options.dtype).replace("torch.", ""),
                           "uncapped_s": uncapped_s}
    if device == "cuda":
        out.update(_cuda_capped(encoder, work, name))
    else:
        limit = max(1, _largest_batch_rows(encoder, lengths) // 2)
        with count_backoffs() as calls, simulated_oom(limit):
            started = time.perf_counter()
            encoder.embed_shard(str(work), name)
            out.update(mode="simulated (cpu: no memory cap)", row_limit=limit, backoffs=calls[0],
                       capped_s=time.perf_counter() - started)
    if out.get("escaped_oom"):
        out["passed"] = False
        return out
    got = read_embeddings(work, name)
    out["outputs"] = judge(compare(got, want), threshold)
    out["passed"] = bool(out.get("backoffs", 0) > 0 and out["outputs"]["passed"])
    return out


def _cuda_capped(encoder: Any, work: Path, name: str) -> dict[str, Any]:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    encoder.embed_shard(str(work), name)
    peak = torch.cuda.max_memory_reserved()
    tries = []
    try:
        for share in (0.5, 0.3, 0.15):
            cap = base + share * (peak - base)
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(cap / total)
            with count_backoffs() as calls:
                started = time.perf_counter()
                try:
                    encoder.embed_shard(str(work), name)
                except torch.OutOfMemoryError as exc:  # escaped the back-off: that is the finding
                    tries.append({"cap_bytes": int(cap), "share_of_activation_peak": share, "backoffs": calls[0],
                                  "escaped_oom": str(exc).splitlines()[0][:300]})
                    break
                seconds = time.perf_counter() - started
            tries.append({"cap_bytes": int(cap), "share_of_activation_peak": share, "backoffs": calls[0],
                          "capped_s": seconds})
            if calls[0]:
                break
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    last = tries[-1]
    return {"mode": "torch.cuda.set_per_process_memory_fraction", "base_reserved_bytes": int(base),
            "uncapped_peak_reserved_bytes": int(peak), "total_bytes": int(total), "tries": tries,
            "backoffs": last["backoffs"], "capped_s": last.get("capped_s"), "escaped_oom": last.get("escaped_oom")}


def profile_shard(encoder: Any, work: Path, name: str, device: str, rows: int = 12) -> dict[str, Any]:
    """One shard under torch.profiler: wall time, GPU kernel busy time and share, the steps, the top operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    encoder.embed_shard(str(work), name)  # warm: the profile is of a steady shard, not of first calls
    with phase_timers() as phases, profile(activities=activities) as prof:
        started = time.perf_counter()
        encoder.embed_shard(str(work), name)
        wall = time.perf_counter() - started
    averages = prof.key_averages()

    def device_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0)

    top_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    out: dict[str, Any] = {
        "shard": name, "wall_s": wall, "steps_s": dict(phases),
        "top_host_ops": [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                          "self_device_ms": device_us(e) / 1e3} for e in top_cpu],
    }
    if device != "cuda":
        out["gpu_kernel_share"] = "skipped: cpu"
        return out
    busy_us, kernels = _kernel_busy_us(prof)
    if busy_us is None:  # no kernel intervals in this torch's events: fall back to the summed device times
        busy_us = sum(device_us(e) for e in averages)
    top_gpu = sorted(averages, key=device_us, reverse=True)[:rows]
    out.update({
        "gpu_kernel_busy_s": busy_us / 1e6, "gpu_kernel_share": busy_us / 1e6 / wall, "kernel_launches": kernels,
        "host_share": 1 - busy_us / 1e6 / wall,
        "top_device_ops": [{"name": e.key, "calls": e.count, "self_device_ms": device_us(e) / 1e3} for e in top_gpu],
    })
    return out


def _kernel_busy_us(prof: Any) -> tuple[float | None, int]:
    """Length of the union of the GPU kernel intervals (µs), and how many kernels ran."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if getattr(e, "device_type", None) == DeviceType.CUDA)
    if not spans:
        return None, 0
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    return busy + end - start, len(spans)
