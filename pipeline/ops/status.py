"""``embedpipe status OUT``: what is planned, committed, missing and quarantined, per stage; who holds the lock.

Cheap: reads the manifest and stats the shard files (sizes, no checksums; ``verify`` reads every byte).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.output.contract import STAGES, TOKENS, plan_names
from pipeline.output.lock import lock_holder
from pipeline.output.manifest import load_manifest
from pipeline.output.outdir import looks_committed
from pipeline.output.storage import output_path
from pipeline.run.job_record import committed_records, computed_tokens


@dataclass
class StageStatus:
    """One stage's progress as the manifest and the files on disk tell it."""

    stage: str
    status: str
    planned: int
    committed: int
    missing: list[str]
    damaged: list[str]
    """Listed shards whose file is gone or has another size."""
    rows: int
    quarantined: int
    stale: list[str] = field(default_factory=list)
    """Embedding shards intact on disk whose token shard a rerun redoes (gone or altered)."""
    tokens: int = 0
    """Real tokens in the committed shards' rows (padding not counted)."""
    computed_tokens: int | None = None
    """Embeddings: token positions the forwards computed, padding included (None for shards recorded
    without the count); ``computed_tokens / tokens`` is the padding waste the runs really had."""


@dataclass
class OutputStatus:
    """The whole output directory: job status, stages, lock."""

    out_dir: str
    job_status: str
    updated_at: str | None
    stages: list[StageStatus] = field(default_factory=list)
    lock: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def output_status(out_dir: Path | str) -> OutputStatus:
    """The status of ``out_dir``, a local path or an fsspec URL (job status ``absent`` when it holds no manifest yet)."""
    out_dir = output_path(out_dir)
    holder = lock_holder(out_dir)
    manifest = load_manifest(out_dir)
    lock = holder.__dict__ if holder else None
    if manifest is None:
        return OutputStatus(str(out_dir), "absent", None, [], lock)
    planned = plan_names(manifest["plan"])
    stages = []
    kept: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        record = manifest.get("stages", {}).get(stage)
        if record is None:
            continue
        shards = record.get("shards", {})
        # what a rerun would keep, by the cheap size check (see pipeline.run.job_record)
        kept[stage] = committed_records(manifest, out_dir, stage, checksum=False, tokens=kept.get(TOKENS))
        intact = {name for name, shard in shards.items() if looks_committed(out_dir, stage, shard)}
        damaged = sorted(name for name in shards if name not in intact)
        stale = sorted(name for name in intact if name not in kept[stage])
        stages.append(StageStatus(
            stage=stage, status=record.get("status", "?"), planned=len(planned),
            committed=len(kept[stage]), missing=[name for name in planned if name not in shards], damaged=damaged,
            rows=sum(s.get("rows", 0) for s in shards.values()),
            quarantined=sum(s.get("quarantined", 0) for s in shards.values()), stale=stale,
            tokens=sum(s.get("tokens", 0) for s in shards.values()),
            computed_tokens=None if stage == TOKENS else computed_tokens(shards),
        ))
    status = manifest.get("status", "?")
    if status == "running" and holder is None:
        status = "interrupted"  # the manifest says running but no live job holds the lock
    return OutputStatus(str(out_dir), status, manifest.get("updated_at"), stages, lock)


def format_status(status: OutputStatus) -> str:
    """Human-readable lines for the terminal."""
    lines = [f"{status.out_dir}: job {status.job_status}" + (f" (updated {status.updated_at})" if status.updated_at else "")]
    for s in status.stages:
        line = (f"  {s.stage:<10} {s.status:<9} {s.committed}/{s.planned} shards committed, "
                f"{len(s.missing)} missing, {s.rows:,} rows")
        line += f", {s.tokens:,} tokens"
        if s.stage == "tokens":
            line += f", {s.quarantined:,} rows quarantined"
        elif s.computed_tokens is not None and s.tokens:
            line += f" ({s.computed_tokens:,} computed with padding, {s.computed_tokens / s.tokens - 1:.1%} more)"
        lines.append(line)
        if s.damaged:
            lines.append(f"  {'':<10} damaged or altered: {', '.join(s.damaged[:5])} (a rerun redoes them)")
        if s.stale:
            lines.append(f"  {'':<10} made from a token shard a rerun redoes: {', '.join(s.stale[:5])} "
                         "(a rerun redoes them too)")
    if status.lock:
        lines.append(f"  lock: held by pid {status.lock['pid']} on {status.lock['host']} since {status.lock['started_at']}")
    else:
        lines.append("  lock: free")
    return "\n".join(lines)
