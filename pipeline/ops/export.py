"""``embedpipe export OUT --format megatron --output PREFIX``: the token stage as a Megatron indexed dataset.

One sequence per source document, its tokens and the separator, documents in input order (shards in plan
order, rows or pieces in shard order). From a packed stage (``tokenizer.pack``), the pieces of a document
are joined again across block edges (documents never span units); its separator is already there. From
an unpacked stage (``padding: none``, nothing truncated or chunked), each row is a document and the
separator (default: the tokenizer's EOS) is appended. Documents with no token at all are left out (Megatron
has nothing to sample from them); the count says how many.

Streamed: one shard in memory at a time. Atomic: written under temporary names beside PREFIX, fsynced,
read back, then both files renamed; existing PREFIX.bin / PREFIX.idx are never replaced without ``force``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError
from pipeline.output.contract import TOKENS
from pipeline.output.manifest import load_manifest
from pipeline.output.megatron import MegatronWriter
from pipeline.output.shards import read_shard
from pipeline.output.storage import output_path

FORMATS = ("megatron",)


@dataclass(frozen=True)
class ExportResult:
    """What was written: the two files, documents, tokens, the dtype, and the documents left out as empty."""

    bin_path: str
    idx_path: str
    documents: int
    tokens: int
    dtype: str
    empty_documents: int


def _separator_id(manifest: dict[str, Any], separator: str | None) -> int | None:
    """The id appended to each document of an unpacked stage: ``eos`` (the job tokenizer's), a token, or none."""
    if separator in (None, "none"):
        return None
    from pipeline.tokenize.loading import tokenizer_settings

    config = manifest.get("config", {})
    name = config.get("tokenizer", {}).get("name") or config.get("encoder", {}).get("model")
    hf = tokenizer_settings(name, "tokenizer.name", config.get("tokenizer", {}).get("revision"))  # a pinned commit
    token = hf.eos_token if separator == "eos" else separator
    if token is None:
        raise ConfigError(f"--separator: the job's tokenizer {name!r} has no EOS token; name a token of its "
                          "vocabulary with --separator TOKEN, or --separator none")
    token_id = hf.backend_tokenizer.token_to_id(token)
    if token_id is None:
        raise ConfigError(f"--separator: {token!r} is not in the vocabulary of {name!r}")
    return token_id


def _check_exportable(manifest: dict[str, Any], out: Any, separator: str | None) -> bool:
    """Refuse what cannot give whole documents; returns whether the stage is packed."""
    record = manifest.get("stages", {}).get(TOKENS)
    if not record or record.get("status") != "complete":
        raise ConfigError(f"{out}: the tokens stage is not complete; finish it (rerun the job) before exporting")
    options = manifest.get("config", {}).get("tokenizer", {})
    if options.get("pack"):
        if options.get("pack_remainder") == "drop":
            raise ConfigError("tokenizer.pack_remainder is 'drop': the last tokens of each unit are not in the "
                              "blocks, so whole documents cannot be exported; re-tokenize with pack_remainder: pad")
        if separator != "eos":
            raise ConfigError("--separator: a packed stage already ends each document with "
                              "tokenizer.pack_separator; leave --separator out")
        return True
    if options.get("padding") != "none" or options.get("stride") is not None:
        raise ConfigError("the tokens stage is padded or chunked (tokenizer.padding must be 'none', "
                          "tokenizer.stride unset, or tokenizer.pack true) to export whole documents")
    truncated = record.get("totals", {}).get("truncated_rows", 0)
    if truncated:
        raise ConfigError(f"{truncated} documents were truncated (tokenizer.truncation); re-tokenize with "
                          "truncation: false, or with pack: true, to export whole documents")
    return False


def _flat(column: pa.ChunkedArray) -> np.ndarray:
    return column.combine_chunks().flatten().to_numpy(zero_copy_only=False)


def _packed_documents(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A packed shard's documents: their tokens end to end and their lengths (pieces joined)."""
    mask = _flat(table.column("attention_mask")).astype(bool)
    tokens = _flat(table.column("input_ids"))[mask]
    lengths = _flat(table.column("doc_lengths")).astype(np.int64)
    names = _flat(table.column("documents"))
    if not len(lengths):
        return tokens, lengths
    starts = np.r_[True, names[1:] != names[:-1]]  # a piece continuing the previous one's document joins it
    groups = np.cumsum(starts) - 1
    return tokens, np.bincount(groups, weights=lengths).astype(np.int64)


def _row_documents(table: pa.Table, separator: int | None) -> tuple[np.ndarray, np.ndarray]:
    """An unpacked shard's rows as documents, each with the separator appended."""
    ids = table.column("input_ids").combine_chunks()
    values = ids.flatten().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    if separator is None:
        return values, lengths
    ends = np.cumsum(lengths + 1)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=values.dtype)
    is_sep = np.zeros(len(out), dtype=bool)
    is_sep[ends - 1] = True
    out[is_sep], out[~is_sep] = separator, values
    return out, lengths + 1


def document_stream(out_dir: str | Path, separator: str | None = "eos") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per shard in plan order: (tokens, lengths) of its documents, as :func:`export_megatron` writes them."""
    out = output_path(out_dir)
    manifest = load_manifest(out)
    if manifest is None:
        raise ConfigError(f"{out_dir}: no manifest.json (not an embedpipe output)")
    packed = _check_exportable(manifest, out_dir, separator)
    separator_id = None if packed else _separator_id(manifest, separator)
    shards = sorted(manifest["stages"][TOKENS]["shards"].values(), key=lambda s: s["unit"])
    for shard in shards:
        table = read_shard(out / TOKENS / shard["name"])
        yield _packed_documents(table) if packed else _row_documents(table, separator_id)


def _stored_dtype(out: Any, manifest: dict[str, Any]) -> np.dtype:
    names = sorted(manifest["stages"][TOKENS]["shards"].values(), key=lambda s: s["unit"])
    if not names:
        return np.dtype("uint16")
    table = read_shard(out / TOKENS / names[0]["name"])
    return np.dtype(table.schema.field("input_ids").type.value_type.to_pandas_dtype())


def export_megatron(out_dir: str | Path, prefix: str | Path, *, separator: str | None = "eos",
                    force: bool = False) -> ExportResult:
    """Write ``PREFIX.bin`` / ``PREFIX.idx`` from OUT's token stage (see the module docstring).

    Raises:
        ConfigError: OUT cannot be exported as whole documents, PREFIX is not local, or PREFIX.bin / .idx
            exist and ``force`` is not given.
    """
    if "://" in str(prefix) and not str(prefix).startswith("file://"):
        raise ConfigError(f"--output {prefix}: the export is written to a local path (Megatron memory-maps it)")
    prefix = Path(str(prefix).removeprefix("file://"))
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")
    existing = [str(p) for p in (bin_path, idx_path) if p.exists()]
    if existing and not force:
        raise ConfigError(f"--output: {', '.join(existing)} already exist; embedpipe does not replace files it may "
                          "not have written: remove them, choose another prefix, or pass --force")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = output_path(out_dir)
    manifest = load_manifest(out)
    if manifest is None:
        raise ConfigError(f"{out_dir}: no manifest.json (not an embedpipe output)")
    dtype = _stored_dtype(out, manifest)
    documents = empty = 0
    with MegatronWriter(prefix, dtype) as writer:
        for tokens, lengths in document_stream(out_dir, separator):
            keep = lengths > 0
            empty += int(np.count_nonzero(~keep))
            writer.add(tokens, lengths[keep])
            documents += int(np.count_nonzero(keep))
        writer.commit()
    return ExportResult(str(bin_path), str(idx_path), documents, writer.tokens, dtype.name, empty)
