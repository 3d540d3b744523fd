"""Training dataloaders over an embedpipe output directory (``pipeline.data``).

- :class:`ShardDataset`: map-style, memory-mapped random access (``__getitem__`` and batched
  ``__getitems__``), for a DataLoader with any sampler (``DistributedSampler`` included).
- :class:`StreamingDataset`: an iterable of batches for corpora larger than memory or on object
  storage (fsspec URLs), split across ranks and DataLoader workers, shuffled from a seed and an
  epoch, resumable mid-epoch through ``state_dict()`` / ``load_state_dict()``.
- :class:`Collator`: dynamic padding (or trimming) into ``input_ids`` / ``attention_mask`` /
  ``token_type_ids``, on the stored padding side with the stored pad id.
- :class:`PackedCollator`: for packed blocks (``tokenizer.pack``), padding-free batches with per-document
  ``position_ids``, ``labels`` and flash-attention cumulative lengths (``DataCollatorWithFlattening``'s).

Only shards the manifest lists are read; a stage that is not complete raises :class:`StageIncomplete`
unless ``allow_incomplete=True``.
"""

from pipeline.data.collate import Collator
from pipeline.data.columns import Ragged
from pipeline.data.iterable import ResumableLoader, StreamingDataset
from pipeline.data.layout import DataError, StageIncomplete, committed_shards, read_table
from pipeline.data.mapstyle import ShardDataset
from pipeline.data.packed import PackedCollator

__all__ = [
    "Collator", "DataError", "PackedCollator", "Ragged", "ResumableLoader", "ShardDataset", "StageIncomplete", "StreamingDataset",
    "committed_shards", "read_table",
]
