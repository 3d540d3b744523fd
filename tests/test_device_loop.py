"""The batch loop's device logic, run on CPU with the device steps recorded (pipeline.encode.device).

The CUDA steps cannot run here; what they rely on can: each batch's copy is started one batch ahead and
awaited on its own handle (one event per copy on CUDA), the outputs come back in one copy per call, and an
out-of-memory error anywhere in the batch path (copy, forward, concatenation, copy back) is survived by
halving, with the forward's halving remembered for the batches that follow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_bert, build_tiny_clip_text
from transformers import AutoTokenizer

from pipeline.encode.device import DeviceSteps
from pipeline.encode.forward import Backoff, EncodeOptions, encode_rows
from pipeline.encode.models import load_encoder

TEXTS = [("the cat sat on the mat " * (1 + i % 7)).strip() for i in range(40)]


class RecordingSteps(DeviceSteps):
    """CPU steps that log each call, and raise out-of-memory at the calls named in ``fail``."""

    def __init__(self, fail: dict[str, set[int]] | None = None) -> None:
        super().__init__(torch.device("cpu"))
        self.log: list[tuple[str, int]] = []
        self.fail = fail or {}
        self.calls: dict[str, int] = {}
        self.copies = 0

    def _step(self, name: str) -> int:
        number = self.calls[name] = self.calls.get(name, 0) + 1
        if number in self.fail.get(name, ()):
            self.log.append((f"{name}:oom", number))
            raise torch.OutOfMemoryError(f"recorded: {name} #{number}")
        return number

    def start_copy(self, batch):
        self._step("start_copy")
        self.copies += 1
        handle = self.copies
        self.log.append(("start_copy", handle))
        return handle, super().start_copy(batch)

    def finish_copy(self, handle):
        number, moved = handle
        self.log.append(("finish_copy", number))
        return super().finish_copy(moved)

    def concat(self, tensors):
        self._step("concat")
        self.log.append(("concat", len(tensors)))
        return super().concat(tensors)

    def to_host(self, tensor):
        self._step("to_host")
        self.log.append(("to_host", len(tensor)))
        return super().to_host(tensor)

    def release_after_oom(self):
        self.log.append(("release", 0))


@pytest.fixture(scope="module", params=["bert", "clip"])
def tiny(request, tmp_path_factory):
    build = {"bert": build_tiny_bert, "clip": build_tiny_clip_text}[request.param]
    path = build(tmp_path_factory.mktemp("loop") / request.param)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=48, return_tensors="np")
    return load_encoder(path), enc["input_ids"], enc["attention_mask"]


def _encode(tiny, steps=None, backoff=None, pooling="mean"):
    model, ids, mask = tiny
    options = EncodeOptions(pooling=pooling, max_tokens_per_batch=128)
    return encode_rows(model, ids, mask, None, options, steps=steps, backoff=backoff)


def test_each_copy_is_started_one_batch_ahead_and_awaited_alone(tiny):
    steps = RecordingSteps()
    got = _encode(tiny, steps)
    copies = [n for step, n in steps.log if step == "start_copy"]
    waits = [n for step, n in steps.log if step == "finish_copy"]
    assert len(copies) > 3 and waits == copies  # one handle per copy, each awaited once, in order
    order = [entry for entry in steps.log if entry[0] in ("start_copy", "finish_copy")]
    # batch i+1's copy starts before batch i is handed to compute (the last one has nothing after it)
    for i in range(1, len(copies)):
        assert order.index(("start_copy", i + 1)) < order.index(("finish_copy", i))
    np.testing.assert_array_equal(got, _encode(tiny))


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_outputs_come_back_once_per_call(tiny, pooling):
    steps = RecordingSteps()
    got = _encode(tiny, steps, pooling=pooling)
    assert [step for step, _ in steps.log if step in ("concat", "to_host")] == ["concat", "to_host"]
    assert ("to_host", len(TEXTS)) in steps.log
    np.testing.assert_array_equal(got, _encode(tiny, pooling=pooling))


def _oom_above(model, max_rows: int, seen: list[int]):
    """A forward pre-hook that fails every forward of more than ``max_rows`` rows, as a full GPU would."""
    def hook(_module, args, kwargs):
        rows = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0]
        seen.append(rows)
        if rows > max_rows:
            raise torch.OutOfMemoryError(f"recorded: a forward of {rows} rows")
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    assert cosine.min() >= 0.99999


def test_a_forward_out_of_memory_halves_and_the_halving_is_remembered(tiny):
    want = _encode(tiny)
    model = tiny[0]
    seen: list[int] = []
    biggest = max(len(b) for b in _batches(tiny))
    handle = _oom_above(model, biggest // 2, seen)
    try:
        backoff = Backoff()
        steps = RecordingSteps()
        got = _encode(tiny, steps, backoff)
    finally:
        handle.remove()
    _close(got, want)
    assert backoff.splits >= 1
    failed = [rows for rows in seen if rows > biggest // 2]
    # Only the first batch too big fails; every later one is cut before it is tried.
    assert len(failed) == 1, seen
    assert ("release", 0) in steps.log
    # The next piece of the same shard starts already halved: no failure at all.
    seen.clear()
    handle = _oom_above(model, biggest // 2, seen)
    try:
        again = _encode(tiny, RecordingSteps(), backoff)
    finally:
        handle.remove()
    assert all(rows <= biggest // 2 for rows in seen)
    _close(again, want)


def _batches(tiny):
    from pipeline.encode.forward import WIDTH_MULTIPLE, compute_lengths, plan_batches

    _, ids, mask = tiny
    lengths = compute_lengths(ids, mask, None, EncodeOptions())
    return plan_batches(lengths, 128, WIDTH_MULTIPLE, ids.shape[1])


@pytest.mark.parametrize("where", ["start_copy", "concat", "to_host"])
def test_an_out_of_memory_in_the_copies_or_the_concatenation_is_survived(tiny, where):
    want = _encode(tiny)
    steps = RecordingSteps(fail={where: {2} if where == "start_copy" else {1}})
    got = _encode(tiny, steps)
    np.testing.assert_array_equal(got, want)  # the same batches, brought back in two halves or copied again
    assert (f"{where}:oom", 2 if where == "start_copy" else 1) in steps.log
    assert ("release", 0) in steps.log
    if where != "start_copy":  # copied back in halves: two or more copies, covering every row once
        assert sum(n for step, n in steps.log if step == "to_host") == len(TEXTS)
        assert len([s for s, _ in steps.log if s == "to_host"]) >= 2


def test_a_single_row_that_does_not_fit_is_an_error(tiny):
    model = tiny[0]
    handle = _oom_above(model, 0, [])
    try:
        with pytest.raises(torch.OutOfMemoryError):
            _encode(tiny, RecordingSteps())
    finally:
        handle.remove()


def test_sticky_cuda_errors_end_the_process_and_others_do_not():
    from pipeline.encode.device import device_lost

    assert device_lost(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert device_lost(RuntimeError("CUDA error: device-side assert triggered"))
    if hasattr(torch, "AcceleratorError"):
        assert issubclass(torch.AcceleratorError, RuntimeError)
    assert not device_lost(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not device_lost(ValueError("row 3: its attention mask is not right-padded"))
    assert not device_lost(RuntimeError("expected scalar type Float but found BFloat16"))


def test_an_encoder_process_exits_when_its_gpu_is_lost(tmp_path):
    """The exit itself, in a child process: the status Ray sees, and the log line naming the piece."""
    import subprocess
    import sys

    from cli_runs import REPO

    script = ("import logging; logging.basicConfig();"
              "from pipeline.encode.stage import _exit_if_device_lost;"
              "_exit_if_device_lost(ValueError('bad row'), 'tokens/a piece 0');"
              "print('still alive');"
              "_exit_if_device_lost(RuntimeError('CUDA error: an illegal memory access'), 'tokens/a piece 1')")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 70 and "still alive" in done.stdout
    assert "tokens/a piece 1: RuntimeError: CUDA error" in done.stderr and "exits for Ray to restart" in done.stderr
