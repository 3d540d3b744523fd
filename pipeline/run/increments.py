"""The job's plan over time: a fresh plan, or the last run's plan plus units for newly arrived input files.

Scheduled jobs point ``input.path`` at a glob that gains files. When every file
of the last run is still there unchanged (same name, size and modification time)
and new files have appeared, the committed shards stay exactly as they are and
only the new files are planned, into new shards numbered after the old ones.
Each such extension is recorded in the manifest's ``increments``. Shards keep the
name they were born with: ``data-0000i-of-0000N`` where N is the plan's size at
the time, so names of different increments end in different totals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.inputs.files import InputFile
from pipeline.inputs.plan import WorkUnit, plan_units
from pipeline.output.contract import plan_names, shard_name
from pipeline.output.manifest import now


@dataclass
class JobPlan:
    """The units to run, each unit's shard name, and the increment this run adds (None: a fresh plan)."""

    units: list[WorkUnit]
    names: list[str]
    increment: dict[str, Any] | None = None


def _unchanged_history(old: dict[str, Any] | None, files: list[InputFile]) -> bool:
    """Whether every file ``old`` planned is still among ``files``, with the same name, size and time."""
    if old is None:
        return False
    before = {f["name"]: f for f in old.get("input", {}).get("files", [])}
    now_named = {f.name: f for f in files}
    return bool(before) and all(name in now_named and now_named[name].fingerprint() == record
                                for name, record in before.items())


def _planned_groups(old: dict[str, Any], files: list[InputFile]) -> list[list[InputFile]]:
    """The old plan's files in the order it planned them: the first run's, then each increment's."""
    later = [set(increment["files"]) for increment in old.get("increments", [])]
    planned = {f["name"] for f in old["input"]["files"]}
    first = [f for f in files if f.name in planned and not any(f.name in group for group in later)]
    return [first] + [[f for f in files if f.name in group] for group in later]


def plan_job(files: list[InputFile], shard_rows: int, old: dict[str, Any] | None) -> JobPlan:
    """The plan of this run, extending ``old`` (the output's manifest, if any) when only files were added."""
    if not _unchanged_history(old, files):
        units = plan_units(files, shard_rows)
        return JobPlan(units, [shard_name(u.index, len(units)) for u in units])
    kept: list[WorkUnit] = []
    for group in _planned_groups(old, files):
        kept += plan_units(group, shard_rows, first_index=len(kept))
    names = plan_names(old["plan"])
    planned = {f["name"] for f in old["input"]["files"]}
    new = [f for f in files if f.name not in planned]
    if not new:
        return JobPlan(kept, names)
    added = plan_units(new, shard_rows, first_index=len(kept))
    total = len(kept) + len(added)
    increment = {"at": now(), "files": [f.name for f in new], "first_unit": len(kept), "units": len(added)}
    return JobPlan(kept + added, names + [shard_name(u.index, total) for u in added], increment)
