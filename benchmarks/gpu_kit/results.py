"""The results file: one JSON object, rewritten whole (atomically) after every section, so that a run cut
short by its time limit still leaves everything it measured. A section that fails records its error and
traceback and the run goes on with the next one; a section still running when its time is up is
interrupted (SIGALRM, between two Python steps) and recorded as timed out."""

from __future__ import annotations

import json
import math
import os
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_NAME = "gpu_check.json"
SUMMARY_NAME = "summary.txt"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers, paths strings."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class SectionTimeout(BaseException):  # a BaseException, so that no `except Exception` swallows it
    """Raised in the main thread when a section outlives its time."""


def _alarm(signum: int, frame: object) -> None:
    raise SectionTimeout


class Results:
    def __init__(self, out_dir: Path, header: dict[str, Any]) -> None:
        self.path = Path(out_dir) / RESULTS_NAME
        self.data: dict[str, Any] = {**header, "sections": {}}
        self.started = time.perf_counter()
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.started
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(self.data), indent=2, allow_nan=False), encoding="utf-8")
        os.replace(tmp, self.path)

    def put(self, name: str, value: Any) -> None:
        self.data["sections"][name] = value
        self.save()

    def run(self, name: str, fn: Callable[[], Any], *, deadline: float, needs_s: float = 0.0,
            limit_s: float | None = None) -> Any:
        """Run one section and store what it returns: a skip when too little time is left, an error recorded,
        interrupted after ``limit_s`` seconds or at the deadline, whichever comes first."""
        left = deadline - time.perf_counter()
        if left < needs_s:
            self.put(name, {"skipped": f"time budget: {left:.0f} s left, the section needs about {needs_s:.0f} s"})
            return None
        allowed = max(1.0, min(left, limit_s or left))
        print(f"[gpu_check] {name} ...", flush=True)
        started = time.perf_counter()
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, allowed)
        try:
            value = fn()
        except SectionTimeout:
            self.put(name, {"error": f"timed out: stopped after {allowed:.0f} s (the section's share of the budget)",
                            "section_s": time.perf_counter() - started})
            print(f"[gpu_check] {name} TIMED OUT after {allowed:.0f} s", flush=True)
            return None
        except Exception as exc:  # noqa: BLE001 - a failed section is a result to record, not a reason to stop
            self.put(name, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:],
                            "section_s": time.perf_counter() - started})
            print(f"[gpu_check] {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            return None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if isinstance(value, dict):
            value = {**value, "section_s": time.perf_counter() - started}
        self.put(name, value)
        print(f"[gpu_check] {name} done in {time.perf_counter() - started:.1f} s", flush=True)
        return value
