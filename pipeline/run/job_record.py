"""The job record: one run's view of ``manifest.json``, and resume decided from it, without Ray.

The driver schedules; this module keeps the books: which shards an existing output already holds
as committed (and so what a run must still do), each shard a run commits, the stage and job status,
the counts and the quarantine limit, and the record of the run itself. ``run``, ``plan`` and
``status`` all decide resume with :func:`decide_resume`, so what ``plan`` predicts is what ``run`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, JobFailed
from pipeline.output.commit import clean_staging
from pipeline.output.contract import EMBEDDINGS, QUARANTINE_DIR, STAGES, TOKENS
from pipeline.output.manifest import add_counts, now, save_manifest
from pipeline.output.outdir import committed_ok, looks_committed

# Seconds between manifest rewrites while shards stream in (always written at the end).
MANIFEST_INTERVAL = 1.0


@dataclass
class Progress:
    """A progress event for whoever displays it (the CLI)."""

    stage: str
    shards_done: int
    shards_total: int
    rows: int
    tokens: int
    elapsed: float
    skipped: int = 0


ProgressCallback = Callable[[Progress], None]


@dataclass
class StageResult:
    """What a stage did: its totals from the manifest and the wall time."""

    stage: str
    out_dir: Path
    shards: int
    skipped_shards: int
    totals: dict[str, Any]
    seconds: float
    nothing_to_do: bool


@dataclass(frozen=True)
class Resume:
    """What a run of ``stages`` over an existing output keeps and what it must still do."""

    kept: dict[str, dict[str, dict[str, Any]]]
    """Per stage: the committed shards that stay, by name (their manifest records)."""
    units_todo: list[int]
    """Units to tokenize (empty when the tokens stage is not run)."""
    embed_todo: list[str]
    """Committed token shards to embed now, in unit order (shards tokenized in this run come on top)."""

    def skipped(self, stage: str) -> int:
        return len(self.kept.get(stage, {}))


def computed_tokens(shards: dict[str, dict[str, Any]]) -> int | None:
    """Token positions the embedding forwards computed over ``shards`` (an embeddings stage's records), padding
    included: over the shards' real tokens, the padding waste the runs really had. None when a shard was
    recorded without the count (an older embedpipe)."""
    if not shards or any("computed_tokens" not in s for s in shards.values()):
        return None
    return sum(s["computed_tokens"] for s in shards.values())


def committed_records(manifest: dict[str, Any], out_dir: Path, stage: str, *, checksum: bool = True,
                      tokens: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The shards of ``stage`` the manifest lists that are in place as committed.

    With ``checksum`` each file is re-hashed (what a run trusts), else only its size is compared
    (what ``status`` can afford). An embedding shard also needs its token shard among ``tokens``
    with the sha256 it was made from: an embedding of an older token shard is not kept.
    """
    check = committed_ok if checksum else looks_committed
    records = manifest.get("stages", {}).get(stage, {}).get("shards", {})
    kept = {name: r for name, r in records.items() if check(out_dir, stage, r)}
    if stage == EMBEDDINGS:
        tokens = tokens if tokens is not None else {}
        kept = {n: r for n, r in kept.items() if n in tokens and tokens[n]["sha256"] == r.get("tokens_sha256")}
    return kept


def decide_resume(manifest: dict[str, Any], out_dir: Path, stages: tuple[str, ...], unit_indices: list[int], *,
                  checksum: bool = True) -> Resume:
    """What a run of ``stages`` must do on an output whose (same-job) manifest is ``manifest``.

    Raises:
        ConfigError: only the embed stage is asked for and the tokens stage is not complete.
    """
    tokens = committed_records(manifest, out_dir, TOKENS, checksum=checksum)
    kept = {TOKENS: tokens}
    embed_todo: list[str] = []
    if EMBEDDINGS in stages:
        if TOKENS not in stages and manifest.get("stages", {}).get(TOKENS, {}).get("status") != "complete":
            raise ConfigError(f"{out_dir}/{TOKENS} is not complete: run `embedpipe tokenize` (or `run`) first")
        kept[EMBEDDINGS] = committed_records(manifest, out_dir, EMBEDDINGS, checksum=checksum, tokens=tokens)
        embed_todo = [r["name"] for r in sorted(tokens.values(), key=lambda r: r["unit"])
                      if r["name"] not in kept[EMBEDDINGS]]
    done_units = {r["unit"] for r in tokens.values()}
    units_todo = [i for i in unit_indices if i not in done_units] if TOKENS in stages else []
    return Resume(kept, units_todo, embed_todo)


class JobRecord:
    """The manifest of the job being run, kept in memory and saved atomically (at most every second)."""

    def __init__(self, manifest: dict[str, Any], out_dir: Path, shards_planned: int,
                 started: float | None = None) -> None:
        self.manifest = manifest
        self.out_dir = out_dir
        self.shards_planned = shards_planned
        self.started = time.monotonic() if started is None else started
        self.stage_seconds: dict[str, float] = {}
        self._last_save = 0.0

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest["stages"].setdefault(name, {"status": "pending", "shards": {}})

    def save(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last_save > MANIFEST_INTERVAL:
            save_manifest(self.out_dir, self.manifest)
            self._last_save = time.monotonic()

    def resume(self, stages: tuple[str, ...], unit_indices: list[int]) -> Resume:
        """Decide resume (see :func:`decide_resume`) and drop from the record every shard that is not kept."""
        for folder in (*STAGES, QUARANTINE_DIR):
            clean_staging(self.out_dir / folder)
        resume = decide_resume(self.manifest, self.out_dir, stages, unit_indices)
        for stage, kept in resume.kept.items():
            self.stage(stage)["shards"] = kept
        return resume

    def finished(self, stages: tuple[str, ...]) -> bool:
        return all(self.stage(s).get("status") == "complete" for s in stages)

    def shard_names(self) -> list[str]:
        """Committed token shards' names in unit order."""
        return [r["name"] for r in sorted(self.stage(TOKENS)["shards"].values(), key=lambda r: r["unit"])]

    def start_run(self, stages: tuple[str, ...], cluster: dict[str, Any]) -> None:
        for stage in stages:
            self.stage(stage)["status"] = "running"
        self.manifest["status"] = "running"
        self.manifest["last_run"] = {"started_at": now(), "stages": list(stages), "cluster": cluster,
                                     "status": "running"}
        self.save(force=True)

    def record(self, stage: str, name: str, report: dict[str, Any]) -> None:
        """Note a committed shard (in memory; saved with the next :meth:`save`)."""
        self.stage(stage)["shards"][name] = report
        self.stage_seconds[stage] = time.monotonic() - self.started

    def progress(self, stage: str, skipped: int) -> Progress:
        shards = self.stage(stage)["shards"].values()
        return Progress("tokenize" if stage == TOKENS else "embed", len(shards), self.shards_planned,
                        sum(s["rows"] for s in shards), sum(s.get("tokens", 0) for s in shards),
                        time.monotonic() - self.started, skipped)

    def close_run(self, status: str, peak_rss_mb: float) -> None:
        """Finish the record of this run: wall time per stage, peak memory, outcome."""
        run = self.manifest.get("last_run")
        if run is None:
            return
        elapsed = time.monotonic() - self.started
        run.update(finished_at=now(), status=status, seconds=round(elapsed, 3),
                   stage_seconds={s: round(self.stage_seconds.get(s, elapsed), 3) for s in run["stages"]},
                   peak_rss_mb=round(peak_rss_mb, 1))

    def fail(self, message: str, peak_rss_mb: float) -> JobFailed:
        """Mark the running stages and the job failed, save, and return the error to raise."""
        self._stop_run("failed", peak_rss_mb)
        return JobFailed(message)

    def interrupt(self, peak_rss_mb: float) -> None:
        """Mark the running stages and the job interrupted (by a signal) and save: a rerun resumes."""
        self._stop_run("interrupted", peak_rss_mb)

    def _stop_run(self, status: str, peak_rss_mb: float) -> None:
        self.close_run(status, peak_rss_mb)
        for stage in self.manifest["stages"].values():
            if stage.get("status") == "running":
                stage["status"] = status
        self.manifest["status"] = status
        self.save(force=True)

    def committed_summary(self) -> str:
        """``tokens 3/8, embeddings 1/8 shards committed``: for the line a stopped job prints."""
        parts = [f"{s} {len(self.stage(s)['shards'])}/{self.shards_planned}" for s in STAGES
                 if s in self.manifest["stages"]]
        return ", ".join(parts) + " shards committed"

    def count(self, stages: tuple[str, ...]) -> None:
        """Recompute the totals of the stages run from their committed shards."""
        for stage in dict.fromkeys((TOKENS, *stages)):
            if stage in self.manifest["stages"]:
                add_counts(self.manifest, stage)

    def quarantine_exceeded(self, limit: float) -> str | None:
        """Why the quarantine limit (a count, or a fraction of rows read when < 1) fails the job, if it does."""
        totals = self.stage(TOKENS).get("totals", {})
        quarantined, rows_in = totals.get("quarantined", 0), totals.get("rows_in", 0)
        if quarantined > (limit * rows_in if limit < 1 else limit):
            return (f"{quarantined} of {rows_in} input rows were quarantined, more than "
                    f"input.max_quarantined ({limit}) allows; see the quarantine/ directory")
        return None

    def complete(self, stage: str) -> None:
        self.stage(stage)["status"] = "complete"
        if all(self.stage(s).get("status") == "complete" for s in STAGES if s in self.manifest["stages"]):
            self.manifest["status"] = "complete"

    def result(self, stage: str, skipped: int, nothing_to_do: bool) -> StageResult:
        record = self.stage(stage)
        seconds = self.stage_seconds.get(stage, time.monotonic() - self.started)
        return StageResult(stage, self.out_dir, self.shards_planned, skipped, record.get("totals", {}), seconds,
                           nothing_to_do)
