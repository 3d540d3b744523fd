"""What the CLI shows while a job runs: log lines (human or JSON) and a live progress bar per stage."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("embedpipe")

# Plain progress lines, when there are no bars: at most one per stage every this many seconds.
_PLAIN_INTERVAL = 5.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and the record's ``fields`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(log_format: str, level: str) -> None:
    """Send embedpipe's log records to stderr, as human lines or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("embedpipe")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _eta(done: int, total: int, elapsed: float, skipped: int) -> float | None:
    new = done - skipped
    if new <= 0 or done >= total:
        return None
    return elapsed / new * (total - done)


class Progress:
    """One tqdm bar per stage (shards, rows/s, tokens/s, ETA) on a terminal; else throttled log lines."""

    def __init__(self, bars: bool | None) -> None:
        self.bars_on = sys.stderr.isatty() if bars is None else bars
        self.bars: dict[str, Any] = {}
        self.last_line: dict[str, float] = {}

    def __call__(self, event: Any) -> None:
        seconds = max(event.elapsed, 1e-9)
        rates = f"{event.rows / seconds:,.0f} rows/s, {event.tokens / seconds:,.0f} tokens/s"
        if self.bars_on:
            self._bar(event, rates)
            return
        now = time.monotonic()
        if event.shards_done < event.shards_total and now - self.last_line.get(event.stage, 0) < _PLAIN_INTERVAL:
            return
        self.last_line[event.stage] = now
        eta = _eta(event.shards_done, event.shards_total, event.elapsed, event.skipped)
        log.info("%s: %d/%d shards, %s rows, %s%s", event.stage, event.shards_done, event.shards_total,
                 f"{event.rows:,}", rates, f", ETA {eta:.0f} s" if eta is not None else "",
                 extra={"fields": {"event": "progress", "stage": event.stage, "shards_done": event.shards_done,
                                   "shards_total": event.shards_total, "rows": event.rows, "tokens": event.tokens,
                                   "elapsed_s": round(event.elapsed, 3), "eta_s": eta}})

    def _bar(self, event: Any, rates: str) -> None:
        bar = self.bars.get(event.stage)
        if bar is None:
            from tqdm import tqdm

            bar = self.bars[event.stage] = tqdm(
                total=event.shards_total, initial=event.skipped, unit="shard", desc=f"{event.stage:>8}",
                file=sys.stderr, dynamic_ncols=True, position=len(self.bars),
            )
        if bar.disable:  # closed: the stage is done
            return
        bar.update(event.shards_done - bar.n)
        bar.set_postfix_str(rates)
        if event.shards_done >= event.shards_total:
            bar.close()  # freezes its elapsed time; the line stays on screen

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
