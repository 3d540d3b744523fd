"""Ray orchestration: the only module that imports ray.

The driver plans, submits one task per work unit with a bounded number in
flight, records each committed shard in the manifest as its report comes back,
and finishes the stage by writing the ``datasets`` metadata.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import ConfigError, JobFailed
from pipeline.manifest import add_counts, differences, load_manifest, new_manifest, save_manifest
from pipeline.models import load_tokenize_spec
from pipeline.plan import WorkUnit, plan_units
from pipeline.shards import clean_staging, file_sha256, write_dataset_metadata
from pipeline.sources import check_columns, discover
from pipeline.tokenize import TokenizeSpec, token_schema
from pipeline.tokenize_stage import ReadSpec, run_unit

# Set in every task (not as a Ray runtime_env, which costs ~1 s of worker start-up):
# tokenizers' own thread pool must not fight Ray's CPU slots.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
# Seconds between manifest rewrites while shards stream in (always written at the end).
_MANIFEST_INTERVAL = 1.0


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


@contextmanager
def ray_session(config: JobConfig) -> Iterator[None]:
    """Join the connected Ray cluster, else start or join the configured one (shut down on exit)."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=config.ray.num_cpus, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _load_spec_and_warm_up(config: JobConfig) -> TokenizeSpec:
    """Load the tokenizer (imports transformers and torch: seconds) and import datasets for the finish.

    Run in a thread while Ray starts: the two take about as long and overlap well.
    """
    spec = load_tokenize_spec(config)
    import datasets  # noqa: F401  (used by write_dataset_metadata at the end of the stage)

    return spec


def _tokenize_task(unit: WorkUnit, total: int, read: ReadSpec, spec: TokenizeSpec, out_dir: str) -> dict[str, Any]:
    os.environ.update(WORKER_ENV)
    return run_unit(unit, total, read, spec, out_dir)


def _prepare_output(out_dir: Path, fresh: dict[str, Any], force: bool) -> dict[str, Any]:
    """Reuse a matching manifest (resume) or start over; refuse a different job unless forced."""
    old = load_manifest(out_dir)
    if old is not None and not force:
        changed = differences(old, fresh)
        if changed:
            raise ConfigError(
                f"{out_dir} holds the output of a different job ({'; '.join(changed)}); "
                "use another output directory, or --force to start over"
            )
        old["config"] = fresh["config"]
        return old
    if force:
        for sub in ("tokens", "embeddings", "quarantine", "manifest.json"):
            target = out_dir / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return fresh


def _committed_ok(out_dir: Path, stage: str, record: dict[str, Any]) -> bool:
    path = out_dir / stage / record["name"]
    if not path.is_file() or path.stat().st_size != record["bytes"]:
        return False
    if record.get("quarantine_file") and not (out_dir / "quarantine" / record["quarantine_file"]).is_file():
        return False
    return file_sha256(path) == record["sha256"]


def _check_quarantine(config: JobConfig, totals: dict[str, Any]) -> None:
    limit = config.input.max_quarantined
    allowed = limit * totals["rows_in"] if limit < 1 else limit
    if totals["quarantined"] > allowed:
        raise JobFailed(
            f"{totals['quarantined']} of {totals['rows_in']} input rows were quarantined, more than "
            f"input.max_quarantined ({limit}) allows; see the quarantine/ directory"
        )


def run_tokenize(config: JobConfig, *, force: bool = False, progress: ProgressCallback | None = None) -> StageResult:
    """Run the tokenize stage of ``config``: plan, tokenize every missing unit on Ray, commit, finish.

    Raises:
        ConfigError: bad settings or inputs found before any work (exit 2 in the CLI).
        JobFailed: a unit failed or too many rows were quarantined (exit 1).
    """
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        spec_future = pool.submit(_load_spec_and_warm_up, config)
        files = discover(config.input.path, config.input.format)
        check_columns(files, config.input.text_column, config.input.id_column)
        units = plan_units(files, config.output.shard_rows)
        with ray_session(config):
            spec = spec_future.result()
            return _tokenize_stage(config, spec, files, units, force, progress, started)


