"""Packing for LM pretraining: a work unit's documents joined and cut into fixed-length blocks (pure numpy).

Each document's tokens (special tokens included when ``add_special_tokens``) are followed by the
separator, in input order, an empty document too; the stream is cut into blocks of exactly
``block`` tokens. A block holds *pieces*: the runs of one document inside it. Position ids restart at
0 at every piece (what ``DataCollatorWithFlattening`` and flash-attention's cumulative lengths
assume), so attention never crosses a document boundary, nor a block boundary inside a document.
The unit's last partial block is right-padded (mask 0) or dropped, its tokens counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

Remainder = Literal["pad", "drop"]


@dataclass
class PackedBlocks:
    """A unit's blocks as flat arrays: ``ids``/``mask``/``positions`` are (blocks * block,), pieces per block."""

    block: int
    ids: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    piece_lengths: np.ndarray  # every piece, in stream order
    piece_docs: np.ndarray  # the document (index into the unit's documents) of each piece
    pieces_per_block: np.ndarray
    document_tokens: int  # the documents' own tokens
    separator_tokens: int
    dropped_tokens: int  # tokens of a dropped remainder
    dropped_documents: int  # documents whose every token was in the dropped remainder

    @property
    def blocks(self) -> int:
        return len(self.pieces_per_block)

    @property
    def tokens(self) -> int:
        """Real (mask 1) tokens in the blocks."""
        return int(self.piece_lengths.sum())


def pack_documents(flat_ids: np.ndarray, lengths: np.ndarray, block: int, separator: int | None,
                   remainder: Remainder, pad_id: int) -> PackedBlocks:
    """Join documents (``flat_ids`` cut by ``lengths``), each followed by ``separator``, and cut into blocks.

    Args:
        flat_ids: every document's tokens end to end, in input order.
        lengths: tokens per document.
        block: the block length (``tokenizer.max_length``).
        separator: the id put after every document, or None for none.
        remainder: ``pad`` the last partial block (mask 0, ``pad_id``) or ``drop`` it.
        pad_id: the id of padding positions.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    docs = len(lengths)
    seg = lengths + (1 if separator is not None else 0)  # each document's run in the stream
    total = int(seg.sum())
    if separator is None:
        stream = flat_ids
    else:
        stream = np.empty(total, dtype=flat_ids.dtype)
        ends = np.cumsum(seg)
        is_sep = np.zeros(total, dtype=bool)
        is_sep[ends - 1] = True
        stream[is_sep] = separator
        stream[~is_sep] = flat_ids
    full, rest = divmod(total, block)
    kept = total if remainder == "pad" else full * block
    blocks = full + (1 if rest and remainder == "pad" else 0)

    # Pieces: cut each document's run at the block edges inside it (the kept tokens only).
    starts = np.concatenate(([0], np.cumsum(seg)[:-1])).astype(np.int64) if docs else np.zeros(0, np.int64)
    stops = np.minimum(starts + seg, kept)
    first_block = starts // block
    last_block = np.maximum(stops - 1, starts) // block
    spans = np.where(stops > starts, last_block - first_block + 1, 0)  # pieces per document
    piece_docs = np.repeat(np.arange(docs, dtype=np.int64), spans)
    within = np.arange(int(spans.sum())) - np.repeat(np.cumsum(spans) - spans, spans)
    piece_block = np.repeat(first_block, spans) + within
    piece_start = np.maximum(np.repeat(starts, spans), piece_block * block)
    piece_stop = np.minimum(np.repeat(stops, spans), (piece_block + 1) * block)
    piece_lengths = piece_stop - piece_start
    pieces_per_block = np.bincount(piece_block, minlength=blocks).astype(np.int64)[:blocks]

    width = blocks * block
    ids = np.full(width, pad_id, dtype=flat_ids.dtype)
    ids[:kept] = stream[:kept]
    mask = np.zeros(width, dtype=np.int8)
    mask[:kept] = 1
    positions = np.zeros(width, dtype=np.int32)
    positions[:kept] = np.arange(kept) - np.repeat(piece_start, piece_lengths)
    in_blocks = np.bincount(piece_docs, minlength=docs) > 0 if docs else np.zeros(0, bool)
    return PackedBlocks(
        block=block, ids=ids, mask=mask, positions=positions, piece_lengths=piece_lengths,
        piece_docs=piece_docs, pieces_per_block=pieces_per_block, document_tokens=int(lengths.sum()),
        separator_tokens=docs if separator is not None else 0, dropped_tokens=total - kept,
        dropped_documents=int(np.count_nonzero(~in_blocks & (seg > 0))),
    )


def block_ids(unit: int, blocks: int) -> list[str]:
    """``"<unit>:<block>"``: stable per block (the plan fixes units; packing fixes the blocks of each)."""
    return [f"{unit}:{b}" for b in range(blocks)]


def packed_schema(id_type: pa.DataType, block: int) -> pa.Schema:
    """The one Arrow schema of packed token shards (DESIGN.md, "Packed token shards")."""
    return pa.schema([
        pa.field("id", pa.string()),
        pa.field("input_ids", pa.list_(id_type, block)),
        pa.field("attention_mask", pa.list_(pa.int8(), block)),
        # int32: positions are below the block length, which a model's position table bounds anyway.
        pa.field("position_ids", pa.list_(pa.int32(), block)),
        pa.field("doc_lengths", pa.list_(pa.int32())),
        pa.field("documents", pa.list_(pa.string())),
    ])


def packed_table(packed: PackedBlocks, unit: int, doc_ids: list[str], id_type: pa.DataType) -> pa.Table:
    """Lay ``packed`` out in :func:`packed_schema` (``doc_ids``: the source id of each of the unit's documents)."""
    block = packed.block
    offsets = pa.array(np.concatenate(([0], np.cumsum(packed.pieces_per_block))).astype(np.int32))
    names = pa.array(doc_ids, type=pa.string()).take(pa.array(packed.piece_docs, type=pa.int64()))
    columns = [
        pa.array(block_ids(unit, packed.blocks), type=pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(packed.ids, type=id_type), block),
        pa.FixedSizeListArray.from_arrays(pa.array(packed.mask, type=pa.int8()), block),
        pa.FixedSizeListArray.from_arrays(pa.array(packed.positions, type=pa.int32()), block),
        pa.ListArray.from_arrays(offsets, pa.array(packed.piece_lengths.astype(np.int32), type=pa.int32())),
        pa.ListArray.from_arrays(offsets, names),
    ]
    return pa.Table.from_arrays(columns, schema=packed_schema(id_type, block))
