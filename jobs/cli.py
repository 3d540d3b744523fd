"""The ``embedpipe`` command.

Exit status: 0 done; 1 the job failed; 2 bad usage or config; 3 the output is locked.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from jobs.display import Progress, setup_logging
from jobs.exit_codes import errors_to_exit_codes, fail
from pipeline.errors import ConfigError, InputError, Interrupted, JobFailed, LockHeld
from pipeline.output.contract import EMBEDDINGS, STAGES, TOKENS
from pipeline.run.stopping import DEFAULT_GRACE

log = logging.getLogger("embedpipe")

def _job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("config", type=click.Path(dir_okay=False)),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key, e.g. --set tokenizer.max_length=77 (YAML scalar syntax)."),
        click.option("--output", "-o", type=click.Path(file_okay=False), envvar="EMBEDPIPE_OUTPUT",
                     help="Output directory (overrides output.path). Env: EMBEDPIPE_OUTPUT."),
        click.option("--address", envvar="RAY_ADDRESS",
                     help="Ray cluster to run on, e.g. ray://head:10001 or auto (overrides ray.address). "
                          "Env: RAY_ADDRESS. Unset: this machine (ray.executor: local worker processes, or a "
                          "local Ray cluster with executor: ray)."),
        click.option("--force", is_flag=True,
                     help="Redo the stages whose settings or input changed, removing only embedpipe's own files."),
        click.option("--grace", type=click.FloatRange(min=0), default=DEFAULT_GRACE, show_default=True,
                     envvar="EMBEDPIPE_GRACE",
                     help="Seconds to let shards in flight finish after SIGTERM/SIGINT before stopping "
                          "(exit 143/130; a rerun resumes). Env: EMBEDPIPE_GRACE."),
        click.option("--progress/--no-progress", default=None, envvar="EMBEDPIPE_PROGRESS",
                     help="Live progress bars (default: on when stderr is a terminal; else plain log lines)."),
        click.option("--log-format", type=click.Choice(["human", "json"]), default="human",
                     envvar="EMBEDPIPE_LOG_FORMAT", show_default=True,
                     help="Log lines on stderr: for people, or one JSON object per line. Env: EMBEDPIPE_LOG_FORMAT."),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
                     envvar="EMBEDPIPE_LOG_LEVEL", show_default=True, help="Env: EMBEDPIPE_LOG_LEVEL."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _summary(result: Any) -> str:
    totals = result.totals
    where = f"{result.out_dir}/{result.stage}"
    if result.nothing_to_do:
        return f"{result.stage}: nothing to do, all {result.shards} shards already committed in {where}"
    seconds = max(result.seconds, 1e-9)
    line = f"{result.stage}: {result.shards} shards in {where} ({result.skipped_shards} already done), "
    if result.stage == "tokens" and "document_tokens" in totals:  # tokenizer.pack
        line += (f"{totals.get('rows_in', 0):,} rows in, {totals.get('texts', 0):,} documents packed into "
                 f"{totals.get('rows', 0):,} blocks, {totals.get('quarantined', 0):,} quarantined, "
                 f"{totals.get('tokens', 0):,} tokens in blocks, {totals.get('dropped_tokens', 0):,} dropped")
    elif result.stage == "tokens":
        line += (f"{totals.get('rows_in', 0):,} rows in, {totals.get('rows', 0):,} rows out, "
                 f"{totals.get('quarantined', 0):,} quarantined, {totals.get('tokens', 0):,} tokens, "
                 f"{totals.get('truncated_rows', 0):,} truncated")
    else:
        line += f"{totals.get('rows', 0):,} rows, {totals.get('nonfinite_rows', 0):,} with NaN/Inf"
    return line + f"; {result.seconds:.1f} s, {totals.get('rows', 0) / seconds:,.0f} rows/s"


def _run_stages(stages: tuple[str, ...], *, config: str, overrides: tuple[str, ...], output: str | None,
                address: str | None, force: bool, grace: float, progress: bool | None, log_format: str,
                log_level: str) -> None:
    from pipeline.config import load_config
    from pipeline.output.manifest import now
    from pipeline.run.driver import run_job

    setup_logging(log_format, log_level)
    started, since = time.monotonic(), now()
    with errors_to_exit_codes():
        if address:
            overrides = (*overrides, f"ray.address={address}")
        job = load_config(config, list(overrides), output)
    display = Progress(progress)
    command = " ".join(["embedpipe", *sys.argv[1:]])
    try:
        results = run_job(job, stages=stages, force=force, progress=display, grace=grace)
    except Interrupted as exc:  # a signal: what was committed stays; the manifest says interrupted
        display.close()
        _write_report(job.output.path, command, 128 + exc.signum, str(exc), started, since)
        click.echo(f"embedpipe: {exc}", err=True)
        sys.exit(128 + exc.signum)
    except (JobFailed, InputError, OSError) as exc:
        display.close()
        _write_report(job.output.path, command, 1, str(exc), started, since)
        with errors_to_exit_codes():
            raise
    except (ConfigError, LockHeld) as exc:  # nothing ran (and a locked OUT is another job's to write)
        display.close()
        fail(exc)
    display.close()
    for stage in stages:
        click.echo(_summary(results[stage]))
        nonfinite = results[stage].totals.get("nonfinite_rows", 0)
        if nonfinite:
            log.warning("%d embedding rows hold NaN or Inf; their ids are in manifest.json "
                        "(stages.embeddings.shards.*.nonfinite_ids)", nonfinite)
    _write_report(job.output.path, command, 0, None, started, since)


def _write_report(out_dir: str, command: str, exit_status: int, error: str | None, started: float,
                  since: str) -> None:
    from pipeline.output.manifest import load_manifest
    from pipeline.output.storage import output_path
    from pipeline.run.report import build_run_report, summary_line, write_run_report

    out_dir = output_path(out_dir)
    if load_manifest(out_dir) is None:
        return  # the job stopped before it wrote anything
    report = build_run_report(out_dir, command, exit_status, error, time.monotonic() - started, since)
    try:
        path = write_run_report(out_dir, report)
    except OSError as exc:  # a full disk must not hide the job's own outcome
        log.error("could not write the run report: %s", exc)
        return
    log.info("%s; report: %s", summary_line(report), path,
             extra={"fields": {"event": "run_report", "report": str(path), **report}})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embedpipe")
def main() -> None:
    """embedpipe: turn a text corpus into sharded Arrow token and embedding datasets."""


# The three stage commands: (name, stages run, what it does, example), one table.
STAGE_COMMANDS = [
    ("tokenize", (TOKENS,), "Run the tokenize stage: corpus -> OUT/tokens.",
     "embedpipe tokenize conf/default.yaml --set tokenizer.max_length=128 -o out/demo"),
    ("embed", (EMBEDDINGS,), "Run the embed stage on an existing, complete OUT/tokens: -> OUT/embeddings.",
     "embedpipe embed conf/default.yaml -o out/default"),
    ("run", STAGES, "Run both stages, overlapping: each token shard is embedded as soon as it is committed.",
     "embedpipe run conf/default.yaml -o out/default"),
]


def _stage_command(name: str, stages: tuple[str, ...], summary: str, example: str) -> click.Command:
    def command(**options: Any) -> None:
        _run_stages(stages, **options)

    command.__doc__ = f"{summary}\n\n    Example: {example}\n    "
    command.__name__ = name
    return main.command(name=name)(_job_options(command))


for _row in STAGE_COMMANDS:
    _stage_command(*_row)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--output", "-o", type=click.Path(file_okay=False), envvar="EMBEDPIPE_OUTPUT",
              help="Output directory (overrides output.path). Env: EMBEDPIPE_OUTPUT.")
@click.option("--stages", type=click.Choice(["run", "tokenize", "embed"]), default="run", show_default=True,
              help="Which command's work to plan.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@click.option("--estimate/--no-estimate", default=True, show_default=True,
              help="Time the tokenizer and the encoder on the sample here (seconds) and estimate each stage's "
                   "wall time; --no-estimate skips the model load, for a fast plan.")
@click.option("--cpus", type=click.IntRange(min=1), help="Estimate for a cluster of this many CPUs.")
@click.option("--gpus", type=click.IntRange(min=0), help="Estimate for a cluster of this many GPUs.")
def plan(config: str, overrides: tuple[str, ...], output: str | None, stages: str, as_json: bool, estimate: bool,
         cpus: int | None, gpus: int | None) -> None:
    """Dry run: the units and shards a run would write, rows and tokens estimated from a sample,
    the stages, what a run now would skip, and how long each stage would take on the cluster a run
    would use (or one of --cpus / --gpus), from the tokenizer and encoder timed here on the sample.
    Writes nothing and starts or joins no Ray cluster.

    Example: embedpipe plan conf/default.yaml -o out/default --cpus 16
    """
    import json

    from pipeline.config import load_config
    from pipeline.ops.preview import check_stages, format_preview, preview_job

    with errors_to_exit_codes():
        job = load_config(config, list(overrides), output)
        preview = preview_job(job, check_stages(stages), estimate=estimate, cpus=cpus, gpus=gpus)
    click.echo(json.dumps(preview.to_json(), indent=1) if as_json else format_preview(preview))


def _existing_output(out: str) -> Any:
    from pipeline.output.storage import output_path

    path = output_path(out)
    if not path.is_dir():
        fail(ConfigError(f"{out}: no such output directory"))
    return path


@main.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(out: str, as_json: bool) -> None:
    """Show what is planned, committed, missing and quarantined per stage, and who holds the lock.

    Cheap (sizes only); `verify` reads every byte. Example: embedpipe status out/default
    """
    import json

    from pipeline.ops.status import format_status, output_status

    with errors_to_exit_codes():
        result = output_status(_existing_output(out))
    click.echo(json.dumps(result.to_json(), indent=1) if as_json else format_status(result))


@main.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON object.")
def verify(out: str, as_json: bool) -> None:
    """Re-read every shard and check it: checksums, row counts, schemas, token/embedding alignment,
    unique ids, and rows in = rows written + rows quarantined. Exit 0 if all is well, 1 otherwise.

    Example: embedpipe verify out/default
    """
    import json

    from pipeline.ops.verify import verify_output

    with errors_to_exit_codes():
        result = verify_output(_existing_output(out))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    else:
        for stage, checked in result.checked.items():
            click.echo(f"{stage}: checked {checked['shards']} shards, {checked['rows']:,} rows, {checked['bytes']:,} bytes")
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
        for problem in result.problems:
            click.echo(f"problem: {problem}")
        click.echo(f"{out}: OK" if result.ok else f"{out}: {len(result.problems)} problems")
    sys.exit(0 if result.ok else 1)


from jobs.ops_commands import export, inspect, plot  # noqa: E402  (registered after the group exists)

main.add_command(inspect)
main.add_command(plot)
main.add_command(export)


if __name__ == "__main__":
    main()
