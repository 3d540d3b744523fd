"""A look inside an output: shard schemas, row counts, and the first rows decoded back to text.

:func:`inspect_path` takes an output directory (OUT), a stage directory (OUT/tokens, OUT/embeddings)
or one shard file and returns a JSON-ready report (plain dicts and lists); :func:`pipeline.ops.inspect_format.format_report`
renders that report for a terminal. The tokenizer that decodes token ids comes from the resolved
config in the manifest next to the shards (``tokenizer.name``, else ``encoder.model``); without one
the report still shows schemas, counts, ids and values, and says why there is no text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.ops import INSPECT_ROWS
from pipeline.output.contract import DTYPE_METADATA_KEY, MANIFEST_NAME, STAGES
from pipeline.output.manifest import load_manifest
from pipeline.output.storage import is_remote, output_path

EMBEDDING_VALUES = 6  # first values shown per embedding row



# ---------------------------------------------------------------- locating and reading


@dataclass(frozen=True)
class Target:
    """What a path given to ``inspect`` is: an output, a stage directory or a shard."""

    kind: str  # "output" | "stage" | "shard"
    path: Path
    out_dir: Path | None  # the output directory the path belongs to, when the layout tells
    stage: str | None  # "tokens" | "embeddings" when known from the layout


def locate(path: str | Path) -> Target:
    """Tell what ``path`` is.

    Raises:
        ConfigError: the path does not exist or is none of an output, a stage directory or a shard.
    """
    p = output_path(path)
    if not p.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if p.is_file():
        stage = p.parent.name if p.parent.name in STAGES else None
        out = p.parent.parent if stage and (p.parent.parent / MANIFEST_NAME).is_file() else None
        return Target("shard", p, out, stage)
    if (p / MANIFEST_NAME).is_file() or any((p / s).is_dir() for s in STAGES):
        return Target("output", p, p, None)
    if any(p.glob("*.arrow")):
        stage = p.name if p.name in STAGES else None
        out = p.parent if (p.parent / MANIFEST_NAME).is_file() else None
        return Target("stage", p, out, stage)
    raise ConfigError(f"{path}: not an embedpipe output directory (no manifest.json, tokens/ or embeddings/), "
                      "a stage directory (no *.arrow files) or a shard file")


def _open_stream(path: Any) -> tuple[Any, pa.ipc.RecordBatchStreamReader]:
    source = pa.BufferReader(path.read_bytes()) if is_remote(path) else pa.memory_map(str(path))
    try:
        return source, pa.ipc.open_stream(source)
    except (pa.ArrowInvalid, OSError) as exc:
        source.close()
        raise ConfigError(f"{path}: not an Arrow IPC stream shard ({exc})") from None


def shard_stats(path: Path) -> tuple[pa.Schema, int]:
    """A shard's schema and row count, counted over its record batches (memory-mapped, no copy)."""
    source, reader = _open_stream(path)
    with source:
        try:
            rows = sum(batch.num_rows for batch in reader)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"{path}: damaged Arrow IPC stream ({exc})") from None
        return reader.schema, rows


def read_head(path: Path, rows: int) -> pa.Table:
    """The first ``rows`` rows of a shard, reading only the record batches that hold them."""
    source, reader = _open_stream(path)
    with source:
        batches, have = [], 0
        for batch in reader:
            if have >= rows:
                break
            batches.append(batch)
            have += batch.num_rows
        return pa.Table.from_batches(batches, schema=reader.schema).slice(0, rows)


def stage_of(schema: pa.Schema, layout_stage: str | None) -> str:
    """The stage a shard belongs to: from the directory name, else from its columns."""
    if layout_stage:
        return layout_stage
    if "embedding" in schema.names:
        return "embeddings"
    if "input_ids" in schema.names:
        return "tokens"
    raise ConfigError(f"a shard with columns {schema.names} is neither a token shard (input_ids) "
                      "nor an embedding shard (embedding)")


# ---------------------------------------------------------------- the tokenizer


@dataclass
class Decoder:
    """The job's tokenizer, or why there is none."""

    name: str | None = None
    tokenizer: Any = None
    note: str | None = None

    def text(self, input_ids: list[int], mask: list[int] | None) -> str | None:
        """The row's real tokens as ``transformers`` decodes them, special tokens dropped except the unknown token.

        [UNK] stays: dropping it too (as ``skip_special_tokens`` does) would hide where text was lost.
        """
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(self.content_ids(input_ids, mask))

    def content_ids(self, input_ids: list[int], mask: list[int] | None) -> list[int]:
        """The real (mask 1) ids that are not special tokens, the unknown token excepted."""
        skip = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        mask = mask if mask is not None else [1] * len(input_ids)
        return [t for t, m in zip(input_ids, mask, strict=True) if m and t not in skip]

    def tokens(self, input_ids: list[int]) -> list[str] | None:
        return None if self.tokenizer is None else self.tokenizer.convert_ids_to_tokens(input_ids)


