"""The run report, ``OUT/reports/<timestamp>.json``: one per job run, made from the manifest it left.

Counts come from the manifest (so the two always agree); the manifest's
``last_run`` adds wall time per stage, peak memory and the Ray cluster used; the
caller adds the command and the exit status.
"""

from __future__ import annotations

import datetime as _dt
import json
import resource
from pathlib import Path
from typing import Any

from pipeline.output.commit import commit_bytes
from pipeline.output.contract import EMBEDDINGS, REPORTS_DIR
from pipeline.output.manifest import load_manifest
from pipeline.output.storage import Location
from pipeline.run.job_record import computed_tokens


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_run_report(out_dir: Location, command: str, exit_status: int, error: str | None,
                     seconds: float, since: str) -> dict[str, Any]:
    """The report of the run that just ended on ``out_dir`` (works on a failed run's manifest too).

    ``since``: when the command started (ISO time); a ``last_run`` older than that is an earlier
    run's, i.e. this run found nothing to do.
    """
    manifest = load_manifest(out_dir) or {}
    run = manifest.get("last_run", {})
    if run.get("started_at", "") < since:
        run = {}
    stages = {}
    for name in run.get("stages", []):
        record = manifest.get("stages", {}).get(name, {})
        totals = record.get("totals", {})
        stage_seconds = run.get("stage_seconds", {}).get(name) or seconds
        rows, tokens = totals.get("rows", 0), totals.get("tokens", 0)
        stages[name] = {
            "status": record.get("status"), "shards": len(record.get("shards", {})),
            "rows": rows, "tokens": tokens, "quarantined": totals.get("quarantined", 0),
            "seconds": stage_seconds,
            "rows_per_s": round(rows / stage_seconds, 1) if stage_seconds else None,
            "tokens_per_s": round(tokens / stage_seconds, 1) if stage_seconds else None,
        }
        computed = computed_tokens(record.get("shards", {})) if name == EMBEDDINGS else None
        if computed is not None:  # positions the forwards computed: over tokens, the padding waste
            stages[name]["computed_tokens"] = computed
    return {
        "command": command, "exit_status": exit_status, "error": error,
        "out_dir": str(out_dir), "config_hash": manifest.get("config_hash"),
        "started_at": run.get("started_at"), "finished_at": run.get("finished_at"),
        "seconds": round(seconds, 3), "stages": stages, "counts": manifest.get("counts"),
        "peak_rss_mb": {"driver": round(peak_rss_mb(), 1), "largest_process": run.get("peak_rss_mb")},
        "cluster": run.get("cluster"), "versions": manifest.get("versions"),
        "nothing_to_do": not run,
    }


def write_run_report(out_dir: Location, report: dict[str, Any]) -> Path:
    """Commit the report atomically under ``OUT/reports/`` and return its path."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    path = out_dir / REPORTS_DIR / f"{stamp}.json"
    commit_bytes(json.dumps(report, indent=1, sort_keys=True).encode("utf-8"), path)
    return path


def summary_line(report: dict[str, Any]) -> str:
    """One line for logs and mail: outcome, rows and throughput per stage, quarantine, time."""
    parts = [f"exit {report['exit_status']}"]
    for name, stage in report["stages"].items():
        parts.append(f"{name} {stage['rows']:,} rows ({stage['rows_per_s'] or 0:,.0f}/s)")
    counts = report.get("counts") or {}
    parts.append(f"{counts.get('quarantined', 0):,} quarantined")
    parts.append(f"{report['seconds']:.1f} s")
    return "run report: " + ", ".join(parts)
