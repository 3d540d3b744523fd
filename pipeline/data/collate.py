"""Collate: what the datasets return (a gathered batch, or a list of rows) into the tensors a model takes.

- Rows of different lengths (``padding: none`` shards, or ``longest`` shards padded per shard) are
  padded per batch to the batch's longest real row, optionally rounded up to a multiple, on the
  stored padding side with the stored pad id: the ``input_ids``, ``attention_mask`` and
  ``token_type_ids`` that ``tokenizer(texts, padding=True)`` or ``tokenizer.pad`` would give.
- Fixed-width rows are stacked (a gathered batch is already stacked: nothing to do); with ``trim``
  a ``max_length`` batch is cut down to its longest real row, keeping the right-hand columns when
  the padding is on the left. Per-token embeddings of the same width are cut with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pipeline.data.batch import Batch
from pipeline.data.columns import Ragged, segment_indices
from pipeline.data.layout import DataError
from pipeline.data.packed import PackedCollator
from pipeline.data.padding import token_padding
from pipeline.data.reader import Format, OutputReader, to_tensor
from pipeline.tokenize.core import pad_flat

POSITION_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Collator:
    """A DataLoader ``collate_fn`` for embedpipe batches (get one from ``dataset.collator()``).

    Args:
        pad_id: the id padding ``input_ids``; needed only when rows of different lengths are padded.
        padding_side: ``right`` or ``left``, as the dataset was tokenized.
        pad_to_multiple_of: round the padded (or trimmed) width up to a multiple of this.
        trim: cut fixed-width batches down to their longest real row.
        format: ``torch`` tensors or ``numpy`` arrays.
    """

    pad_id: int | None = None
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None
    trim: bool = False
    format: Format = "torch"

    def __call__(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Batch:
        columns = dict(batch) if isinstance(batch, Mapping) else stack_rows(batch)
        if isinstance(columns.get("input_ids"), Ragged):
            columns = self._pad(columns)
        elif self.trim and "input_ids" in columns:
            columns = self._trim(columns)
        return Batch({name: self._convert(value) for name, value in columns.items()})

    def _width(self, longest: int, cap: int | None = None) -> int:
        multiple = self.pad_to_multiple_of
        width = -(-longest // multiple) * multiple if multiple else longest
        return min(width, cap) if cap is not None else width

    def _pad(self, columns: dict[str, Any]) -> dict[str, Any]:
        ids: Ragged = columns["input_ids"]
        real = _real_lengths(ids, columns.get("attention_mask"), columns.get("length"))
        width = self._width(int(real.max()) if len(real) else 0)
        if self.pad_id is None and (real < width).any():
            raise DataError("cannot pad input_ids: the pad id is unknown; pass pad_id= to the collator")
        widths = np.full(len(real), width, dtype=np.int64)
        out = dict(columns)
        stripped = self._strip(ids, real)
        out["input_ids"] = self._pad_rows(stripped, real, widths, self.pad_id or 0)
        mask_dtype = columns["attention_mask"].values.dtype if "attention_mask" in columns else ids.values.dtype
        out["attention_mask"] = self._pad_rows(np.ones(int(real.sum()), dtype=mask_dtype), real, widths, 0)
        if isinstance(columns.get("token_type_ids"), Ragged):
            out["token_type_ids"] = self._pad_rows(self._strip(columns["token_type_ids"], real), real, widths, 0)
        return out

    def _strip(self, rows: Ragged, real: np.ndarray) -> np.ndarray:
        """The real tokens of each row end to end (rows of ``longest`` shards carry their shard's padding)."""
        if np.array_equal(rows.lengths, real):
            return rows.values
        skip = rows.lengths - real if self.padding_side == "left" else 0
        return rows.values[segment_indices(rows.offsets[:-1] + skip, real)]

    def _pad_rows(self, flat: np.ndarray, lengths: np.ndarray, widths: np.ndarray, value: int) -> np.ndarray:
        padded = pad_flat(flat, lengths, widths, value, self.padding_side)
        return padded.reshape(len(lengths), int(widths[0]) if len(widths) else 0)

    def _trim(self, columns: dict[str, Any]) -> dict[str, Any]:
        stored_width = columns["input_ids"].shape[1]
        if "length" in columns:
            real = _as_numpy(columns["length"])
        elif "attention_mask" in columns:
            real = _as_numpy(columns["attention_mask"]).sum(axis=1)
        else:
            raise DataError("trim needs the attention_mask or length column; add it to the dataset's columns")
        width = self._width(int(real.max()) if len(real) else 0, stored_width)
        if width >= stored_width:
            return columns
        keep = slice(stored_width - width, None) if self.padding_side == "left" else slice(0, width)
        out = dict(columns)
        for name, value in columns.items():
            per_position = name in POSITION_COLUMNS or (name == "embedding" and value.ndim == 3)
            if per_position and value.shape[1] == stored_width:
                cut = value[:, keep]
                out[name] = cut.contiguous() if isinstance(cut, torch.Tensor) else np.ascontiguousarray(cut)
        return out

    def _convert(self, value: Any) -> Any:
        if self.format == "torch" and isinstance(value, np.ndarray):
            return to_tensor(value)
        if self.format == "numpy" and isinstance(value, torch.Tensor) and value.dtype != torch.bfloat16:
            return value.numpy()
        return value


def _as_numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _real_lengths(ids: Ragged, mask: Ragged | None, length: Any) -> np.ndarray:
    """Real tokens per row: from the mask, else the ``length`` column, else the row widths."""
    if isinstance(mask, Ragged):
        sums = np.concatenate(([0], np.cumsum(mask.values, dtype=np.int64)))
        return sums[mask.offsets[1:]] - sums[mask.offsets[:-1]]
    if length is not None:
        return _as_numpy(length).astype(np.int64)
    return ids.lengths


def stack_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A list of row dicts as one dict of columns: stacked when every row has one shape, else Ragged."""
    if not rows:
        raise DataError("cannot collate an empty batch")
    columns: dict[str, Any] = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        first = values[0]
        if isinstance(first, str):
            columns[name] = values
        elif isinstance(first, torch.Tensor) and all(v.shape == first.shape for v in values):
            columns[name] = torch.stack(values)
        elif isinstance(first, torch.Tensor):
            columns[name] = Ragged.from_rows([v.numpy() for v in values])
        else:
            arrays = [np.asarray(v) for v in values]
            same = all(a.shape == arrays[0].shape for a in arrays)
            columns[name] = np.stack(arrays) if same else Ragged.from_rows(arrays)
    return columns


def collator_for(reader: OutputReader, *, pad_to_multiple_of: int | None = None, trim: bool = False,
                 pad_id: int | None = None, padding_side: str | None = None,
                 flatten: bool = True) -> Collator | PackedCollator:
    """A Collator for ``reader``'s columns; looks up only the padding facts its batches need.

    Packed token shards (``tokenizer.pack``) get a :class:`~pipeline.data.packed.PackedCollator` instead
    (``flatten``: padding-free (1, T) batches, or the (B, L) blocks).
    """
    if "tokens" in reader.output.stages and reader.output.manifest.get("config", {}).get("tokenizer", {}).get("pack"):
        return PackedCollator(flatten=flatten, format=reader.format)
    ragged = any(spec.kind == "ragged" for spec in reader.specs.values())
    need_side = (ragged or trim) and padding_side is None
    need_pad = ragged and pad_id is None
    found = token_padding(reader, need_side, need_pad) if need_side or need_pad else None
    side = padding_side or (found.side if found else None) or "right"
    return Collator(pad_id=pad_id if pad_id is not None else (found.pad_id if found else None), padding_side=side,
                    pad_to_multiple_of=pad_to_multiple_of, trim=trim, format=reader.format)