def load_decoder(manifest: dict[str, Any] | None) -> Decoder:
    """The tokenizer named by a manifest's resolved config, loaded as the job loaded it."""
    if manifest is None:
        return Decoder(note="no manifest.json next to the shards: token ids are not decoded")
    config = manifest.get("config", {})
    name = (config.get("tokenizer") or {}).get("name") or (config.get("encoder") or {}).get("model")
    if not name:
        return Decoder(note="the manifest names no tokenizer: token ids are not decoded")
    from pipeline.tokenize.loading import _load_hf_tokenizer  # the job's loader: aliases, local dirs, tokenizer.json

    try:
        tokenizer = _load_hf_tokenizer(name, "the manifest's tokenizer.name",
                                       (config.get("tokenizer") or {}).get("revision"))  # a hub id's pinned commit
    except ConfigError as exc:
        return Decoder(name, None, f"{exc}: token ids are not decoded")
    note = None
    recorded = manifest.get("tokenizer_sha256")
    if recorded and hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest() != recorded:
        note = f"tokenizer {name!r} differs from the one the job used (sha256): decoded text may be wrong"
    return Decoder(name, tokenizer, note)


# ---------------------------------------------------------------- the report


def _schema_json(schema: pa.Schema) -> list[dict[str, Any]]:
    def text(raw: bytes) -> str:
        return raw.decode(errors="replace")

    return [{"name": f.name, "type": str(f.type), "metadata": {text(k): text(v) for k, v in (f.metadata or {}).items()}}
            for f in schema]


def _committed(out_dir: Path | None, manifest: dict[str, Any] | None, stage: str, name: str, size: int) -> str:
    """``yes`` (listed in the manifest, same size), ``no`` (not listed), ``size differs``, or ``no manifest``."""
    if out_dir is None or manifest is None:
        return "no manifest"
    record = manifest.get("stages", {}).get(stage, {}).get("shards", {}).get(name)
    if record is None:
        return "no"
    return "yes" if record.get("bytes") == size else "size differs"


def _stage_summary(directory: Path, stage: str, out_dir: Path | None, manifest: dict[str, Any] | None) -> dict:
    shards = []
    for path in sorted(directory.glob("*.arrow")):
        _, rows = shard_stats(path)
        size = path.stat().st_size
        shards.append({"name": path.name, "rows": rows, "bytes": size,
                       "committed": _committed(out_dir, manifest, stage, path.name, size)})
    listed = manifest.get("stages", {}).get(stage, {}).get("shards", {}) if manifest else {}
    on_disk = {s["name"] for s in shards}
    for name, record in sorted(listed.items()):
        if name not in on_disk:
            shards.append({"name": name, "rows": record.get("rows"), "bytes": record.get("bytes"),
                           "committed": "missing"})
    present = [s for s in shards if s["committed"] != "missing"]
    return {"stage": stage, "dir": str(directory), "shards": shards,
            "rows": sum(s["rows"] for s in present), "bytes": sum(s["bytes"] for s in present)}


def _token_rows(table: pa.Table, decoder: Decoder) -> list[dict[str, Any]]:
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    missing = [None] * table.num_rows
    rows = []
    for i in range(table.num_rows):
        ids, mask = columns["input_ids"][i], columns.get("attention_mask", missing)[i]
        row = {"row": i, "id": columns.get("id", missing)[i], "text": decoder.text(ids, mask),
               "input_ids": ids, "attention_mask": mask, "tokens": decoder.tokens(ids)}
        for extra in ("length", "chunk", "token_type_ids"):
            if extra in columns:
                row[extra] = columns[extra][i]
        rows.append(row)
    return rows


