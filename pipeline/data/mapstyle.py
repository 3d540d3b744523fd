"""Map-style dataset: random access to the rows of an output directory, memory-mapped."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from pipeline.data.collate import Collator, collator_for
from pipeline.data.packed import PackedCollator
from pipeline.data.reader import Format, OutputReader, TokenDtype, to_tensor


class ShardDataset(Dataset):
    """Rows of ``tokens/``, ``embeddings/`` or both (joined row for row) of an output directory.

    Shards are memory-mapped, never copied whole: ``ds[i]`` and ``ds.__getitems__(indices)`` (what a
    DataLoader with a batch size calls) copy only the rows asked for, each column of a batch in one
    vectorized gather. Use with ``DataLoader(ds, batch_size=..., collate_fn=ds.collator())`` and any
    sampler (``DistributedSampler`` included) and any number of workers.

    Args:
        out_dir: the output directory (local path; fsspec URLs work but fetch whole shards into memory).
        stages: ``"tokens"``, ``"embeddings"`` or ``"both"``.
        columns: the columns to read (default: all but the string ``id``, which costs Python objects).
        format: ``"torch"`` tensors or ``"numpy"`` arrays (bfloat16 embeddings: uint16 bit patterns).
        token_dtype: ``"int64"`` (what models take) or ``"stored"`` (uint16/int32 ids, int8 masks).
        allow_incomplete: read the committed shards of a stage that is not complete.
        unpack_bits: binary / ubinary embeddings as (D,) uint8 bits 0/1 instead of their packed (D/8,) bytes.
        dequantize: quantized embeddings as approximate float32 (int8 / uint8 through the shard's calibration
            ranges, binary / ubinary bits as -1 / +1); default: as stored (int8 / uint8 values, packed bytes).
    """

    def __init__(self, out_dir: str, stages: str | tuple[str, ...] = "tokens", columns: list[str] | None = None,
                 *, format: Format = "torch", token_dtype: TokenDtype = "int64", allow_incomplete: bool = False,
                 storage_options: dict[str, Any] | None = None, unpack_bits: bool = False,
                 dequantize: bool = False) -> None:
        self.reader = OutputReader(out_dir, stages, columns, format=format, token_dtype=token_dtype,
                                   allow_incomplete=allow_incomplete, storage_options=storage_options,
                                   unpack_bits=unpack_bits, dequantize=dequantize)

    @property
    def columns(self) -> list[str]:
        return list(self.reader.specs)

    def __len__(self) -> int:
        return self.reader.rows

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """The rows at ``indices`` as one batch: a dict of (B, ...) arrays, Ragged rows, or lists of ids."""
        shard, local = self.reader.locate(np.asarray(indices, dtype=np.int64))
        return self.reader.format_batch(self.reader.gather(shard, local))

    def __getitem__(self, index: int | slice) -> dict[str, Any]:
        """One row (a dict of arrays, scalars and the id string), or a slice as a batch."""
        if isinstance(index, slice):
            return self.__getitems__(range(*index.indices(len(self))))
        batch = self.__getitems__([index])
        row = {name: value[0] for name, value in batch.items()}
        if self.reader.format == "torch":  # a Ragged column's row is a numpy slice
            row = {name: to_tensor(v) if isinstance(v, np.ndarray) else v for name, v in row.items()}
        return row

    def collator(self, *, pad_to_multiple_of: int | None = None, trim: bool = False, pad_id: int | None = None,
                 padding_side: str | None = None, flatten: bool = True) -> Collator | PackedCollator:
        """The ``collate_fn`` for this dataset, with its stored padding side and pad id."""
        return collator_for(self.reader, pad_to_multiple_of=pad_to_multiple_of, trim=trim, pad_id=pad_id,
                            padding_side=padding_side, flatten=flatten)