def _tokenize_stage(config: JobConfig, spec: TokenizeSpec, files: list[Any], units: list[WorkUnit], force: bool,
                    progress: ProgressCallback | None, started: float) -> StageResult:
    tokenizer_sha = hashlib.sha256(spec.tokenizer_json.encode()).hexdigest()
    out_dir = Path(config.output.path)
    manifest = _prepare_output(out_dir, new_manifest(config, files, units, tokenizer_sha), force)
    stage = manifest["stages"].setdefault("tokens", {"status": "running", "shards": {}})
    stage["histogram_edges"] = spec.histogram_edges()
    clean_staging(out_dir / "tokens")
    clean_staging(out_dir / "quarantine")

    stage["shards"] = {name: rec for name, rec in stage["shards"].items() if _committed_ok(out_dir, "tokens", rec)}
    skipped = len(stage["shards"])
    done_units = {rec["unit"] for rec in stage["shards"].values()}
    todo = [u for u in units if u.index not in done_units]
    if not todo and stage.get("status") == "complete":
        return StageResult("tokens", out_dir, len(units), skipped, stage.get("totals", {}),
                           time.monotonic() - started, nothing_to_do=True)
    stage["status"] = "running"
    manifest["status"] = "running"
    save_manifest(out_dir, manifest)

    failures = _run_units(config, spec, units, todo, manifest, out_dir, progress, started, skipped)
    add_counts(manifest, "tokens")
    totals = stage["totals"]
    if failures:
        stage["status"] = manifest["status"] = "failed"
        save_manifest(out_dir, manifest)
        raise JobFailed("tokenize failed:\n  " + "\n  ".join(failures))
    try:
        _check_quarantine(config, totals)
    except JobFailed:
        stage["status"] = manifest["status"] = "failed"
        save_manifest(out_dir, manifest)
        raise
    names = [rec["name"] for rec in sorted(stage["shards"].values(), key=lambda r: r["unit"])]
    write_dataset_metadata(out_dir / "tokens", token_schema(spec), names, manifest["config_hash"])
    stage["status"] = "complete"
    manifest["status"] = "complete"
    save_manifest(out_dir, manifest)
    return StageResult("tokens", out_dir, len(units), skipped, totals, time.monotonic() - started, False)


def _run_units(config: JobConfig, spec: TokenizeSpec, units: list[WorkUnit], todo: list[WorkUnit],
               manifest: dict[str, Any], out_dir: Path, progress: ProgressCallback | None,
               started: float, skipped: int) -> list[str]:
    """Tokenize ``todo`` on Ray; record each report as it lands; return the failures' messages."""
    import ray

    try:
        task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=False)(_tokenize_task)
        read = ReadSpec(config.input.text_column, config.input.id_column)
        spec_ref = ray.put(spec)
        # Enough in flight to keep every CPU busy while results are recorded, few enough to bound memory.
        max_in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        stage = manifest["stages"]["tokens"]
        pending: dict[Any, WorkUnit] = {}
        queue = list(todo)
        failures: list[str] = []
        rows = tokens = 0
        last_save = time.monotonic()
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                unit = queue.pop(0)
                ref = task.remote(unit, len(units), read, spec_ref, str(out_dir))
                pending[ref] = unit
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                unit = pending.pop(ref)
                try:
                    report = ray.get(ref)
                except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
                    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
                    failures.append(f"unit {unit.index} ({unit.describe()}): {type(cause).__name__}: {cause}")
                    continue
                stage["shards"][report["name"]] = report
                rows += report["rows"]
                tokens += report["tokens"]
            if time.monotonic() - last_save > _MANIFEST_INTERVAL:
                save_manifest(out_dir, manifest)
                last_save = time.monotonic()
            if progress:
                done = len(stage["shards"])
                progress(Progress("tokenize", done, len(units), rows, tokens, time.monotonic() - started, skipped))
        return failures
    finally:
        save_manifest(out_dir, manifest)
