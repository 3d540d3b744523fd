"""``embedpipe verify OUT``: a full integrity check of an output directory, reading every byte.

Checks, per stage: every planned shard is committed; each listed shard has the
recorded size and sha256, opens as an Arrow IPC stream with the stage's schema
and the recorded row count; ``state.json`` lists exactly the committed shards and
``dataset_info.json`` is there (complete stages) and declares the shards' schema;
no stray shard files. Tokens: ids are unique (``(id, chunk)`` when chunking), each
row's mask counts its ``length``, rows in = rows written + rows quarantined per
shard and overall, the quarantine files hold the recorded rows, and the plan's
rows equal the rows read plus the blank lines. Embeddings: row for row the ids of their token shard,
made from the token shard now on disk, no nulls, and the recorded NaN/Inf count.

Blank JSONL lines (empty or whitespace-only) are not rows: the reader skips them
and each shard records them as ``blank_lines``, apart from ``rows_in``. So per
shard ``rows_in = texts + quarantined``, and over the job ``rows_in + blank_lines``
= the plan's rows (the plan counts lines). Manifests from before ``blank_lines``
have none (blank lines were quarantined rows then), which reads as 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.ops.verify_pack import check_packed_shard, check_packed_totals, is_packed
from pipeline.output.commit import file_sha256
from pipeline.output.contract import (
    DATASET_INFO_NAME,
    DATASET_STATE_NAME,
    QUARANTINE_DIR,
    STAGES,
    STAGING_DIR,
    plan_names,
)
from pipeline.output.embedding_format import arrow_to_numpy, count_nonfinite, field_dims
from pipeline.output.features import dataset_features
from pipeline.output.manifest import load_manifest
from pipeline.output.quantize import QUANTIZED
from pipeline.output.shards import read_shard_and_sha256
from pipeline.output.storage import output_path
from pipeline.output.unique_ids import find_duplicates, row_keys


@dataclass
class VerifyResult:
    """What ``verify`` found: problems (each names where and what) and what it checked."""

    out_dir: Any
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "ok": self.ok, "problems": self.problems,
                "warnings": self.warnings, "checked": self.checked}


def verify_output(out_dir: Path | str) -> VerifyResult:
    """Re-read every shard of ``out_dir`` (a local path or an fsspec URL) against the manifest (see the module docstring)."""
    out_dir = output_path(out_dir)
    result = VerifyResult(out_dir)
    try:
        manifest = load_manifest(out_dir)
    except Exception as exc:  # noqa: BLE001 - an unreadable manifest is a finding, not a crash
        result.problems.append(str(exc))
        return result
    if manifest is None:
        result.problems.append(f"{out_dir}: no manifest.json (not an embedpipe output, or nothing committed yet)")
        return result
    tables: dict[str, dict[str, pa.Table]] = {}
    for stage in STAGES:
        if stage in manifest.get("stages", {}):
            tables[stage] = _check_stage(result, out_dir, manifest, stage)
    if "tokens" in tables:
        _check_tokens(result, out_dir, manifest, tables["tokens"])
    if "embeddings" in tables:
        _check_embeddings(result, manifest, tables.get("tokens", {}), tables["embeddings"])
    if not tables:
        result.problems.append(f"{out_dir}: the manifest records no stage")
    return result


def _check_stage(result: VerifyResult, out_dir: Path, manifest: dict[str, Any], stage: str) -> dict[str, pa.Table]:
    """Files, checksums, schemas and row counts of one stage; returns the readable shards by name."""
    record = manifest["stages"][stage]
    shards: dict[str, Any] = record.get("shards", {})
    directory = out_dir / stage
    if record.get("status") != "complete":
        result.problems.append(f"{stage}: the stage is {record.get('status')!r}, not complete "
                               f"({len(shards)} of {manifest['plan']['shards']} shards committed)")
    missing = [name for name in plan_names(manifest["plan"]) if name not in shards]
    if missing:
        result.problems.append(f"{stage}: {len(missing)} planned shards not committed: {_few(missing)}")
    tables, schemas = {}, {}
    for name, shard in sorted(shards.items()):
        path = directory / name
        if not path.is_file():
            result.problems.append(f"{stage}/{name}: listed in the manifest but missing on disk")
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            result.problems.append(f"{stage}/{name}: {size} bytes on disk, the manifest recorded {shard['bytes']}")
            continue
        try:
            table, digest = read_shard_and_sha256(path)
        except (InputError, OSError) as exc:  # a damaged stream: still a sha256 to compare
            table, digest, error = None, file_sha256(path), exc
        if digest != shard["sha256"]:
            result.problems.append(f"{stage}/{name}: sha256 differs from the manifest's (the file was altered)")
            continue
        if table is None:
            result.problems.append(f"{stage}/{name}: not a readable Arrow IPC stream: {error}")
            continue
        if table.num_rows != shard["rows"]:
            result.problems.append(f"{stage}/{name}: {table.num_rows} rows, the manifest recorded {shard['rows']}")
        tables[name], schemas[name] = table, table.schema
    _check_schemas(result, stage, directory, schemas)
    if record.get("status") == "complete":
        _check_state_json(result, stage, directory, sorted(shards, key=lambda n: shards[n].get("unit", 0)))
        if not (directory / DATASET_INFO_NAME).is_file():
            result.problems.append(f"{stage}: dataset_info.json missing (datasets.load_from_disk cannot read the stage)")
    stray = sorted(p.name for p in directory.glob("*.arrow") if p.name not in shards) if directory.is_dir() else []
    if stray:
        result.problems.append(f"{stage}: {len(stray)} shard files not in the manifest: {_few(stray)}")
    staging = directory / STAGING_DIR
    if staging.is_dir() and any(staging.iterdir()):
        result.warnings.append(f"{stage}: leftovers of an interrupted write in {staging} (the next run removes them)")
    result.checked[stage] = {"shards": len(tables), "rows": sum(t.num_rows for t in tables.values()),
                             "bytes": sum(shards[n]["bytes"] for n in tables)}
    return tables


def _check_schemas(result: VerifyResult, stage: str, directory: Path, schemas: dict[str, pa.Schema]) -> None:
    if not schemas:
        return
    first_name, first = next(iter(schemas.items()))
    for name, schema in schemas.items():
        if not schema.equals(first, check_metadata=True):
            result.problems.append(f"{stage}/{name}: schema differs from {first_name}'s")
    info_path = directory / DATASET_INFO_NAME
    if not info_path.is_file():
        return
    try:
        written = json.loads(info_path.read_text(encoding="utf-8"))["features"]
        if written == dataset_features(first):  # as embedpipe writes it: no need to import datasets (seconds)
            return
    except (ValueError, KeyError, TypeError):
        pass  # datasets says what is wrong with it, below
    from datasets import Features

    try:
        features = Features.from_dict(json.loads(info_path.read_text(encoding="utf-8"))["features"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        result.problems.append(f"{stage}: dataset_info.json is not a datasets info file ({type(exc).__name__}: {exc})")
        return
    declared = {f.name: f.type for f in features.arrow_schema}  # datasets keeps the features sorted by name
    held = {f.name: f.type for f in first}
    if declared != held:
        result.problems.append(f"{stage}: dataset_info.json declares {_types(declared)}, the shards hold {_types(held)}")


def _check_state_json(result: VerifyResult, stage: str, directory: Path, names: list[str]) -> None:
    state_path = directory / DATASET_STATE_NAME
    if not state_path.is_file():
        result.problems.append(f"{stage}: state.json missing (datasets.load_from_disk cannot read the stage)")
        return
    try:
        listed = [item["filename"] for item in json.loads(state_path.read_text(encoding="utf-8"))["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        result.problems.append(f"{stage}: state.json is not a datasets state file ({type(exc).__name__}: {exc})")
        return
    if listed != names:
        result.problems.append(f"{stage}: state.json lists {len(listed)} shards, the manifest {len(names)} "
                               "(or in another order)")


def _check_tokens(result: VerifyResult, out_dir: Path, manifest: dict[str, Any], tables: dict[str, pa.Table]) -> None:
    shards = manifest["stages"]["tokens"]["shards"]
    for name, table in tables.items():
        shard = shards[name]
        if shard["rows_in"] != shard["texts"] + shard["quarantined"]:
            result.problems.append(f"tokens/{name}: {shard['rows_in']} rows in but {shard['texts']} tokenized "
                                   f"+ {shard['quarantined']} quarantined")
        if is_packed(table):
            check_packed_shard(result.problems, name, table, shard, manifest.get("config", {}).get("tokenizer", {}))
            _check_quarantine_file(result, out_dir, name, shard)
            continue
        mask_counts = _row_sums(table.column("attention_mask"))
        lengths = table.column("length").to_numpy()
        bad = np.flatnonzero(mask_counts != lengths)
        if len(bad):
            result.problems.append(f"tokens/{name}: row {int(bad[0])}: attention mask counts {int(mask_counts[bad[0]])} "
                                   f"real tokens, length says {int(lengths[bad[0]])} ({len(bad)} rows so)")
        _check_quarantine_file(result, out_dir, name, shard)
    if any(is_packed(t) for t in tables.values()):
        check_packed_totals(result.problems, manifest["stages"]["tokens"])
    extra, dupes = find_duplicates(list(tables), lambda name: row_keys(tables[name]),
                                   sum(t.num_rows for t in tables.values()))
    if extra:
        result.problems.append(f"tokens: {extra} duplicate row ids, e.g. {_few([d.describe() for d in dupes])}")
    planned_rows = sum(unit["num_rows"] for unit in manifest["plan"]["units"])
    totals = {key: sum(s.get(key, 0) for s in shards.values())
              for key in ("rows_in", "texts", "quarantined", "blank_lines")}
    complete = manifest["stages"]["tokens"].get("status") == "complete"
    if complete and totals["rows_in"] + totals["blank_lines"] != planned_rows:
        result.problems.append(f"tokens: the plan holds {planned_rows} input rows, the shards read {totals['rows_in']}"
                               + (f" and {totals['blank_lines']} blank lines" if totals["blank_lines"] else ""))
    counts = manifest.get("counts", {})
    expected = {"rows_in": totals["rows_in"], "rows_out": totals["texts"], "quarantined": totals["quarantined"]}
    if {k: counts.get(k) for k in expected} != expected:
        result.problems.append(f"manifest counts {counts} do not add up to the shards' {expected}")
    result.checked["tokens"].update({"rows_in": totals["rows_in"], "quarantined": totals["quarantined"],
                                     "blank_lines": totals["blank_lines"], "planned_rows": planned_rows})


def _check_quarantine_file(result: VerifyResult, out_dir: Path, name: str, shard: dict[str, Any]) -> None:
    if not shard.get("quarantined"):
        return
    path = out_dir / QUARANTINE_DIR / (shard.get("quarantine_file") or "")
    if not shard.get("quarantine_file") or not path.is_file():
        result.problems.append(f"tokens/{name}: {shard['quarantined']} rows quarantined but no quarantine file")
        return
    lines = path.read_bytes().count(b"\n")
    if lines != shard["quarantined"]:
        result.problems.append(f"quarantine/{path.name}: {lines} records, the manifest recorded {shard['quarantined']}")


def _check_embeddings(result: VerifyResult, manifest: dict[str, Any], token_tables: dict[str, pa.Table],
                      tables: dict[str, pa.Table]) -> None:
    token_shards = manifest["stages"].get("tokens", {}).get("shards", {})
    for name, table in tables.items():
        shard = manifest["stages"]["embeddings"]["shards"][name]
        tokens = token_tables.get(name)
        if tokens is None:
            result.problems.append(f"embeddings/{name}: no readable token shard of that name to align with")
            continue
        if shard.get("tokens_sha256") != token_shards.get(name, {}).get("sha256"):
            result.problems.append(f"embeddings/{name}: made from another version of tokens/{name}")
        if table.num_rows != tokens.num_rows:
            result.problems.append(f"embeddings/{name}: {table.num_rows} rows, tokens/{name} has {tokens.num_rows}")
            continue
        for column in ("id", "chunk"):
            if column in tokens.column_names and not table.column(column).equals(tokens.column(column)):
                row = int(np.flatnonzero(~pc.equal(table.column(column), tokens.column(column)).to_numpy(
                    zero_copy_only=False))[0])
                result.problems.append(f"embeddings/{name}: row {row}: {column} differs from tokens/{name}'s row")
        if table.column("embedding").null_count:
            result.problems.append(f"embeddings/{name}: {table.column('embedding').null_count} null embeddings")
        elif "nonfinite_rows" in shard:
            _check_nonfinite(result, name, table, shard["nonfinite_rows"])


def _check_nonfinite(result: VerifyResult, name: str, table: pa.Table, recorded: int) -> None:
    """The rows holding NaN or Inf, recounted, against the manifest's count."""
    field = table.schema.field("embedding")
    try:
        _, stored = field_dims(field)
        values = arrow_to_numpy(table.column("embedding"), field)
    except ValueError as exc:
        result.problems.append(f"embeddings/{name}: {exc}")
        return
    if stored in QUANTIZED:  # integers: the NaN / Inf count was taken of the float vectors before quantizing
        return
    found = int(np.count_nonzero(count_nonfinite(values, stored)))
    if found != recorded:
        result.problems.append(f"embeddings/{name}: {found} rows hold NaN or Inf, the manifest recorded {recorded}")


def _row_sums(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per-row sum of a list column of small integers."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_list(array.type):
        width = array.type.list_size
        return array.flatten().to_numpy().reshape(-1, width).sum(axis=1, dtype=np.int64)
    values = array.flatten().to_numpy().astype(np.int64)
    offsets = pc.list_value_length(array).to_numpy(zero_copy_only=False).cumsum()
    sums = np.concatenate([[0], values.cumsum()])
    return sums[offsets] - sums[np.concatenate([[0], offsets[:-1]])]


def _types(fields: dict[str, pa.DataType]) -> str:
    return "{" + ", ".join(f"{name}: {kind}" for name, kind in sorted(fields.items())) + "}"


def _few(items: list[Any], keep: int = 5) -> str:
    shown = ", ".join(map(str, items[:keep]))
    return shown + (f" … ({len(items)} in all)" if len(items) > keep else "")
