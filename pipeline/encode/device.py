"""Everything that differs between CPU and CUDA, in one place.

On CPU a batch is used where it lies. On CUDA host tensors are pinned and copied
without blocking on a side stream one batch ahead, so the copy of batch i+1 overlaps
the forward pass of batch i. Only the CUDA branches here are never run by the test
suite (it runs on CPU); they are kept to a few lines for that reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from pipeline.errors import ConfigError

T = TypeVar("T")
HostBatch = dict[str, torch.Tensor]


def resolve_device(name: str) -> torch.device:
    """The torch device for ``encoder.device``: ``auto`` takes a GPU when there is one.

    Raises:
        ConfigError: ``cuda`` is asked for and torch sees no GPU, or the name is unknown.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "encoder.device: 'cuda' but torch sees no GPU (torch.cuda.is_available() is False); "
                "use device: auto or cpu, or install a CUDA build of torch"
            )
        return torch.device("cuda")
    raise ConfigError(f"encoder.device: {name!r} is not one of auto, cpu, cuda")


def prefetch_to_device(batches: Iterable[tuple[T, HostBatch]], device: torch.device) -> Iterator[tuple[T, HostBatch]]:
    """Move each ``(key, {name: tensor})`` batch to ``device``; on CUDA one batch ahead on a side stream."""
    if device.type != "cuda":
        yield from ((key, {k: v.to(device) for k, v in batch.items()}) for key, batch in batches)
        return
    stream = torch.cuda.Stream(device)
    pending = None
    for key, batch in batches:
        with torch.cuda.stream(stream):
            moved = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
        if pending is not None:
            yield _ready(pending, stream)
        pending = (key, moved)
    if pending is not None:
        yield _ready(pending, stream)


def _ready(pending: tuple[T, HostBatch], stream: torch.cuda.Stream) -> tuple[T, HostBatch]:
    # The compute stream must wait for the copy, and the caching allocator must not reuse
    # the memory while the compute stream still reads it.
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    for tensor in pending[1].values():
        tensor.record_stream(current)
    return pending


def release_after_oom(device: torch.device) -> None:
    """Return cached blocks to the allocator after an out-of-memory error, before retrying smaller."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
