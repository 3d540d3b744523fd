"""``verify`` of packed token shards (``tokenizer.pack``): every block, piece and token accounted for.

Per shard: block ids are ``<unit>:<block>`` in order; every block is ``max_length`` wide, its real tokens a
prefix (only a unit's last block may be padded, and only with ``pack_remainder: pad``); ``doc_lengths`` sum to
the block's real tokens, none is 0, and ``documents`` names one source id per piece; position ids count
0, 1, ... within each piece (0 on padding); each document's last piece ends with the separator; the
documents seen (pieces of one document across a block edge joined) are the unit's documents less the
empty and the dropped ones; and document tokens + separator tokens = tokens in blocks + dropped tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.manifest import PACK_COUNT_KEYS


def is_packed(table: pa.Table) -> bool:
    return "doc_lengths" in table.column_names


def _flat(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)


def check_packed_shard(problems: list[str], name: str, table: pa.Table, shard: dict[str, Any],
                       options: dict[str, Any]) -> None:
    """Append to ``problems`` what is wrong in packed shard ``tokens/<name>`` (see the module docstring)."""
    where = f"tokens/{name}"
    rows = table.num_rows
    width = table.schema.field("input_ids").type.list_size
    if options.get("max_length") and width != options["max_length"]:
        problems.append(f"{where}: blocks of {width} tokens, tokenizer.max_length is {options['max_length']}")
    expected_ids = [f"{shard.get('unit')}:{b}" for b in range(rows)]
    if table.column("id").to_pylist() != expected_ids:
        problems.append(f"{where}: block ids are not {shard.get('unit')}:0 .. {shard.get('unit')}:{rows - 1} in order")
    ids = _flat(table, "input_ids").reshape(rows, width)
    mask = _flat(table, "attention_mask").reshape(rows, width).astype(np.int64)
    positions = _flat(table, "position_ids").reshape(rows, width).astype(np.int64)
    real = mask.sum(axis=1)
    if not np.array_equal(mask, (np.arange(width) < real[:, None]).astype(np.int64)):
        problems.append(f"{where}: an attention mask is not its block's real tokens followed by padding")
    padded = np.flatnonzero(real < width)
    if len(padded) and (options.get("pack_remainder") == "drop" or padded.tolist() != [rows - 1]):
        problems.append(f"{where}: blocks {padded[:5].tolist()} are padded; only a unit's last block may be, "
                        "and only with pack_remainder: pad")
    lengths_col = table.column("doc_lengths").combine_chunks()
    piece_lengths = lengths_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    per_block = pc.list_value_length(lengths_col).to_numpy(zero_copy_only=False).astype(np.int64)
    documents = table.column("documents").combine_chunks()
    if not np.array_equal(pc.list_value_length(documents).to_numpy(zero_copy_only=False), per_block):
        problems.append(f"{where}: documents and doc_lengths hold different numbers of pieces")
        return
    sums = np.add.reduceat(piece_lengths, np.r_[0, np.cumsum(per_block)[:-1]]) if len(piece_lengths) else piece_lengths
    sums = np.where(per_block > 0, sums[:rows] if len(sums) else 0, 0)
    bad = np.flatnonzero(sums != real)
    if len(bad) or (piece_lengths <= 0).any():
        problems.append(f"{where}: block {int(bad[0]) if len(bad) else '?'}: doc_lengths do not sum to its "
                        "real tokens (or a piece is empty)")
        return
    # Position ids: 0..n-1 within each piece, laid out block by block; padding 0.
    want = np.zeros((rows, width), dtype=np.int64)
    real_flat = np.flatnonzero(mask.reshape(-1))
    starts = np.repeat(np.cumsum(piece_lengths) - piece_lengths, piece_lengths)
    want.reshape(-1)[real_flat] = np.arange(len(real_flat)) - starts
    if not np.array_equal(positions, want):
        row = int(np.flatnonzero((positions != want).any(axis=1))[0])
        problems.append(f"{where}: block {row}: position_ids do not restart at 0 at each piece")
    names = documents.flatten().to_pylist()
    # A document continues into the next block when the next piece has its id; else this piece ends it.
    ends = [i for i in range(len(names)) if i + 1 == len(names) or names[i + 1] != names[i]]
    separator = shard.get("separator_id")
    if separator is not None and ends:
        last_tokens = ids.reshape(-1)[real_flat][np.cumsum(piece_lengths)[ends] - 1]
        # The unit's very last document may have lost its separator to a dropped remainder.
        check = last_tokens[:-1] if shard.get("dropped_tokens") else last_tokens
        if (check != separator).any():
            problems.append(f"{where}: a document's last piece does not end with the separator {separator}")
    seen = len(ends)
    expected_docs = shard["texts"] - shard.get("empty_documents", 0) - shard.get("dropped_documents", 0)
    if seen != expected_docs:
        problems.append(f"{where}: the blocks hold {seen} documents, the manifest says {expected_docs} "
                        f"({shard['texts']} packed - empty - dropped)")
    tokens = int(real.sum())
    if tokens != shard.get("tokens"):
        problems.append(f"{where}: {tokens} real tokens in the blocks, the manifest recorded {shard.get('tokens')}")
    made = shard.get("document_tokens", 0) + shard.get("separator_tokens", 0)
    if made != tokens + shard.get("dropped_tokens", 0):
        problems.append(f"{where}: {shard.get('document_tokens')} document + {shard.get('separator_tokens')} "
                        f"separator tokens, but {tokens} in blocks + {shard.get('dropped_tokens')} dropped")
    separators = shard["texts"] if options.get("pack_separator") is not None else 0
    if shard.get("separator_tokens") != separators:
        problems.append(f"{where}: {shard.get('separator_tokens')} separator tokens for {shard['texts']} documents")
    if options.get("pack_remainder") != "drop" and shard.get("dropped_tokens"):
        problems.append(f"{where}: {shard['dropped_tokens']} dropped tokens with pack_remainder: pad")
    if shard.get("dropped_tokens", 0) >= width:
        problems.append(f"{where}: {shard['dropped_tokens']} dropped tokens, more than one partial block")


def check_packed_totals(problems: list[str], record: dict[str, Any]) -> None:
    """The tokens stage's totals of the packing counts equal the sums over its shards."""
    shards = record.get("shards", {}).values()
    totals = record.get("totals", {})
    for key in PACK_COUNT_KEYS:
        summed = sum(s.get(key, 0) for s in shards)
        if totals.get(key, 0) != summed:
            problems.append(f"tokens: totals.{key} is {totals.get(key)}, the shards sum to {summed}")
