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


class _ProgressBar:
    """A tqdm bar over shards, with rows/s and tokens/s, drawn on stderr."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.shards_total, initial=event.skipped, unit="shard",
                            desc=event.stage, file=sys.stderr, dynamic_ncols=True)
        self.bar.n = event.shards_done
        seconds = max(event.elapsed, 1e-9)
        self.bar.set_postfix_str(f"{event.rows / seconds:,.0f} rows/s, {event.tokens / seconds:,.0f} tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(result: Any) -> str:
    totals = result.totals
    if result.nothing_to_do:
        return f"{result.stage}: nothing to do, all {result.shards} shards already committed in {result.out_dir}"
    seconds = max(result.seconds, 1e-9)
    return (
        f"{result.stage}: {result.shards} shards in {result.out_dir}/{result.stage} "
        f"({result.skipped_shards} already done), {totals.get('rows_in', 0):,} rows in, "
        f"{totals.get('rows', 0):,} rows out, {totals.get('quarantined', 0):,} quarantined, "
        f"{totals.get('tokens', 0):,} tokens, {totals.get('truncated_rows', 0):,} truncated; "
        f"{result.seconds:.1f} s, {totals.get('rows_in', 0) / seconds:,.0f} rows/s"
    )


def _run_tokenize(config: str, overrides: tuple[str, ...], output: str | None, force: bool,
                  progress: bool | None) -> None:
    from pipeline.config import load_config
    from pipeline.run import run_tokenize

    with _errors_to_exit_codes():
        job = load_config(config, list(overrides), output)
        bar = _ProgressBar(progress)
        try:
            result = run_tokenize(job, force=force, progress=bar)
        finally:
            bar.close()
    click.echo(_summary(result))


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
    _run_tokenize(config, overrides, output, force, progress)


@main.command()
@_job_options
def run(config: str, overrides: tuple[str, ...], output: str | None, force: bool, progress: bool | None) -> None:
    """Run the job's stages (today: the tokenize stage).

    Example: embedpipe run conf/default.yaml -o out/default
    """
    _run_tokenize(config, overrides, output, force, progress)


if __name__ == "__main__":
    main()
