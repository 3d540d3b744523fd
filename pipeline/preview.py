"""``embedpipe plan``: what a run would do, without writing anything or starting Ray.

Plans the units exactly as a run would (so it reads the input: line files are
scanned for line starts), tokenizes a sample of rows spread over the units to
estimate tokens and truncation, sizes the shards, and compares with what the
output directory already holds: what a rerun would skip, or why it would refuse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.config import JobConfig
from pipeline.errors import ConfigError
from pipeline.increments import plan_job
from pipeline.manifest import differences, load_manifest, new_manifest
from pipeline.models import load_tokenize_spec
from pipeline.outdir import committed_ok
from pipeline.sources import TextRules, check_columns, discover
from pipeline.storage import output_path
from pipeline.tokenize import tokenize_texts
from pipeline.tokenize_stage import ReadSpec, read_unit

# Rows tokenized for the estimates: SAMPLE_UNITS units spread over the plan, SAMPLE_ROWS rows from each.
SAMPLE_UNITS = 8
SAMPLE_ROWS = 128
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sample_lengths(config: JobConfig, spec: Any, units: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(rows after truncation/chunking per sampled text, untruncated token counts) of a sample of rows."""
    read = ReadSpec(config.input.text_column, config.input.id_column,
                    TextRules(config.input.nul_bytes, config.input.max_text_bytes))
    picks = sorted({round(i * (len(units) - 1) / max(1, SAMPLE_UNITS - 1)) for i in range(SAMPLE_UNITS)}) if units else []
    lengths, untruncated = [], []
    for index in picks:
        ids, texts = [], []
        for batch in read_unit(units[index], read):
            ids += batch.ids
            texts += batch.texts
            if len(texts) >= SAMPLE_ROWS:
                break
        if texts:
            rows = tokenize_texts(spec, [str(i) for i in ids[:SAMPLE_ROWS]], texts[:SAMPLE_ROWS])
            lengths.append(rows.lengths)
            untruncated.append(rows.untruncated)
    if not lengths:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(lengths), np.concatenate(untruncated)


def preview_job(config: JobConfig, stages: tuple[str, ...]) -> PlanPreview:
    """Plan ``config``'s job and estimate it (see the module docstring); writes nothing."""
    files = discover(config.input.path, config.input.format)
    check_columns(files, config.input.text_column, config.input.id_column)
    spec = load_tokenize_spec(config)
    out_dir = output_path(config.output.path)
    old = load_manifest(out_dir)
    plan = plan_job(files, config.output.shard_rows, old)
    lengths, untruncated = _sample_lengths(config, spec, plan.units)
    rows_in = sum(u.num_rows for u in plan.units)
    texts = len(untruncated)
    rows_per_text = len(lengths) / texts if texts else 1.0
    tokens_per_row = float(lengths.mean()) if len(lengths) else 0.0
    est_rows = round(rows_in * rows_per_text)
    width = spec.fixed_width
    token_bytes = 2 if spec.vocab_size <= 65536 else 4
    per_row = (width or tokens_per_row) * (token_bytes + 1 + (1 if spec.with_token_type_ids else 0)) + 4 + 24
    estimated = {"tokens": int(est_rows * per_row)}
    if "embeddings" in stages:
        estimated["embeddings"] = int(est_rows * _embedding_row_bytes(config, width))
    rerun, skip = _rerun_outcome(config, out_dir, old, files, plan, spec, stages)
    return PlanPreview(
        out_dir=str(out_dir), stages=list(stages), files=len(files),
        units=[{"index": u.index, "shard": name, "source": u.describe(), "rows": u.num_rows}
               for u, name in zip(plan.units, plan.names)],
        rows=rows_in, sample_rows=texts, tokens_per_row=round(tokens_per_row, 1),
        truncated_fraction=round(float(np.mean(untruncated > (spec.max_length or 0))) if spec.truncation and texts
                                 else 0.0, 4),
        estimated_tokens=int(est_rows * tokens_per_row), estimated_bytes=estimated, rerun=rerun,
        would_skip=skip, increment=plan.increment,
    )


def _embedding_row_bytes(config: JobConfig, width: int | None) -> float:
    from pipeline.encoders import _read_config, resolve_model_dir

    model_config = _read_config(resolve_model_dir(config.encoder.model))
    text = model_config.get("text_config") or model_config
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    positions = width if config.encoder.pooling == "none" else 1
    return hidden * positions * _DTYPE_BYTES[config.encoder.output_dtype] + 24


def _rerun_outcome(config: JobConfig, out_dir: Any, old: dict[str, Any] | None, files: list[Any], plan: Any,
                   spec: Any, stages: tuple[str, ...]) -> tuple[str, dict[str, int]]:
    """What running now would do with what OUT holds: (a sentence, committed shards it would skip per stage)."""
    if old is None:
        return "fresh output: every shard would be written", {}
    import hashlib

    fresh = new_manifest(config, files, plan.units, hashlib.sha256(spec.tokenizer_json.encode()).hexdigest(),
                         plan.names)
    changed = differences(old, fresh, increment=plan.increment is not None)
    if changed:
        return f"refused (exit 2) unless --force: OUT holds a different job ({'; '.join(changed)})", {}
    skip = {}
    for stage in stages:
        shards = old.get("stages", {}).get(stage, {}).get("shards", {})
        skip[stage] = sum(committed_ok(out_dir, stage, record) for record in shards.values())
    todo = {stage: len(plan.units) - n for stage, n in skip.items()}
    if not any(todo.values()):
        return "nothing to do: every shard is committed", skip
    return "resume: " + ", ".join(f"{stage} {todo[stage]} shards to write" for stage in stages), skip


def format_preview(p: PlanPreview) -> str:
    """Human-readable lines for the terminal."""
    lines = [f"plan for {p.out_dir}: stages {', '.join(p.stages)}",
             f"  input: {p.files} files, {p.rows:,} rows -> {len(p.units)} units / shards"]
    for unit in p.units[:10]:
        lines.append(f"    {unit['shard']}  {unit['rows']:>8,} rows  {unit['source']}")
    if len(p.units) > 10:
        lines.append(f"    … {len(p.units) - 10} more")
    if p.increment:
        lines.append(f"  incremental: {len(p.increment['files'])} new files -> {p.increment['units']} new shards")
    lines.append(f"  estimate from {p.sample_rows} sampled rows: {p.tokens_per_row:.1f} tokens/row, "
                 f"{p.truncated_fraction:.1%} truncated, ~{p.estimated_tokens:,} tokens")
    lines.append("  output size: " + ", ".join(f"{k} ~{v / 2**20:,.1f} MiB" for k, v in p.estimated_bytes.items()))
    lines.append(f"  a run now: {p.rerun}")
    return "\n".join(lines)


def check_stages(stages: str) -> tuple[str, ...]:
    """``run`` / ``tokenize`` / ``embed`` -> the stages they run."""
    table = {"run": ("tokens", "embeddings"), "tokenize": ("tokens",), "embed": ("embeddings",)}
    if stages not in table:
        raise ConfigError(f"--stages: {stages!r} is not one of run, tokenize, embed")
    return table[stages]
