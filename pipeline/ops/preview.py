"""``embedpipe plan``: what a run would do, without writing anything or starting Ray.

Plans the units exactly as a run would (so it reads the input: line files are
scanned for line starts), tokenizes a sample of rows spread over the units to
estimate tokens and truncation, sizes the shards, and compares with what the
output directory already holds: what a rerun would skip, or why it would refuse.
It lists the files of a directory input that a run would not read, with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.config import JobConfig
from pipeline.errors import ConfigError
from pipeline.hub import pin_revisions
from pipeline.inputs.columns import check_columns
from pipeline.inputs.discovery import find_inputs
from pipeline.inputs.files import TextRules
from pipeline.ops.measure import JobSample, estimate_plan, format_estimate, import_torch, tokenize_sample
from pipeline.output.manifest import differences, embedding_differences, load_manifest, new_manifest
from pipeline.output.ownership import files_in_the_way, foreign_entries
from pipeline.output.storage import output_path
from pipeline.run.increments import plan_job
from pipeline.run.job_record import decide_resume
from pipeline.tokenize.loading import check_pack_stages, load_tokenize_spec
from pipeline.tokenize.stage import ReadSpec, read_unit

# Rows tokenized for the estimates: SAMPLE_UNITS units spread over the plan, SAMPLE_ROWS rows from each.
SAMPLE_UNITS = 8
SAMPLE_ROWS = 128
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


@dataclass
class PlanPreview:
    """The dry run's findings."""

    out_dir: str
    stages: list[str]
    files: int
    units: list[dict[str, Any]]
    rows: int
    sample_rows: int
    tokens_per_row: float
    truncated_fraction: float
    estimated_tokens: int
    estimated_bytes: dict[str, int]
    rerun: str
    would_skip: dict[str, int] = field(default_factory=dict)
    increment: dict[str, Any] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    models: dict[str, dict[str, str]] = field(default_factory=dict)
    """The hub ids and the commits they resolve to now (what a run would pin them to)."""
    estimate: dict[str, Any] | None = None
    """Wall time per stage on the cluster a run would use, and the rates measured for it (None: --no-estimate)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sample_texts(config: JobConfig, units: list[Any]) -> list[tuple[list[str], list[str]]]:
    """(ids, texts) of up to SAMPLE_ROWS rows from each of SAMPLE_UNITS units spread over the plan."""
    read = ReadSpec(config.input.text_column, config.input.id_column,
                    TextRules(config.input.nul_bytes, config.input.max_text_bytes))
    picks = sorted({round(i * (len(units) - 1) / max(1, SAMPLE_UNITS - 1)) for i in range(SAMPLE_UNITS)}) if units else []
    samples = []
    for index in picks:
        ids, texts = [], []
        for batch in read_unit(units[index], read):
            ids += batch.ids
            texts += batch.texts
            if len(texts) >= SAMPLE_ROWS:
                break
        if texts:
            samples.append(([str(i) for i in ids[:SAMPLE_ROWS]], texts[:SAMPLE_ROWS]))
    return samples


def preview_job(config: JobConfig, stages: tuple[str, ...], *, estimate: bool = True, cpus: int | None = None,
                gpus: int | None = None) -> PlanPreview:
    """Plan ``config``'s job and estimate it (see the module docstring); writes nothing.

    With ``estimate``, also time the tokenizer and (for stages that embed) the encoder on the sample, and
    estimate each stage's wall time on the cluster a run would use, or on one of ``cpus`` / ``gpus``.
    """
    from pipeline.tokenize.st_config import resolve_job_config

    # A run's driver imports torch before any work of a job that embeds: timed first, before anything here does.
    torch_import_s = import_torch() if estimate and "embeddings" in stages and not config.tokenizer.pack else 0.0
    config, models = pin_revisions(config)
    config = resolve_job_config(config)  # as a run resolves it: the rerun outcome compares config hashes
    found = find_inputs(config.input.path, config.input.format, exclude=config.output.path)
    files = found.files
    check_columns(files, config.input.text_column, config.input.id_column)
    spec = load_tokenize_spec(config)
    out_dir = output_path(config.output.path)
    old = load_manifest(out_dir)
    plan = plan_job(files, config.output.shard_rows, old)
    samples = _sample_texts(config, plan.units)
    sampled, tokenize_rate = tokenize_sample(spec, samples, timed=estimate)
    lengths = sampled.lengths if sampled else np.zeros(0, np.int64)
    untruncated = sampled.untruncated if sampled else np.zeros(0, np.int64)
    rows_in = sum(u.num_rows for u in plan.units)
    texts = len(untruncated)
    rows_per_text = len(lengths) / texts if texts else 1.0
    tokens_per_row = float(lengths.mean()) if len(lengths) else 0.0
    est_rows = round(rows_in * rows_per_text)
    width = spec.fixed_width
    token_bytes = 2 if spec.vocab_size <= 65536 else 4
    per_row = (width or tokens_per_row) * (token_bytes + 1 + (1 if spec.with_token_type_ids else 0)) + 4 + 24
    est_tokens = int(est_rows * tokens_per_row)
    if spec.pack:  # rows are blocks: every document's tokens and separator, max_length at a time (+ position ids)
        separator = 1 if spec.pack_separator_id is not None else 0
        est_tokens = int(rows_in * (tokens_per_row + separator))
        est_rows = round(est_tokens / spec.max_length)
        per_row = spec.max_length * (token_bytes + 1 + 4) + 64
    estimated = {"tokens": int(est_rows * per_row)}
    rerun, skip = _rerun_outcome(config, out_dir, old, files, plan, spec, stages, models)
    embed = None
    if "embeddings" in stages and config.tokenizer.pack:
        try:
            check_pack_stages(config, stages)
        except ConfigError as exc:
            rerun, skip = f"refused (exit 2): {exc}", {}
    elif "embeddings" in stages:
        from pipeline.encode.stage import plan_embed

        try:  # the checks a run makes of the encoder before any work (the device does not change them)
            embed = plan_embed(config, spec, "cpu", None)
            estimated["embeddings"] = int(est_rows * _embedding_row_bytes(config, embed.hidden_size, width))
        except ConfigError as exc:
            rerun, skip = f"refused (exit 2): {exc}", {}
    timing = None
    if estimate:
        shape = JobSample([u.num_rows * rows_per_text * tokens_per_row for u in plan.units],
                          [round(u.num_rows * rows_per_text) for u in plan.units], sampled, tokenize_rate)
        timing = estimate_plan(config, spec, stages, shape, embed is not None, torch_import_s, cpus, gpus)
    return PlanPreview(
        out_dir=str(out_dir), stages=list(stages), files=len(files),
        units=[{"index": u.index, "shard": name, "source": u.describe(), "rows": u.num_rows}
               for u, name in zip(plan.units, plan.names)],
        rows=rows_in, sample_rows=texts, tokens_per_row=round(tokens_per_row, 1),
        truncated_fraction=round(float(np.mean(untruncated > (spec.max_length or 0))) if spec.truncation and texts
                                 else 0.0, 4),
        estimated_tokens=est_tokens, estimated_bytes=estimated, rerun=rerun,
        would_skip=skip, increment=plan.increment, skipped=[s.to_json() for s in found.skipped], models=models,
        estimate=timing,
    )


def _embedding_row_bytes(config: JobConfig, hidden: int, width: int | None) -> float:
    positions = width if config.encoder.pooling == "none" else 1
    if config.encoder.output_dtype in ("binary", "ubinary"):  # bits packed 8 per byte
        return -(-hidden // 8) * positions + 24
    return hidden * positions * _DTYPE_BYTES[config.encoder.output_dtype] + 24


def _rerun_outcome(config: JobConfig, out_dir: Any, old: dict[str, Any] | None, files: list[Any], plan: Any,
                   spec: Any, stages: tuple[str, ...],
                   models: dict[str, dict[str, str]] | None = None) -> tuple[str, dict[str, int]]:
    """What running now would do with what OUT holds: (a sentence, committed shards it would skip per stage)."""
    if old is None:
        in_the_way, foreign = files_in_the_way(out_dir), foreign_entries(out_dir)
        if in_the_way:
            return f"refused (exit 2): files embedpipe did not write where a job writes ({', '.join(in_the_way[:5])})", {}
        if foreign:
            return (f"refused (exit 2) unless --force: OUT is not empty and not an embedpipe output "
                    f"({', '.join(foreign[:5])}); with --force they are kept"), {}
        return "fresh output: every shard would be written", {}
    fresh = new_manifest(config, files, plan.units, spec.tokenizer_sha256, plan.names, models)
    changed = differences(old, fresh, increment=plan.increment is not None)
    if changed:
        return f"refused (exit 2) unless --force: OUT holds a different job ({'; '.join(changed)})", {}
    encoder_changed = embedding_differences(old, fresh) if "embeddings" in stages else []
    if encoder_changed:
        return (f"refused (exit 2) unless --force: embeddings made with other encoder settings "
                f"({'; '.join(encoder_changed)}); --force redoes them and keeps the tokens"), {}
    try:
        resume = decide_resume(old, out_dir, stages, [u.index for u in plan.units])
    except ConfigError as exc:
        return f"refused (exit 2): {exc}", {}
    skip = {stage: resume.skipped(stage) for stage in stages}
    todo = {stage: len(plan.units) - n for stage, n in skip.items()}
    if not any(todo.values()):
        return "nothing to do: every shard is committed", skip
    return "resume: " + ", ".join(f"{stage} {todo[stage]} shards to write" for stage in stages), skip


def _first_ten(items: list[str], more: str = "") -> list[str]:
    """Indented lines for the first ten items, and how many more there are."""
    lines = [f"    {item}" for item in items[:10]]
    if len(items) > 10:
        lines.append(f"    … {len(items) - 10} more{more}")
    return lines


def format_preview(p: PlanPreview) -> str:
    """Human-readable lines for the terminal."""
    lines = [f"plan for {p.out_dir}: stages {', '.join(p.stages)}",
             f"  input: {p.files} files, {p.rows:,} rows -> {len(p.units)} units / shards"]
    lines += [f"  {what}: {ref['name']} revision {ref['revision']} = commit {ref['commit']}"
              for what, ref in p.models.items()]
    lines += _first_ten([f"{u['shard']}  {u['rows']:>8,} rows  {u['source']}" for u in p.units])
    if p.skipped:
        lines.append(f"  not read: {len(p.skipped)} files or folders of the input")
        lines += _first_ten([f"{entry['path']}: {entry['reason']}" for entry in p.skipped], " (--json lists them all)")
    if p.increment:
        lines.append(f"  incremental: {len(p.increment['files'])} new files -> {p.increment['units']} new shards")
    lines.append(f"  estimate from {p.sample_rows} sampled rows: {p.tokens_per_row:.1f} tokens/row, "
                 f"{p.truncated_fraction:.1%} truncated, ~{p.estimated_tokens:,} tokens")
    lines.append("  output size: " + ", ".join(f"{k} ~{v / 2**20:,.1f} MiB" for k, v in p.estimated_bytes.items()))
    if p.estimate is not None:
        lines += format_estimate(p.estimate)
    lines.append(f"  a run now: {p.rerun}")
    return "\n".join(lines)


def check_stages(stages: str) -> tuple[str, ...]:
    """``run`` / ``tokenize`` / ``embed`` -> the stages they run."""
    table = {"run": ("tokens", "embeddings"), "tokenize": ("tokens",), "embed": ("embeddings",)}
    if stages not in table:
        raise ConfigError(f"--stages: {stages!r} is not one of run, tokenize, embed")
    return table[stages]
