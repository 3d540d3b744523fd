"""Collate packed blocks (``tokenizer.pack``) for padding-free LM training with per-document attention.

A block holds pieces of documents (``doc_lengths``); attention must stay within a piece. With
``flatten=True`` (the default) the real tokens of the batch become one row, as
``transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives for the same pieces:
``input_ids``, ``labels`` (-100 at the first token of every piece) and ``position_ids`` of shape (1, T),
int64; ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32, pieces + 1) and ``max_length_q`` / ``max_length_k``
(int), the names HF models' flash-attention path reads; and ``cu_seqlens`` / ``max_seqlen``, the same
values under flash-attn's ``flash_attn_varlen_func`` names. There is no ``attention_mask`` then, on
purpose: an HF model given one unpads by it per row and would attend across the pieces.

With ``flatten=False`` the (B, L) layout is kept: ``input_ids``, ``attention_mask``, ``position_ids`` and
``labels`` (-100 at piece starts and on padding), and ``cu_seqlens`` over the B * L flattened positions,
where each row's padding is a segment of its own (attends only to itself, no loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.batch import Batch
from pipeline.data.columns import Ragged
from pipeline.data.layout import DataError
from pipeline.data.reader import Format, to_tensor

IGNORE_INDEX = -100  # what torch's cross-entropy and HF models skip


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _rows_of(value: Any) -> list[np.ndarray]:
    """A per-row list column (Ragged, a stacked array, or a list of rows) as one array per row."""
    if isinstance(value, Ragged):
        return value.to_list()
    if isinstance(value, (np.ndarray, torch.Tensor)) and _numpy(value).ndim == 2:
        return list(_numpy(value))
    return [_numpy(v) for v in value]


def piece_lengths(columns: Mapping[str, Any], real: np.ndarray) -> list[np.ndarray]:
    """Per block, the lengths of its pieces: ``doc_lengths``, else found where ``position_ids`` restart at 0."""
    if "doc_lengths" in columns:
        return [row.astype(np.int64) for row in _rows_of(columns["doc_lengths"])]
    if "position_ids" not in columns:
        raise DataError("a packed batch needs doc_lengths or position_ids to know its pieces; add one to the "
                        "dataset's columns")
    positions = _numpy(columns["position_ids"])
    found = []
    for row, n in zip(positions, real):
        starts = np.flatnonzero(row[:n] == 0)
        found.append(np.diff(np.r_[starts, n]).astype(np.int64))
    return found


def stack_batch(batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A gathered batch as it is, or a list of rows as columns (rows of pieces kept as lists)."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if not batch:
        raise DataError("cannot collate an empty batch")
    return {name: [row[name] for row in batch] for name in batch[0]}


@dataclass(frozen=True)
class PackedCollator:
    """A DataLoader ``collate_fn`` for packed blocks (get one from ``dataset.collator()``); see the module docstring.

    Args:
        flatten: one (1, T) row of the real tokens (padding-free), or the (B, L) blocks as stored.
        format: ``torch`` tensors or ``numpy`` arrays.
    """

    flatten: bool = True
    format: Format = "torch"

    def __call__(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Batch:
        columns = stack_batch(batch)
        ids = np.stack(_rows_of(columns["input_ids"])).astype(np.int64)
        if "attention_mask" in columns:
            mask = np.stack(_rows_of(columns["attention_mask"])).astype(bool)
            real = mask.sum(axis=1)
        else:
            real = None
        pieces = piece_lengths(columns, real if real is not None else np.full(len(ids), ids.shape[1]))
        if real is None:
            real = np.array([int(p.sum()) for p in pieces])
            mask = np.arange(ids.shape[1]) < real[:, None]
        if any(int(p.sum()) != n for p, n in zip(pieces, real)):
            raise DataError("doc_lengths do not sum to the blocks' real tokens (run embedpipe verify on the output)")
        lengths = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        out = self._flat(ids[mask], lengths) if self.flatten else self._blocks(ids, mask, pieces)
        return Batch({name: self._convert(value) for name, value in out.items()})

    @staticmethod
    def _flat(tokens: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
        starts = np.cumsum(lengths) - lengths
        labels = tokens.copy()
        labels[starts[lengths > 0]] = IGNORE_INDEX
        positions = np.arange(len(tokens), dtype=np.int64) - np.repeat(starts, lengths)
        cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        longest = int(lengths.max()) if len(lengths) else 0
        return {"input_ids": tokens[None], "labels": labels[None], "position_ids": positions[None],
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.copy(), "max_length_q": longest, "max_length_k": longest,
                "cu_seqlens": cu.copy(), "max_seqlen": longest}

    @staticmethod
    def _blocks(ids: np.ndarray, mask: np.ndarray, pieces: list[np.ndarray]) -> dict[str, Any]:
        width = ids.shape[1]
        segments, positions = [], np.zeros_like(ids)
        labels = np.where(mask, ids, IGNORE_INDEX)
        for r, row_pieces in enumerate(pieces):
            starts = np.cumsum(row_pieces) - row_pieces
            labels[r, starts] = IGNORE_INDEX
            n = int(row_pieces.sum())
            positions[r, :n] = np.arange(n) - np.repeat(starts, row_pieces)
            segments.extend(row_pieces.tolist() + ([width - n] if n < width else []))
        segments = np.asarray(segments, dtype=np.int64)
        cu = np.concatenate(([0], np.cumsum(segments))).astype(np.int32)
        return {"input_ids": ids, "attention_mask": mask.astype(np.int64), "position_ids": positions,
                "labels": labels, "cu_seqlens": cu, "max_seqlen": int(segments.max()) if len(segments) else 0}

    def _convert(self, value: Any) -> Any:
        if self.format == "torch" and isinstance(value, np.ndarray):
            return to_tensor(np.ascontiguousarray(value))
        return value
