"""Readers over a packed output, and the packed collator against transformers' DataCollatorWithFlattening.

For a batch of blocks, the pieces (each document's run inside a block, from ``doc_lengths``) fed to
``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` give input_ids, labels, position_ids,
cu_seq_lens_q/k and max_length_q/k: the collator's must be the same values, dtypes and shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pack_verify import BLOCK
from torch.utils.data import DataLoader
from transformers import DataCollatorWithFlattening

from pipeline.data import PackedCollator, ShardDataset, StreamingDataset


@pytest.fixture(scope="module")
def packed(packed_output):
    return packed_output


def _pieces(batch) -> list[dict]:
    """The batch's pieces as DataCollatorWithFlattening's features."""
    features = []
    for ids, mask, lengths in zip(batch["input_ids"], batch["attention_mask"], batch["doc_lengths"]):
        real = np.asarray(ids)[np.asarray(mask).astype(bool)]
        for piece in np.split(real, np.cumsum(np.asarray(lengths))[:-1]):
            features.append({"input_ids": piece.tolist()})
    return features


def _assert_same_as_flattening(got, batch):
    want = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(_pieces(batch))
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    for key in ("max_length_q", "max_length_k"):
        assert got[key] == want[key] and isinstance(got[key], int), key
    assert torch.equal(got["cu_seqlens"], want["cu_seq_lens_q"]) and got["max_seqlen"] == want["max_length_q"]
    assert "attention_mask" not in got  # an HF model would unpad by it per row and attend across pieces


def test_shard_dataset_reads_packed_columns(packed):
    ds = ShardDataset(str(packed))
    assert ds.columns == ["input_ids", "attention_mask", "position_ids", "doc_lengths", "documents"]
    row = ds[3]
    assert row["input_ids"].shape == (BLOCK,) and row["input_ids"].dtype == torch.int64
    assert row["position_ids"].dtype == torch.int64 and int(row["doc_lengths"].sum()) == int(row["attention_mask"].sum())
    assert len(row["documents"]) == len(row["doc_lengths"])


def test_collator_equals_data_collator_with_flattening(packed):
    ds = ShardDataset(str(packed))
    collate = ds.collator()
    assert isinstance(collate, PackedCollator)
    # Rows from several shards, the padded last block of each unit among them.
    picks = [0, 1, 2, len(ds) - 1, 140, 139, 200, 7]
    batch = ds.__getitems__(picks)
    _assert_same_as_flattening(collate(batch), batch)
    loader = DataLoader(ds, batch_size=5, collate_fn=collate)
    for got, start in zip(loader, range(0, len(ds), 5)):
        _assert_same_as_flattening(got, ds.__getitems__(list(range(start, min(start + 5, len(ds))))))
    rows = [ds[i] for i in picks]  # a list of rows (a DataLoader without __getitems__) collates the same
    _assert_same_as_flattening(collate(rows), batch)


def test_streaming_dataset_batches_collate_the_same(packed):
    ds = StreamingDataset(str(packed), batch_size=6, seed=3)
    collate = ds.collator()
    seen = 0
    for batch in ds:
        _assert_same_as_flattening(collate(batch), batch)
        seen += len(batch["input_ids"])
    assert seen == len(ShardDataset(str(packed)))


def test_unflattened_blocks_keep_padding_as_its_own_segment(packed):
    ds = ShardDataset(str(packed))
    real = ds[:len(ds)]["attention_mask"].sum(dim=1)
    padded = int(torch.nonzero(real < BLOCK)[0])  # the padded last block of a unit
    batch = ds.__getitems__([0, padded])
    got = ds.collator(flatten=False)(batch)
    mask = batch["attention_mask"].bool()
    assert got["input_ids"].shape == (2, BLOCK) and torch.equal(got["attention_mask"], batch["attention_mask"])
    assert torch.equal(got["position_ids"], batch["position_ids"])
    flat = ds.collator()(batch)
    assert torch.equal(got["labels"][mask], flat["labels"][0]) and (got["labels"][~mask] == -100).all()
    padding = BLOCK - int(mask[1].sum())
    assert padding > 0
    want = flat["cu_seq_lens_q"].tolist()
    pieces0 = len(batch["doc_lengths"][0])
    # Block 0's pieces, then block 1's, then block 1's padding: cu_seqlens covers all 2 * BLOCK positions.
    assert got["cu_seqlens"].tolist() == want + [2 * BLOCK] and got["cu_seqlens"].dtype == torch.int32
    assert got["cu_seqlens"][pieces0] == BLOCK


def test_pieces_from_position_ids_when_doc_lengths_are_not_read(packed):
    ds = ShardDataset(str(packed), columns=["input_ids", "attention_mask", "position_ids"])
    batch = ds.__getitems__([0, 5, len(ds) - 1])
    full = ShardDataset(str(packed)).__getitems__([0, 5, len(ds) - 1])
    got = PackedCollator()(batch)
    _assert_same_as_flattening(got, full)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_decoder_on_the_flat_batch_attends_within_each_document_piece(packed, attention):
    """A tiny GPT-2 (random weights) on a flattened batch gives, piece by piece, the logits of that piece run
    alone: HF reads the piece boundaries from the restarting position_ids (no attention_mask, no cache)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ds = ShardDataset(str(packed))
    batch = ds.collator()(ds.__getitems__([0, 1, 2]))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=4096, n_positions=512, bos_token_id=0,
                        eos_token_id=0)
    config._attn_implementation = attention
    model = GPT2LMHeadModel(config).eval()
    cu = batch["cu_seqlens"].tolist()
    assert len(cu) > 4  # pieces of several documents
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=batch["input_ids"][:, s:e], use_cache=False).logits[0]
                           for s, e in zip(cu[:-1], cu[1:])])
    assert torch.allclose(flat, alone, atol=1e-5)
