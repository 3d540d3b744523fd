"""``embedpipe inspect`` and ``embedpipe plot``: a look inside an output, and a picture of its embeddings.

Registered into the ``embedpipe`` group by jobs/cli.py. The libraries (pipeline.ops.inspect, pipeline.ops.plot,
and through them torch and matplotlib) are imported only when a command runs, so ``embedpipe --help``
stays fast.
"""

from __future__ import annotations

import json
import shutil

import click

from jobs.exit_codes import errors_to_exit_codes
from pipeline.ops import INSPECT_ROWS, PLOT_LABELS, PLOT_SAMPLE


def _terminal_width() -> int:
    """The terminal's width, kept to 80-120 columns (the token tables read worst outside that)."""
    return max(80, min(120, shutil.get_terminal_size((100, 24)).columns))


@click.command()
@click.argument("path", type=click.Path())
@click.option("--rows", "-n", default=INSPECT_ROWS, show_default=True, type=click.IntRange(min=0),
              help="How many of the first rows to show, decoded.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(path: str, rows: int, as_json: bool) -> None:
    """Look inside an output directory, a stage directory or one shard.

    Shows each shard's rows, bytes and whether the manifest lists it as committed, the schema (with field
    metadata such as embedpipe.dtype), and the first rows: text decoded with the job's tokenizer beside
    the token ids and attention mask; for embeddings the shape, dtype, norms and first values.

    \b
    Examples: embedpipe inspect out/default
              embedpipe inspect out/default/tokens/data-00000-of-00004.arrow --rows 2
              embedpipe inspect out/default/embeddings --json
    """
    from pipeline.ops.inspect import inspect_path
    from pipeline.ops.inspect_format import format_report

    with errors_to_exit_codes():
        report = inspect_path(path, rows=rows)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=1))
    else:
        click.echo(format_report(report, width=_terminal_width()))


@click.command()
@click.argument("out_dir", metavar="OUT", type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Image to write (PNG; the suffix picks the format, e.g. .svg or .pdf).")
@click.option("--sample", default=PLOT_SAMPLE, show_default=True, type=click.IntRange(min=2),
              help="Rows drawn at random (seeded) from all embedding shards.")
@click.option("--color-by", "color_by", metavar="COLUMN",
              help="Colour points by a column of the token or embedding shards (e.g. length), or by 'source': "
                   "the input file of the row id.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sample: same seed, same picture.")
@click.option("--labels", default=PLOT_LABELS, show_default=True, type=click.IntRange(min=0),
              help="At most this many points, spread out, labelled with their decoded text.")
def plot(out_dir: str, out_path: str, sample: int, color_by: str | None, seed: int, labels: int) -> None:
    """Draw a 2-D PCA picture of a sample of OUT's embeddings.

    Per-token embeddings are mean-pooled over the real tokens. Axes show the variance each component
    explains; labels are the first characters of the row's text, decoded from its tokens.

    \b
    Example: embedpipe plot out/default --out pca.png --color-by source --sample 3000
    """
    from pipeline.ops.plot import plot_embeddings

    with errors_to_exit_codes():
        result = plot_embeddings(out_dir, out_path, sample=sample, seed=seed, color_by=color_by, labels=labels)
    for note in result.notes:
        click.echo(f"embedpipe: note: {note}", err=True)
    pc1, pc2 = result.explained
    click.echo(f"plot: {len(result.rows):,} of {result.total:,} embeddings of {out_dir} -> {result.path} "
               f"(PC1 {pc1:.1%}, PC2 {pc2:.1%} of the variance; {len(result.labels)} labelled)")


@click.command()
@click.argument("out_dir", metavar="OUT", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["megatron"]), default="megatron", show_default=True,
              help="megatron: Megatron-LM / NeMo indexed dataset (PREFIX.bin + PREFIX.idx).")
@click.option("--output", "prefix", required=True, type=click.Path(dir_okay=False),
              help="Path prefix of the files to write: PREFIX.bin and PREFIX.idx (a local path).")
@click.option("--separator", default="eos", show_default=True,
              help="Unpacked stages only: the token appended to each document: eos (the tokenizer's), a token, "
                   "or none. A packed stage already holds tokenizer.pack_separator.")
@click.option("--force", is_flag=True, help="Replace PREFIX.bin / PREFIX.idx if they exist.")
def export(out_dir: str, fmt: str, prefix: str, separator: str, force: bool) -> None:
    """Export OUT's token stage for LM pretraining: one sequence per source document (its tokens and the
    separator), documents in input order, from a packed (tokenizer.pack) or an unpacked (padding: none)
    stage. Streamed shard by shard; written under temporary names, read back, then renamed into place.

    \b
    Example: embedpipe export out/pretrain --format megatron --output out/pretrain-megatron/corpus_text_document
             (then Megatron-LM: --data-path out/pretrain-megatron/corpus_text_document)
    """
    from pipeline.ops.export import export_megatron

    with errors_to_exit_codes():
        result = export_megatron(out_dir, prefix, separator=separator, force=force)
    click.echo(f"export: {result.documents:,} documents, {result.tokens:,} tokens ({result.dtype}) -> "
               f"{result.bin_path}, {result.idx_path}"
               + (f"; {result.empty_documents:,} empty documents left out" if result.empty_documents else ""))
