"""Orchestration of both stages on the job's engine (:mod:`pipeline.run.engine`: Ray, or local processes).

The driver plans, submits one tokenize task per work unit (a bounded number in
flight), and hands each token shard to an encoder actor as soon as it is
committed, so the CPU and GPU stages overlap. It alone records committed shards
in the manifest, and finishes each stage by writing the ``datasets`` metadata.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.config import JobConfig
from pipeline.encode.stage import calibrate_ranges, embedding_schema, with_ranges
from pipeline.errors import Interrupted
from pipeline.faults import fault_point
from pipeline.hub import pin_revisions
from pipeline.inputs.columns import check_columns
from pipeline.inputs.discovery import discover
from pipeline.inputs.files import TextRules
from pipeline.inputs.identity import check_committed_inputs
from pipeline.inputs.plan import WorkUnit
from pipeline.output.contract import EMBEDDINGS, STAGES, TOKENS
from pipeline.output.lock import output_lock
from pipeline.output.manifest import COMPUTED_WITH_KEY, load_manifest, new_manifest
from pipeline.output.outdir import check_output_directory, prepare_output
from pipeline.output.shards import write_dataset_metadata
from pipeline.output.storage import output_path
from pipeline.output.unique_ids import duplicates_in_stage
from pipeline.run.encoder_pool import EncoderPlan, EncoderPool, plan_encoders
from pipeline.run.engine import Engine, TaskFailed, WorkerLost
from pipeline.run.executor import engine_session
from pipeline.run.increments import plan_job
from pipeline.run.job_record import JobRecord, ProgressCallback, StageResult
from pipeline.run.report import peak_rss_mb
from pipeline.run.stopping import DEFAULT_GRACE, StopRequest, install, stop_on_signals
from pipeline.run.tasks import tokenize_task
from pipeline.tokenize.core import TokenizeSpec, token_schema
from pipeline.tokenize.loading import check_pack_stages, load_tokenize_spec
from pipeline.tokenize.st_config import resolve_job_config
from pipeline.tokenize.stage import ReadSpec, tokenize_threads

log = logging.getLogger("embedpipe")

# Resubmissions by the driver of a unit or shard whose process or node was lost, on top of Ray's own
# retries (which do not cover every case, e.g. an actor on a removed node: ActorUnavailableError).
_DRIVER_RETRIES = 3
_RETRY = object()


def _resolve_and_load_spec(config: JobConfig) -> tuple[JobConfig, TokenizeSpec]:
    """The config resolved against the model (pooling, normalize, prompt, max_seq_length: see
    :func:`pipeline.tokenize.st_config.resolve_job_config`; what the manifest records and the config hash
    covers), and its tokenize spec."""
    config = resolve_job_config(config)
    return config, load_tokenize_spec(config)


def run_job(config: JobConfig, *, stages: tuple[str, ...] = STAGES, force: bool = False,
            progress: ProgressCallback | None = None, grace: float = DEFAULT_GRACE) -> dict[str, StageResult]:
    """Run ``stages`` of the job (tokenize, embed, or both overlapping) and return each stage's result.

    Raises:
        ConfigError: bad settings or inputs found before any work (exit 2 in the CLI).
        JobFailed: a unit or shard failed, or too many rows were quarantined (exit 1).
        Interrupted: SIGTERM or SIGINT came; in-flight shards were given ``grace`` seconds (see
            :mod:`pipeline.run.stopping`).
    """
    check_pack_stages(config, stages)  # before anything: the embed stage refuses packed tokens
    with stop_on_signals(grace) as stop:
        return _run_job(config, stages, force, progress, stop)


def _run_job(config: JobConfig, stages: tuple[str, ...], force: bool, progress: ProgressCallback | None,
             stop: StopRequest) -> dict[str, StageResult]:
    started = time.monotonic()
    config, models = pin_revisions(config)  # hub ids -> commits, before any work: every later load sees those
    out_dir = output_path(config.output.path)
    with ThreadPoolExecutor(max_workers=1) as pool:
        spec_future = pool.submit(_resolve_and_load_spec, config)  # seconds for some tokenizers: overlap it
        files = discover(config.input.path, config.input.format, exclude=config.output.path)
        check_columns(files, config.input.text_column, config.input.id_column)
        check_output_directory(out_dir, force)
        with output_lock(out_dir, command="+".join(stages)) as lock:
            if lock.previous:
                log.warning("took over the lock of %s left by a job that is gone: %s",
                            config.output.path, lock.previous.describe())
            old = load_manifest(out_dir)
            plan = plan_job(files, config.output.shard_rows, old)
            # An unfinished tokens stage's committed shards must have been made from the input as it is now.
            changed = (check_committed_inputs(old, plan.units, config.input.text_column, config.input.id_column,
                                              force) if TOKENS in stages else [])
            log.info("plan: %d input files -> %d work units (one shard each) into %s", len(files), len(plan.units),
                     config.output.path, extra={"fields": {"event": "plan", "files": len(files),
                                                           "units": len(plan.units), "out_dir": config.output.path}})
            if plan.increment:
                log.info("incremental: %d new input files -> %d new units after the %d already planned",
                         len(plan.increment["files"]), plan.increment["units"], plan.increment["first_unit"],
                         extra={"fields": {"event": "increment", **plan.increment}})
            with engine_session(config, len(plan.units) if TOKENS in stages else 1) as engine:
                install(stop)  # again: ray.init may set handlers of its own
                config, spec = spec_future.result()  # from here on, the config resolved against the model
                # Every check that can refuse the job runs before the output is touched (--force deletes).
                encoders = plan_encoders(config, spec, engine.resources()) if EMBEDDINGS in stages else None
                fresh = new_manifest(config, files, plan.units, spec.tokenizer_sha256, plan.names, models)
                if encoders:
                    fresh[COMPUTED_WITH_KEY] = encoders.spec.computed_with()
                if changed:  # --force: start over rather than mix two versions of the input
                    fresh["input"]["content_changed"] = changed
                stop.check()  # nothing touched yet
                manifest = prepare_output(out_dir, old, fresh, force, plan.increment, stages)
                record = JobRecord(manifest, out_dir, len(plan.units), started)
                return _Job(config, spec, plan.units, plan.names, record, encoders, progress, stop,
                            engine).run(stages)


def run_tokenize(config: JobConfig, *, force: bool = False, progress: ProgressCallback | None = None) -> StageResult:
    """Run the tokenize stage alone (see :func:`run_job`)."""
    return run_job(config, stages=(TOKENS,), force=force, progress=progress)[TOKENS]


class _Job:
    """One run of the driver: schedules the tasks and actors, and tells the job record what they committed."""

    def __init__(self, config: JobConfig, spec: TokenizeSpec, units: list[WorkUnit], names: list[str],
                 record: JobRecord, encoders: EncoderPlan | None, progress: ProgressCallback | None,
                 stop: StopRequest, engine: Engine) -> None:
        self.config, self.spec, self.units, self.engine = config, spec, units, engine
        self.names = dict(zip((u.index for u in units), names))
        self.record, self.encoders, self.progress, self.stop = record, encoders, progress, stop
        self.out_dir = record.out_dir
        self.failures: list[str] = []
        self.attempts: dict[tuple[str, Any], int] = {}
        self.peak_rss = peak_rss_mb()

    def _record(self, stage: str, name: str, report: dict[str, Any], skipped: int) -> None:
        """Note a committed shard in the job record and show progress."""
        self.record.record(stage, name, report)
        self.peak_rss = max(self.peak_rss, report.get("peak_rss_mb", 0))
        fault_point("driver.after_record")
        log.debug("%s/%s committed: %d rows", stage, name, report["rows"])
        if self.progress:
            self.progress(self.record.progress(stage, skipped))

    def run(self, stages: tuple[str, ...]) -> dict[str, StageResult]:
        record = self.record
        record.stage(TOKENS)["histogram_edges"] = self.spec.histogram_edges()
        resume = record.resume(stages, [u.index for u in self.units])
        skipped = {s: resume.skipped(s) for s in (TOKENS, *stages)}
        units_todo = set(resume.units_todo)
        unit_todo = [u for u in self.units if u.index in units_todo]
        log.info("resume: %s", ", ".join(f"{s}: {skipped[s]} of {len(self.units)} shards already committed"
                                         for s in stages), extra={"fields": {"event": "resume", "skipped": skipped}})
        if record.finished(stages) and not unit_todo and not resume.embed_todo:
            return {s: record.result(s, skipped[s], nothing_to_do=True) for s in stages}
        record.start_run(stages, self.engine.describe())
        try:
            self._execute(unit_todo, resume.embed_todo, stages, skipped)
        except Interrupted:
            record.interrupt(max(self.peak_rss, peak_rss_mb()))
            raise
        finally:
            record.save(force=True)
        return self._finish(stages, skipped)

    def _execute(self, unit_todo: list[WorkUnit], embed_todo: list[str], stages: tuple[str, ...],
                 skipped: dict[str, int]) -> None:
        engine = self.engine
        source = self.config.input
        read = ReadSpec(source.text_column, source.id_column, TextRules(source.nul_bytes, source.max_text_bytes))
        spec_ref = engine.put(self.spec)
        # Enough in flight to keep every CPU busy while results are recorded, few enough to bound memory.
        cpus = max(1, int(engine.resources().get("CPU", 1)))
        max_in_flight = 2 * cpus
        token_refs: dict[Any, WorkUnit] = {}
        queue, waiting_shards = list(unit_todo), list(embed_todo)

        def submit_tokenize() -> None:
            while queue and len(token_refs) < max_in_flight:
                unit = queue.pop(0)
                ref = engine.submit(tokenize_task, unit, self.names[unit.index], read, spec_ref, str(self.out_dir),
                                    tokenize_threads(cpus, len(queue) + len(token_refs) + 1), num_cpus=1)
                token_refs[ref] = unit

        submit_tokenize()  # tokenizing starts while the encoders load their models
        if EMBEDDINGS in stages:
            self._quantize_ranges(calibrate=False)  # those recorded by an earlier run, or given in the config
        pool = EncoderPool(self.encoders, engine) if EMBEDDINGS in stages else None
        if pool:
            pool.start()
        while queue or token_refs or waiting_shards or (pool and (pool.busy() or pool.shards)):
            if self.stop.requested:  # submit nothing more; let what is in flight finish within the grace period
                queue.clear()
                waiting_shards.clear()
                if pool:
                    pool.abandon_unstarted()
                if not (token_refs or (pool and pool.busy())) or self.stop.out_of_time():
                    raise self.stop.error(self.record.committed_summary())
            submit_tokenize()
            if pool and self.encoders.spec.needs_ranges and self._quantize_ranges(True, bool(queue or token_refs)):
                pool.plan = self.encoders
            if pool and not self.encoders.spec.needs_ranges:  # no piece before the int8 / uint8 ranges are known
                pool.submit(waiting_shards, self._token_rows, str(self.out_dir))
            # Model loads first: a load that failed on bad settings must surface as such, not as a shard error.
            # A timeout, so that a signal is seen within half a second however long the shards take.
            pending = [*pool.loading, *token_refs, *pool.in_flight, *pool.assembling] if pool else [*token_refs]
            ready = engine.wait(pending, timeout=0.5)
            for ref in ready:
                if pool and ref in pool.loading:
                    pool.loaded(ref)
                elif ref in token_refs:
                    unit = token_refs.pop(ref)
                    report = self._collect(ref, f"unit {unit.index} ({unit.describe()})", (TOKENS, unit.index))
                    if report is _RETRY:
                        queue.insert(0, unit)
                    elif report:
                        self._record(TOKENS, report["name"], report, skipped[TOKENS])
                        if pool:
                            waiting_shards.append(report["name"])
                elif ref in pool.in_flight:
                    name, piece, actor = pool.finished(ref)
                    status = self._collect(ref, f"embedding of tokens/{name} (piece {piece})", (EMBEDDINGS, name, piece))
                    if status is _RETRY:
                        pool.retry_piece(name, piece)
                        pool.replace(actor)
                    elif status:
                        pool.piece_done(name, status, str(self.out_dir))
                    else:
                        pool.drop(name)
                else:
                    name = pool.committed(ref)
                    report = self._collect(ref, f"commit of embeddings/{name}", (EMBEDDINGS, name))
                    if report is _RETRY:  # its pieces may have been lost with the node: embed the shard again
                        waiting_shards.insert(0, name)
                    elif report:
                        self._record(EMBEDDINGS, name, report, skipped.get(EMBEDDINGS, 0))
            self.record.save()
        if self.stop.requested:  # the last shards in flight finished within the grace period
            raise self.stop.error(self.record.committed_summary())
        for ref in list(pool.loading if pool else []):  # no shard was left to embed before these models loaded
            pool.loaded(ref)

    def _quantize_ranges(self, calibrate: bool, tokens_pending: bool = True) -> bool:
        """Fill in int8 / uint8 ranges and record them in the manifest: from the config, from an earlier run's
        record, or (``calibrate``, once the job's first token shard is committed) computed here from its first
        ``encoder.calibration_rows`` rows. True when the ranges became known."""
        from dataclasses import replace

        spec, enc = self.encoders.spec, self.config.encoder
        if spec.quantize not in ("int8", "uint8"):
            return False
        stage, first = self.record.stage(EMBEDDINGS), self.names[min(self.names)]
        sample = {"shard": first, "rows": enc.calibration_rows}
        recorded = stage.get("quantization") or {}
        if not spec.needs_ranges:  # encoder.quantize_ranges: its file may have changed under the same path
            if stage.get("shards") and recorded.get("ranges") not in (None, spec.quantize_ranges):
                raise self.record.fail(f"encoder.quantize_ranges: {enc.quantize_ranges} holds other ranges than the "
                                       "committed embeddings were quantized with; restore it, or give the new "
                                       "ranges another file name (a changed setting: --force redoes the embeddings)", max(self.peak_rss, peak_rss_mb()))
            stage["quantization"] = {"source": enc.quantize_ranges, "ranges": spec.quantize_ranges}
            return False
        if recorded.get("calibration") == sample and len((recorded.get("ranges") or [[]])[0]) == spec.hidden_size:
            ranges = recorded["ranges"]
        elif calibrate and first in self.record.stage(TOKENS)["shards"]:
            rows = min(enc.calibration_rows, self._token_rows(first))
            try:
                ranges = calibrate_ranges(spec, str(self.out_dir), first, enc.calibration_rows).tolist()
            except ValueError as exc:  # fewer than 2 rows to take a range from
                raise self.record.fail(f"{spec.quantize} calibration on tokens/{first}: {exc}; give the ranges in "
                                       "encoder.quantize_ranges", max(self.peak_rss, peak_rss_mb())) from None
            log.info("quantization: %s ranges calibrated on the first %d rows of tokens/%s", spec.quantize, rows, first)
        elif calibrate and not tokens_pending:  # the first unit failed: nothing to calibrate on
            raise self.record.fail("the job failed:\n  " + "\n  ".join(self.failures or [
                f"tokens/{first} was not committed"]) + f"\n  (its first rows calibrate the {spec.quantize} "
                "ranges; or give them in encoder.quantize_ranges)", max(self.peak_rss, peak_rss_mb()))
        else:
            return False
        self.encoders = replace(self.encoders, spec=with_ranges(spec, ranges))
        stage["quantization"] = {"calibration": sample, "ranges": self.encoders.spec.quantize_ranges}
        self.record.save(force=True)
        return True

    def _token_rows(self, name: str) -> int:
        """Rows of a committed token shard, from the job record (what its embedding is cut into pieces by)."""
        return self.record.stage(TOKENS)["shards"][name]["rows"]

    def _collect(self, ref: Any, what: str, key: tuple[str, Any]) -> dict[str, Any] | object | None:
        """The task's report; ``_RETRY`` after a system failure (a process or node lost) with attempts left;
        None after a failure that is recorded for the end of the job (bad data, or attempts used up), or
        any failure while the job is stopping (a worker that died with the signal is abandoned)."""
        try:
            return self.engine.get(ref)
        except TaskFailed as exc:  # the task itself raised: not retried blindly
            if not self.stop.requested:
                self.failures.append(f"{what}: {type(exc.cause).__name__}: {exc.cause}")
        except WorkerLost as exc:  # the process or node running it was lost
            if self.stop.requested:
                return None
            self.attempts[key] = self.attempts.get(key, 0) + 1
            if self.attempts[key] <= _DRIVER_RETRIES:
                log.warning("%s: %s; trying again (%d of %d)", what, exc.kind, self.attempts[key], _DRIVER_RETRIES)
                return _RETRY
            self.failures.append(f"{what}: {exc.kind} after {_DRIVER_RETRIES} retries: {exc}")
        return None

    # ------------------------------------------------------------ the end

    def _check_unique_ids(self, names: list[str]) -> None:
        """Fail (before the stage is complete) when the configured id column repeats a value."""
        rows = {name: self.record.stage(TOKENS)["shards"][name]["rows"] for name in names}
        extra, found = duplicates_in_stage(self.out_dir / TOKENS, rows)
        if extra:
            raise self.record.fail(
                f"input.id_column {self.config.input.id_column!r}: {extra} rows repeat an id of an earlier row, e.g. "
                + "; ".join(d.describe() for d in found)
                + ". Ids must be unique: fix the input, or unset input.id_column to key rows by file and position",
                max(self.peak_rss, peak_rss_mb()))

    def _finish(self, stages: tuple[str, ...], skipped: dict[str, int]) -> dict[str, StageResult]:
        record = self.record
        record.count(stages)
        peak = max(self.peak_rss, peak_rss_mb())
        if self.failures:
            raise record.fail("the job failed:\n  " + "\n  ".join(self.failures), peak)
        over = record.quarantine_exceeded(self.config.input.max_quarantined)
        if over:
            raise record.fail(over, peak)
        names = record.shard_names()
        if TOKENS in stages and self.config.input.id_column:  # ids by file and position are unique as made
            self._check_unique_ids(names)
        if TOKENS in stages:
            write_dataset_metadata(self.out_dir / TOKENS, token_schema(self.spec), names, record.manifest["config_hash"])
            record.complete(TOKENS)
        if EMBEDDINGS in stages:
            schema = embedding_schema(self.encoders.spec, self.spec.stride is not None)
            write_dataset_metadata(self.out_dir / EMBEDDINGS, schema, names, record.manifest["config_hash"])
            record.complete(EMBEDDINGS)
        record.close_run("complete", peak)
        record.save(force=True)
        return {s: record.result(s, skipped[s], nothing_to_do=False) for s in stages}
