"""The ``embedpipe`` command.

Exit status: 0 done; 1 the job failed; 2 bad usage or config; 3 the output is locked.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from pipeline.errors import ConfigError, InputError, JobFailed, LockHeld

EXIT_CODES = {JobFailed: 1, InputError: 1, ConfigError: 2, LockHeld: 3}


def _fail(exc: Exception) -> None:
    code = next(code for kind, code in EXIT_CODES.items() if isinstance(exc, kind))
    click.echo(f"embedpipe: error: {exc}", err=True)
    sys.exit(code)


@contextmanager
def _errors_to_exit_codes() -> Iterator[None]:
    try:
        yield
    except (ConfigError, InputError, JobFailed, LockHeld) as exc:
        _fail(exc)
    except OSError as exc:  # the driver's own writes: a full disk, a read-only or vanished output directory
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(JobFailed(f"{where}{exc.strerror or exc}; committed shards are kept, rerun the same command "
                        "once the cause is fixed"))


def _job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("config", type=click.Path(dir_okay=False)),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key, e.g. --set tokenizer.max_length=77 (YAML scalar syntax)."),
        click.option("--output", "-o", type=click.Path(file_okay=False), envvar="EMBEDPIPE_OUTPUT",
                     help="Output directory (overrides output.path)."),
        click.option("--force", is_flag=True, help="Start over when OUT holds a different job's output."),
        click.option("--progress/--no-progress", default=None,
                     help="Live progress bar (default: on when stderr is a terminal)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class _ProgressBars:
    """One tqdm bar per stage over shards, with rows/s and tokens/s, drawn on stderr."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(event.stage)
        if bar is None:
            from tqdm import tqdm

            bar = self.bars[event.stage] = tqdm(
                total=event.shards_total, initial=event.skipped, unit="shard", desc=f"{event.stage:>8}",
                file=sys.stderr, dynamic_ncols=True, position=len(self.bars),
            )
        bar.n = event.shards_done
        seconds = max(event.elapsed, 1e-9)
        bar.set_postfix_str(f"{event.rows / seconds:,.0f} rows/s, {event.tokens / seconds:,.0f} tokens/s")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _summary(result: Any) -> str:
    totals = result.totals
    where = f"{result.out_dir}/{result.stage}"
    if result.nothing_to_do:
        return f"{result.stage}: nothing to do, all {result.shards} shards already committed in {where}"
    seconds = max(result.seconds, 1e-9)
    line = f"{result.stage}: {result.shards} shards in {where} ({result.skipped_shards} already done), "
    if result.stage == "tokens":
        line += (f"{totals.get('rows_in', 0):,} rows in, {totals.get('rows', 0):,} rows out, "
                 f"{totals.get('quarantined', 0):,} quarantined, {totals.get('tokens', 0):,} tokens, "
                 f"{totals.get('truncated_rows', 0):,} truncated")
    else:
        line += f"{totals.get('rows', 0):,} rows, {totals.get('nonfinite_rows', 0):,} with NaN/Inf"
    return line + f"; {result.seconds:.1f} s, {totals.get('rows', 0) / seconds:,.0f} rows/s"


def _run_stages(stages: tuple[str, ...], config: str, overrides: tuple[str, ...], output: str | None, force: bool,
                progress: bool | None) -> None:
    from pipeline.config import load_config
    from pipeline.run import run_job

    with _errors_to_exit_codes():
        job = load_config(config, list(overrides), output)
        bars = _ProgressBars(progress)
        try:
            results = run_job(job, stages=stages, force=force, progress=bars)
        finally:
            bars.close()
    for stage in stages:
        click.echo(_summary(results[stage]))
        nonfinite = results[stage].totals.get("nonfinite_rows", 0)
        if nonfinite:
            click.echo(f"embedpipe: warning: {nonfinite} embedding rows hold NaN or Inf; "
                       "their ids are in manifest.json (stages.embeddings.shards.*.nonfinite_ids)", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embedpipe")
def main() -> None:
    """embedpipe: turn a text corpus into sharded Arrow token and embedding datasets."""


@main.command()
@_job_options
def tokenize(config: str, overrides: tuple[str, ...], output: str | None, force: bool, progress: bool | None) -> None:
    """Run the tokenize stage: corpus -> OUT/tokens.

    Example: embedpipe tokenize conf/default.yaml --set tokenizer.max_length=128 -o out/demo
    """
    _run_stages(("tokens",), config, overrides, output, force, progress)


@main.command()
@_job_options
def embed(config: str, overrides: tuple[str, ...], output: str | None, force: bool, progress: bool | None) -> None:
    """Run the embed stage on an existing, complete OUT/tokens: -> OUT/embeddings.

    Example: embedpipe embed conf/default.yaml -o out/default
    """
    _run_stages(("embeddings",), config, overrides, output, force, progress)


@main.command()
@_job_options
def run(config: str, overrides: tuple[str, ...], output: str | None, force: bool, progress: bool | None) -> None:
    """Run both stages, overlapping: each token shard is embedded as soon as it is committed.

    Example: embedpipe run conf/default.yaml -o out/default
    """
    _run_stages(("tokens", "embeddings"), config, overrides, output, force, progress)


def _existing_output(out: str) -> Any:
    from pathlib import Path

    path = Path(out)
    if not path.is_dir():
        _fail(ConfigError(f"{out}: no such output directory"))
    return path


@main.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(out: str, as_json: bool) -> None:
    """Show what is planned, committed, missing and quarantined per stage, and who holds the lock.

    Cheap (sizes only); `verify` reads every byte. Example: embedpipe status out/default
    """
    import json

    from pipeline.status import format_status, output_status

    with _errors_to_exit_codes():
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

    from pipeline.verify import verify_output

    with _errors_to_exit_codes():
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


if __name__ == "__main__":
    main()