def _embedding_rows(table: pa.Table, token_rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    from pipeline.data.reader import arrow_to_tensor  # torch: only when there are embeddings to show
    from pipeline.output.embedding_format import arrow_to_numpy, decode_embeddings, field_dims
    from pipeline.output.quantize import QUANTIZED

    field = table.schema.field("embedding")
    try:
        if field_dims(field)[1] in QUANTIZED:  # shown decoded: int8 / uint8 through their ranges, bits as -1 / +1
            values = decode_embeddings(arrow_to_numpy(table.column("embedding"), field), field, to_float=True)
        else:
            values = arrow_to_tensor(table.column("embedding"), field).float().numpy()
    except ValueError as exc:
        raise ConfigError(f"embedding column: {exc}") from None
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * table.num_rows
    rows = []
    for i, vector in enumerate(values):
        row: dict[str, Any] = {"row": i, "id": ids[i]}
        if vector.ndim == 1:
            row["norm"] = float(np.linalg.norm(vector))
            row["values"] = [float(v) for v in vector[:EMBEDDING_VALUES]]
        else:
            norms = np.linalg.norm(vector, axis=-1)
            mask = token_rows[i].get("attention_mask") if token_rows and i < len(token_rows) else None
            real = norms[np.asarray(mask, dtype=bool)] if mask is not None and len(mask) == len(norms) else norms
            row["norm"] = float(real.mean()) if len(real) else 0.0  # mean per-position norm over real tokens
            row["values"] = [float(v) for v in vector[0, :EMBEDDING_VALUES]]  # position 0
        if token_rows and i < len(token_rows):
            match = token_rows[i]
            row["text"] = match["text"]
            row["token_id_matches"] = match["id"] == ids[i]
        rows.append(row)
    return rows


def _shard_detail(path: Path, layout_stage: str | None, out_dir: Path | None, manifest: dict[str, Any] | None,
                  decoder: Decoder, rows: int) -> dict[str, Any]:
    schema, count = shard_stats(path)
    stage = stage_of(schema, layout_stage)
    size = path.stat().st_size
    detail: dict[str, Any] = {"path": str(path), "name": path.name, "stage": stage, "rows": count, "bytes": size,
                              "committed": _committed(out_dir, manifest, stage, path.name, size),
                              "schema": _schema_json(schema)}
    head = read_head(path, rows) if rows else None
    if stage == "tokens":
        detail["rows_shown"] = _token_rows(head, decoder) if head is not None else []
        return detail
    token_path = path.parent.parent / "tokens" / path.name
    token_rows = None
    if head is not None and token_path.is_file():
        token_rows = _token_rows(read_head(token_path, rows), decoder)
    field = schema.field("embedding")
    detail["embedding"] = {"shape": [count, *_embedding_dims(field.type)],
                           "dtype": (field.metadata or {}).get(DTYPE_METADATA_KEY, b"?").decode()}
    detail["rows_shown"] = _embedding_rows(head, token_rows) if head is not None else []
    return detail


def _embedding_dims(value_type: pa.DataType) -> list[int]:
    dims = []
    while pa.types.is_fixed_size_list(value_type):
        dims.append(value_type.list_size)
        value_type = value_type.value_type
    return dims


def inspect_path(path: str | Path, rows: int = INSPECT_ROWS) -> dict[str, Any]:
    """A JSON-ready report on an output directory, a stage directory or a shard.

    For a directory: a per-shard summary (name, rows, bytes, committed per the manifest) and the first
    shard in detail (of each stage, for an output); for a shard: its detail. A shard's detail holds its
    schema (with field metadata), row count, size and its first ``rows`` rows: token ids, masks, token
    strings and the decoded text; for embeddings the shape, stored dtype, norms, first values and the
    matching token row's text.

    Raises:
        ConfigError: the path does not exist, or is not an output, a stage directory or a readable shard.
    """
    target = locate(path)
    manifest = load_manifest(target.out_dir) if target.out_dir else None
    decoder = load_decoder(manifest)
    report: dict[str, Any] = {"path": str(path), "kind": target.kind,
                              "out_dir": str(target.out_dir) if target.out_dir else None,
                              "tokenizer": decoder.name, "notes": [decoder.note] if decoder.note else []}
    if manifest is not None:
        report["status"] = manifest.get("status")
        report["counts"] = manifest.get("counts")
    if target.kind == "shard":
        report["stages"] = []
        report["shards"] = [_shard_detail(target.path, target.stage, target.out_dir, manifest, decoder, rows)]
        return report
    if target.kind == "output":
        stage_dirs = [(target.path / s, s) for s in STAGES if (target.path / s).is_dir()]
    else:
        stage_dirs = [(target.path, target.stage)]
    report["stages"], report["shards"] = [], []
    for directory, stage in stage_dirs:
        first = next(iter(sorted(directory.glob("*.arrow"))), None)
        detail = _shard_detail(first, stage, target.out_dir, manifest, decoder, rows) if first else None
        stage = stage or (detail["stage"] if detail else directory.name)
        report["stages"].append(_stage_summary(directory, stage, target.out_dir, manifest))
        if detail:
            report["shards"].append(detail)
    return report
