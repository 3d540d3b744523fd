"""The row order of a streamed epoch, and who reads which part of it. Pure numpy, deterministic.

1. Global order of an epoch, a function of (seed, epoch) alone: the shards are permuted, cut into
   blocks of ``block_shards`` consecutive shards, and the rows of each block are permuted (an exact
   shuffle buffer the size of a block). Without shuffling: shard order, then row order.
2. Ranks: rank r of R reads the contiguous range [r*N//R, (r+1)*N//R) of that order (with
   ``drop_last`` every rank reads N//R rows in whole batches only, so all ranks take the same steps).
   Contiguous ranges mean each rank touches only about 1/R of the shards.
3. Batches: a rank's range is cut into batches of ``batch_size`` rows; the batches are split into
   ``parts`` contiguous groups (one per DataLoader worker, so a worker reads its own shards) and the
   rank's *batch order* interleaves the groups round-robin, which is the order a DataLoader with
   ``parts`` workers hands them to the training loop.
4. Resume: after K batches were consumed, DataLoader worker i of W produces batches
   K+i, K+i+W, ... of the batch order; the loader's round-robin puts them back in order. The order
   therefore needs only (seed, epoch, world size, batch size, parts) and K.
"""

from __future__ import annotations

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


class EpochOrder:
    """The global row order of one epoch: position p -> (shard, row in shard), computed block by block."""

    _CACHED_BLOCKS = 2

    def __init__(self, shard_rows: np.ndarray, seed: int, epoch: int, shuffle: bool, block_shards: int) -> None:
        if seed < 0 or epoch < 0 or block_shards < 1:
            raise ValueError(f"seed and epoch must be >= 0 and block_shards >= 1 (got seed={seed}, epoch={epoch}, "
                             f"block_shards={block_shards})")
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)
        self.key = (seed, epoch)
        self.shuffle = shuffle
        order = _rng(seed, epoch, 0).permutation(len(shard_rows)) if shuffle else np.arange(len(shard_rows))
        self.blocks = [order[i:i + block_shards] for i in range(0, len(order), block_shards)]
        block_rows = [int(self.shard_rows[b].sum()) for b in self.blocks]
        self.block_starts = np.concatenate(([0], np.cumsum(block_rows))).astype(np.int64)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def rows(self) -> int:
        return int(self.block_starts[-1])

    def _block(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of every row of a block, in the epoch's order."""
        if index not in self._cache:
            shards = self.blocks[index]
            rows = self.shard_rows[shards]
            starts = np.concatenate(([0], np.cumsum(rows)[:-1]))
            shard = np.repeat(shards, rows)
            local = np.arange(int(rows.sum())) - np.repeat(starts, rows)
            if self.shuffle:
                perm = _rng(*self.key, 1, index).permutation(len(shard))
                shard, local = shard[perm], local[perm]
            if len(self._cache) >= self._CACHED_BLOCKS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = (shard, local)
        return self._cache[index]

    def rows_at(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row in shard) of the epoch's positions [start, stop)."""
        first = int(np.searchsorted(self.block_starts, start, side="right")) - 1
        shards, locals_ = [], []
        block = first
        while block < len(self.blocks) and self.block_starts[block] < stop:
            begin = self.block_starts[block]
            shard, local = self._block(block)
            piece = slice(max(start - begin, 0), min(stop - begin, len(shard)))
            shards.append(shard[piece])
            locals_.append(local[piece])
            block += 1
        if not shards:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(shards), np.concatenate(locals_)


def rank_range(rows: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of the epoch's positions."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if drop_last:
        per_rank = rows // world_size
        start = rank * per_rank
        return start, start + per_rank // batch_size * batch_size
    return rank * rows // world_size, (rank + 1) * rows // world_size


def interleave(count: int, parts: int) -> np.ndarray:
    """0..count-1 split into ``parts`` contiguous groups, taken round-robin (a group that ends drops out)."""
    groups = np.array_split(np.arange(count), max(1, parts))
    table = np.full((len(groups), len(groups[0]) if groups else 0), -1, dtype=np.int64)
    for row, group in enumerate(groups):
        table[row, :len(group)] = group
    order = table.T.ravel()
    return order[order >= 0]


def rank_batches(rows: int, rank: int, world_size: int, batch_size: int, drop_last: bool,
                 parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Epoch positions [starts[k], stops[k]) of this rank's batches, in the order the consumer gets them."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    start, stop = rank_range(rows, rank, world_size, batch_size, drop_last)
    starts = np.arange(start, stop, batch_size, dtype=np.int64)
    order = interleave(len(starts), parts)
    starts = starts[order]
    return starts, np.minimum(starts + batch_size, stop)
