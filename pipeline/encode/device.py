"""Everything that differs between CPU and CUDA in the batch loop, in one place.

The batch loop (:func:`pipeline.encode.forward.encode_rows`) talks to a :class:`DeviceSteps`: move a batch
to the device, wait for that move, bring the outputs back, recover from an out-of-memory error. On a CPU
each step is the plain call. On CUDA the host never waits on the GPU per batch:

- each batch is pinned and copied on a side stream, one batch ahead, with one event per copy, so the compute
  stream waits for exactly that copy (not for the side stream as a whole) and the next batch is gathered on
  the host while the GPU computes;
- outputs stay on the device and come back once per call, into pinned memory, with one synchronisation.

The CUDA class cannot run in the test suite (no GPU); the loop's logic is tested on CPU with a recording
subclass of :class:`DeviceSteps` that counts each step and raises out-of-memory errors where asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

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


class DeviceSteps:
    """The device steps of the batch loop, as a CPU runs them: every call is immediate."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start_copy(self, batch: HostBatch) -> Any:
        """Begin moving a host batch to the device; returns a handle for :meth:`finish_copy`."""
        return {k: v.to(self.device) for k, v in batch.items()}

    def finish_copy(self, handle: Any) -> HostBatch:
        """The batch on the device, usable by the compute stream."""
        return handle

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Bring a device tensor back to host memory (the one device-to-host copy of a call)."""
        return tensor.cpu()

    def concat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate outputs on the device."""
        return torch.cat(tensors)

    def release_after_oom(self) -> None:
        """Free what an out-of-memory error left cached, before retrying smaller."""


class CudaSteps(DeviceSteps):
    """CUDA: copies on a side stream with one event each; outputs back once, into pinned memory."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.stream = torch.cuda.Stream(device)

    def start_copy(self, batch: HostBatch) -> Any:
        with torch.cuda.stream(self.stream):
            moved = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return moved, copied

    def finish_copy(self, handle: Any) -> HostBatch:
        moved, copied = handle
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copied)  # this copy only: later copies on the side stream may still run
        for tensor in moved.values():  # the allocator must not reuse the memory while compute reads it
            tensor.record_stream(current)
        return moved

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        pinned.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        done.synchronize()  # the one wait of the call: every batch's work is queued before it
        return pinned

    def release_after_oom(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()


# Messages of errors after which a CUDA context is unusable: every later call fails the same way.
_DEVICE_LOST = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS", "cuDNN error",
                "unspecified launch failure", "ECC error")


def device_lost(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the GPU unusable for this process (a sticky CUDA error, not out-of-memory):
    the encoder's process must end so that Ray starts a fresh one, rather than fail every later shard."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _DEVICE_LOST)


def device_steps(device: torch.device) -> DeviceSteps:
    """The steps for ``device``."""
    return CudaSteps(device) if device.type == "cuda" else DeviceSteps(device)


def prefetch_to_device(batches: Iterable[tuple[T, HostBatch]], steps: DeviceSteps) -> Iterator[tuple[T, HostBatch]]:
    """Move each ``(key, {name: tensor})`` batch to the device one batch ahead: batch i+1's copy is started
    before batch i is handed out for compute. A copy that runs out of memory is retried once after
    :meth:`DeviceSteps.release_after_oom` (the outputs held on the device are what fills it)."""
    pending = None
    for key, batch in batches:
        handle = _start_copy(steps, batch)
        if pending is not None:
            yield pending[0], steps.finish_copy(pending[1])
        pending = (key, handle)
    if pending is not None:
        yield pending[0], steps.finish_copy(pending[1])


def _start_copy(steps: DeviceSteps, batch: HostBatch) -> Any:
    try:
        return steps.start_copy(batch)
    except torch.OutOfMemoryError:
        pass
    steps.release_after_oom()  # outside the except block, so the failed attempt's frames are released first
    return steps.start_copy(batch)
