"""Iterable dataset: a shuffled, distributed, resumable stream of batches over the shards.

It yields whole batches (gathered in one vectorized step per column, no per-row Python objects), so
a DataLoader over it takes ``batch_size=None``: :meth:`StreamingDataset.loader` builds that
DataLoader, with the dataset's collator, and counts the batches handed to the training loop. The
order, the split across ranks and workers and the resume rule are in :mod:`pipeline.data.order`.

    ds = StreamingDataset("out/job", batch_size=256, seed=0)          # rank/world from torch.distributed
    loader = ds.loader(num_workers=2)
    loader.load_state_dict(saved)                                     # optional: resume
    for epoch in range(loader.state_dict()["epoch"], epochs):
        ds.set_epoch(epoch)                                           # a resumed epoch keeps its place
        for batch in loader:
            ...; saved = loader.state_dict()                          # at a checkpoint
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.collate import Collator, collator_for
from pipeline.data.order import EpochOrder, rank_batches
from pipeline.data.packed import PackedCollator
from pipeline.data.reader import Format, OutputReader, TokenDtype

# DataLoader arguments a resumable stream cannot do without (in_order exists from torch 2.6; before, always in order).
_LOADER_FIXED = {"batch_size": None, "persistent_workers": False}
if "in_order" in inspect.signature(DataLoader.__init__).parameters:
    _LOADER_FIXED["in_order"] = True
# What fixes the order of an epoch besides the epoch itself; a state from another setup is refused.
_ORDER_KEYS = ("seed", "shuffle", "block_shards", "batch_size", "world_size", "rank", "drop_last", "rows", "shards")


class StreamingDataset(IterableDataset):
    """Batches of ``tokens/``, ``embeddings/`` or both, streamed shard block by shard block.

    Args:
        out_dir: the output directory: a local path (memory-mapped) or an fsspec URL (shards fetched whole).
        stages, columns, format, token_dtype, allow_incomplete, unpack_bits, dequantize: as for
            :class:`ShardDataset`.
        batch_size: rows per batch (the last batch of a rank may be smaller unless ``drop_last``).
        shuffle: shuffle shard order and the rows within each block of ``block_shards`` shards.
        seed: with the epoch, fixes the order (the same on every rank and every run).
        block_shards: shards mixed together by the in-block shuffle (a worker holds at most two blocks open).
        drop_last: every rank gets the same number of full batches (DDP needs equal steps); the remainder
            of the epoch is skipped.
        rank, world_size: default from ``torch.distributed`` when it is initialized, else 0 and 1.
        storage_options: passed to fsspec for URLs.
    """

    def __init__(self, out_dir: str, stages: str | tuple[str, ...] = "tokens", columns: list[str] | None = None,
                 *, batch_size: int, shuffle: bool = True, seed: int = 0, block_shards: int = 1,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None,
                 format: Format = "torch", token_dtype: TokenDtype = "int64", allow_incomplete: bool = False,
                 storage_options: dict[str, Any] | None = None, unpack_bits: bool = False,
                 dequantize: bool = False) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        # A block being read and the next one a batch may reach into: both stay open, nothing else.
        self.reader = OutputReader(out_dir, stages, columns, format=format, token_dtype=token_dtype,
                                   allow_incomplete=allow_incomplete, storage_options=storage_options,
                                   unpack_bits=unpack_bits, dequantize=dequantize,
                                   max_open_shards=2 * block_shards)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.block_shards, self.drop_last = block_shards, drop_last
        # Check the numbers now rather than in the first worker.
        EpochOrder(self.reader.shard_rows, seed, 0, shuffle, block_shards)
        rank_batches(self.reader.rows, self.rank, self.world_size, batch_size, drop_last, 1)
        self._epoch = 0
        self._parts = 1  # batch groups of the current epoch (the DataLoader workers when it started)
        self._start = 0  # batches of the epoch skipped by the current iteration (resume)
        self._consumed = 0  # batches of the epoch handed to the consumer so far
        self._resume: dict[str, int] | None = None

    # ---------------------------------------------------------------- order

    def _batches(self) -> tuple[np.ndarray, np.ndarray]:
        return rank_batches(self.reader.rows, self.rank, self.world_size, self.batch_size, self.drop_last,
                            self._parts)

    def __len__(self) -> int:
        """Batches this rank gets in a whole epoch."""
        return len(self._batches()[0])

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless a loaded state resumes exactly this epoch."""
        if self._resume is not None and epoch == self._epoch:
            return
        self._epoch, self._resume, self._consumed = epoch, None, 0

    def _begin(self, parts: int) -> None:
        """Fix where the next iteration starts; called in the consumer's process before workers start."""
        if self._resume is not None:
            self._parts, self._start = self._resume["parts"], self._resume["batches"]
            self._resume = None
        else:
            self._parts, self._start = max(1, parts), 0
        self._consumed = self._start

    # ---------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:  # no DataLoader workers: this process is the consumer and counts what it yields
            self._begin(parts=1)
            return self._counted(self._produce(0, 1))
        return self._produce(info.id, info.num_workers)

    def _counted(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            self._consumed += 1
            yield batch

    def _produce(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Batches start+worker, start+worker+num_workers, ... of this rank's batch order."""
        order = EpochOrder(self.reader.shard_rows, self.seed, self._epoch, self.shuffle, self.block_shards)
        starts, stops = self._batches()
        for k in range(self._start + worker, len(starts), num_workers):
            shard, local = order.rows_at(int(starts[k]), int(stops[k]))
            yield self.reader.format_batch(self.reader.gather(shard, local))

    # ---------------------------------------------------------------- state

    def _order_key(self) -> dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "block_shards": self.block_shards,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "drop_last": self.drop_last, "rows": self.reader.rows, "shards": len(self.reader.shard_rows)}

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is: epoch, batches (and rows) of it consumed, and what fixes the order."""
        parts = self._resume["parts"] if self._resume else self._parts
        batches = self._resume["batches"] if self._resume else self._consumed
        starts, stops = self._batches() if parts == self._parts else rank_batches(
            self.reader.rows, self.rank, self.world_size, self.batch_size, self.drop_last, parts)
        rows = int((stops[:batches] - starts[:batches]).sum())
        return {"epoch": self._epoch, "batches": batches, "rows_consumed": rows, "parts": parts,
                **self._order_key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of ``state['epoch']`` yields the rest of it, in the same order.

        Raises:
            ValueError: the state was saved with another seed, batch size, world size, rank or data.
        """
        mine = self._order_key()
        differ = [f"{k} ({state.get(k)!r} saved, {mine[k]!r} now)" for k in _ORDER_KEYS if state.get(k) != mine[k]]
        if differ:
            raise ValueError("cannot resume this stream from the state given, it differs in: " + ", ".join(differ))
        self._epoch = int(state["epoch"])
        self._resume = {"batches": int(state["batches"]), "parts": int(state["parts"])}
        self._consumed = self._resume["batches"]

    # ---------------------------------------------------------------- loading

    def collator(self, *, pad_to_multiple_of: int | None = None, trim: bool = False, pad_id: int | None = None,
                 padding_side: str | None = None, flatten: bool = True) -> Collator | PackedCollator:
        """The ``collate_fn`` for these batches (dynamic padding, trimming), with the stored padding."""
        return collator_for(self.reader, pad_to_multiple_of=pad_to_multiple_of, trim=trim, pad_id=pad_id,
                            padding_side=padding_side, flatten=flatten)

    def loader(self, num_workers: int = 0, collate_fn: Any = None, **kwargs: Any) -> ResumableLoader:
        """A DataLoader over this stream (``batch_size=None``), collating with :meth:`collator` by default."""
        return ResumableLoader(self, num_workers=num_workers, collate_fn=collate_fn or self.collator(), **kwargs)


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`StreamingDataset` that counts the batches the training loop received.

    The count is kept here, in the consumer's process, because with workers the batches are made in
    other processes; ``state_dict()`` is therefore exactly what the loop has seen, whatever the
    workers had already prefetched.
    """

    def __init__(self, dataset: StreamingDataset, **kwargs: Any) -> None:
        for key, value in _LOADER_FIXED.items():
            if kwargs.get(key, value) != value:
                # Persistent workers would keep the epoch and start of their first iteration.
                raise ValueError(f"{key}={kwargs[key]!r}: a resumable stream needs {key}={value!r}")
            kwargs[key] = value
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:  # the dataset runs in this process and counts itself
            yield from super().__iter__()
            return
        self.dataset._begin(parts=self.num_workers)  # before the workers start: they copy the dataset
        for batch in super().__iter__():
            self.dataset._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
