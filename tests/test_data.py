"""Training dataloaders (pipeline.data) over real output directories made by run_job on the session's Ray.

The fixtures are small (200 rows of the sample corpus, 25 rows a shard) and made once per module:
the real MiniLM tokenizer and encoder at max_length 64 (fixed width, and unpadded), a GPT-2 style
left-padded tokenizer, and a tiny CLIP text encoder writing bfloat16 per-token states.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pytest
import torch
from tiny_models import build_tiny_clip_text
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.config import validate_config
from pipeline.data import (
    Ragged,
    ShardDataset,
    StageIncomplete,
    StreamingDataset,
    committed_shards,
    read_table,
)
from pipeline.data.batch import INLINE_BYTES, Batch
from pipeline.output.shards import read_shard
from pipeline.run.driver import run_job

REPO = Path(__file__).resolve().parent.parent
ROWS, SHARD_ROWS, MAX_LENGTH = 200, 25, 64
SAMPLE = REPO / "pipeline" / "sample_data" / "corpus.jsonl"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The first ROWS rows of the sample corpus (27 languages), and their texts by id."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:ROWS]
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, {row["id"]: row["text"] for row in map(json.loads, lines)}


def _run(corpus_path: Path, out: Path, tokenizer: dict, encoder: dict | None = None) -> Path:
    stages = ("tokens", "embeddings") if encoder else ("tokens",)
    run_job(validate_config({
        "input": {"path": str(corpus_path), "id_column": "id"},
        "output": {"path": str(out), "shard_rows": SHARD_ROWS},
        "tokenizer": {"max_length": MAX_LENGTH, **tokenizer},
        "encoder": {"model": "minilm", "pooling": "mean", "normalize": True, **(encoder or {})},
    }), stages=stages)
    return out


@pytest.fixture(scope="module")
def fixed_out(ray_cluster, corpus, tmp_path_factory) -> Path:
    """MiniLM tokens padded to max_length (right), and pooled float32 embeddings."""
    return _run(corpus[0], tmp_path_factory.mktemp("fixed"), {"name": "minilm"}, {"model": "minilm"})


@pytest.fixture(scope="module")
def ragged_out(ray_cluster, corpus, tmp_path_factory) -> Path:
    """MiniLM tokens without padding (right-padding tokenizer, token type ids)."""
    return _run(corpus[0], tmp_path_factory.mktemp("ragged"), {"name": "minilm", "padding": "none"})


def _gpt2_style(bpe_dir: str, padding: str) -> dict:
    return {"name": bpe_dir, "padding": padding, "padding_side": "left", "pad_token": "<|endoftext|>"}


@pytest.fixture(scope="module")
def left_out(ray_cluster, corpus, bpe_dir, tmp_path_factory) -> Path:
    """GPT-2 style tokens without padding; the job pads on the left with end-of-text."""
    return _run(corpus[0], tmp_path_factory.mktemp("left"), _gpt2_style(bpe_dir, "none"))


@pytest.fixture(scope="module")
def left_fixed_out(ray_cluster, corpus, bpe_dir, tmp_path_factory) -> Path:
    """GPT-2 style tokens left-padded to max_length."""
    return _run(corpus[0], tmp_path_factory.mktemp("leftfixed"), _gpt2_style(bpe_dir, "max_length"))


@pytest.fixture(scope="module")
def bf16_out(ray_cluster, corpus, tmp_path_factory) -> Path:
    """A tiny CLIP text encoder's per-token states (pooling none), stored as bfloat16."""
    base = tmp_path_factory.mktemp("clip")
    clip = str(build_tiny_clip_text(base / "clip"))
    return _run(corpus[0], base / "out", {"name": clip, "max_length": 16},
                {"model": clip, "pooling": "none", "normalize": False, "output_dtype": "bfloat16"})


def _shards(out: Path, stage: str) -> list:
    return [read_shard(Path(p)) for p in committed_shards(str(out), stage)]


def _reference(out: Path, stage: str, column: str) -> dict[str, np.ndarray]:
    """Every row's stored value of ``column`` by id, read with plain pyarrow."""
    rows = {}
    for table in _shards(out, stage):
        values = table.column(column).to_pylist()
        rows.update(zip(table.column("id").to_pylist(), map(np.asarray, values)))
    return rows


def _stream_ids(ds: StreamingDataset, num_workers: int) -> list[str]:
    return [i for batch in ds.loader(num_workers=num_workers) for i in batch["id"]]


# ------------------------------------------------------------------ map-style


def test_map_dataset_rows_equal_the_stored_rows(fixed_out):
    ds = ShardDataset(str(fixed_out), columns=["id", "input_ids", "attention_mask", "token_type_ids", "length"])
    assert len(ds) == ROWS
    ids = [i for t in _shards(fixed_out, "tokens") for i in t.column("id").to_pylist()]
    want = _reference(fixed_out, "tokens", "input_ids")
    perm = np.random.default_rng(0).permutation(ROWS)
    batch = ds.__getitems__(perm.tolist())
    assert batch["id"] == [ids[i] for i in perm]
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (ROWS, MAX_LENGTH)
    assert np.array_equal(batch["input_ids"].numpy(), np.stack([want[ids[i]] for i in perm]))
    assert torch.equal(batch["attention_mask"].sum(1), batch["length"])
    row = ds[-1]
    assert row["id"] == ids[-1] and np.array_equal(row["input_ids"].numpy(), want[ids[-1]])
    assert torch.equal(ds[10:20]["input_ids"], ds.__getitems__(range(10, 20))["input_ids"])
    with pytest.raises(IndexError):
        ds[ROWS]
    stored = ShardDataset(str(fixed_out), columns=["input_ids", "attention_mask"], token_dtype="stored")[:4]
    assert stored["input_ids"].dtype == torch.uint16 and stored["attention_mask"].dtype == torch.int8
    as_numpy = ShardDataset(str(fixed_out), format="numpy")[:4]
    assert isinstance(as_numpy["input_ids"], np.ndarray) and as_numpy["input_ids"].dtype == np.int64
    assert ShardDataset(str(fixed_out)).columns == ["input_ids", "token_type_ids", "attention_mask", "length"]


def test_map_dataset_with_distributed_sampler_and_workers(fixed_out):
    ds = ShardDataset(str(fixed_out), columns=["id", "input_ids"])
    want = _reference(fixed_out, "tokens", "input_ids")
    seen = Counter()
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2, collate_fn=ds.collator())
        for batch in loader:
            seen.update(batch["id"])
            assert batch["input_ids"].dtype == torch.int64
            assert np.array_equal(batch["input_ids"].numpy(), np.stack([want[i] for i in batch["id"]]))
    assert set(seen) == set(want) and set(seen.values()) == {1}


def test_joined_rows_match_by_id(fixed_out):
    tokens = _reference(fixed_out, "tokens", "input_ids")
    vectors = _reference(fixed_out, "embeddings", "embedding")
    ds = ShardDataset(str(fixed_out), "both", columns=["id", "input_ids", "embedding"])
    batch = ds.__getitems__(np.random.default_rng(1).permutation(ROWS).tolist())
    assert batch["embedding"].shape == (ROWS, 384) and batch["embedding"].dtype == torch.float32
    for row, row_id in enumerate(batch["id"]):
        assert np.array_equal(batch["input_ids"][row].numpy(), tokens[row_id])
        assert np.array_equal(batch["embedding"][row].numpy(), vectors[row_id].astype(np.float32))
    stream = StreamingDataset(str(fixed_out), "both", columns=["id", "input_ids", "embedding"], batch_size=32, seed=2)
    for batch in stream.loader(num_workers=2):
        assert np.array_equal(batch["embedding"].numpy(), np.stack([vectors[i] for i in batch["id"]]))
        assert np.array_equal(batch["input_ids"].numpy(), np.stack([tokens[i] for i in batch["id"]]))
    only_vectors = ShardDataset(str(fixed_out), "embeddings")
    assert only_vectors.columns == ["embedding"] and only_vectors[:3]["embedding"].shape == (3, 384)


def test_bfloat16_per_token_states_are_a_view(bf16_out):
    ds = ShardDataset(str(bf16_out), "embeddings", columns=["embedding"])
    states = ds[:]["embedding"]
    assert states.dtype == torch.bfloat16 and states.shape == (ROWS, 16, 32)
    stored = np.concatenate([t.column("embedding").combine_chunks().flatten().flatten().to_numpy()
                             for t in _shards(bf16_out, "embeddings")])
    assert np.array_equal(states.view(torch.int16).numpy().reshape(-1).view(np.uint16), stored)
    bits = ShardDataset(str(bf16_out), "embeddings", columns=["embedding"], format="numpy")[:]["embedding"]
    assert bits.dtype == np.uint16 and np.array_equal(bits.reshape(-1), stored)
    joined = StreamingDataset(str(bf16_out), "both", columns=["input_ids", "attention_mask", "embedding"],
                              batch_size=8, seed=0)
    batch = next(iter(joined.loader(collate_fn=joined.collator(trim=True))))
    width = batch["input_ids"].shape[1]
    assert batch["embedding"].shape == (8, width, 32) and batch["embedding"].dtype == torch.bfloat16


# ------------------------------------------------------------------ streaming


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_stream_yields_every_row_once_on_any_ranks_and_workers(fixed_out, num_workers):
    all_ids = set(_reference(fixed_out, "tokens", "length"))
    for world_size in (1, 2, 4):
        seen = Counter()
        for rank in range(world_size):
            ds = StreamingDataset(str(fixed_out), columns=["id"], batch_size=16, seed=3, rank=rank,
                                  world_size=world_size)
            ids = _stream_ids(ds, num_workers)
            assert len(ids) == ROWS // world_size and ds.state_dict()["rows_consumed"] == len(ids)
            seen.update(ids)
        assert set(seen) == all_ids and set(seen.values()) == {1}, (world_size, num_workers)


def test_stream_drop_last_gives_every_rank_the_same_full_batches(fixed_out):
    counts = []
    for rank in range(3):
        ds = StreamingDataset(str(fixed_out), columns=["id"], batch_size=16, drop_last=True, rank=rank, world_size=3)
        sizes = [len(b["id"]) for b in ds.loader(num_workers=2)]
        assert set(sizes) == {16} and len(sizes) == len(ds)
        counts.append(len(sizes))
    assert counts == [4, 4, 4]  # 66 rows a rank, 4 full batches of 16


def test_stream_order_comes_from_seed_and_epoch(fixed_out):
    def order(seed: int, epoch: int = 0, **kwargs) -> list[str]:
        ds = StreamingDataset(str(fixed_out), columns=["id"], batch_size=16, seed=seed, **kwargs)
        ds.set_epoch(epoch)
        return [i for batch in ds for i in batch["id"]]

    first = order(0)
    assert order(0) == first and sorted(first) == sorted(order(1))
    assert order(1) != first and order(0, epoch=1) != first
    mixed = order(0, block_shards=4)
    assert sorted(mixed) == sorted(first) and mixed != first
    stored = [i for t in _shards(fixed_out, "tokens") for i in t.column("id").to_pylist()]
    assert order(0, shuffle=False) == stored


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    from pipeline.data import StreamingDataset
    out, state_path, workers, block_shards = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ds = StreamingDataset(out, columns=["id"], batch_size=16, seed=7, block_shards=block_shards)
    loader = ds.loader(num_workers=workers)
    loader.load_state_dict(json.load(open(state_path)))
    seen = []
    for epoch in range(loader.state_dict()["epoch"], 2):
        ds.set_epoch(epoch)
        seen += [i for batch in loader for i in batch["id"]]
    print(json.dumps(seen))
""")


@pytest.mark.parametrize(("num_workers", "block_shards"), [(0, 1), (2, 2)])
def test_resume_in_a_new_process_continues_the_same_stream(fixed_out, tmp_path, num_workers, block_shards):
    def fresh():
        ds = StreamingDataset(str(fixed_out), columns=["id"], batch_size=16, seed=7, block_shards=block_shards)
        return ds, ds.loader(num_workers=num_workers)

    ds, loader = fresh()
    uninterrupted = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        uninterrupted += [i for batch in loader for i in batch["id"]]

    ds, loader = fresh()
    ds.set_epoch(0)
    before = []
    for k, batch in enumerate(loader):
        before += batch["id"]
        if k == 4:  # a checkpoint after 5 batches; the workers have prefetched more
            state = loader.state_dict()
            break
    assert state["batches"] == 5 and state["rows_consumed"] == 80
    (tmp_path / "state.json").write_text(json.dumps(state))
    run = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(fixed_out), str(tmp_path / "state.json"),
                          str(num_workers), str(block_shards)], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert before + json.loads(run.stdout) == uninterrupted
    with pytest.raises(ValueError, match="seed"):
        StreamingDataset(str(fixed_out), columns=["id"], batch_size=16, seed=8).load_state_dict(state)


def test_stream_over_fsspec_memory_equals_local(fixed_out):
    fs = fsspec.filesystem("memory")
    fs.put(str(fixed_out), "/outs/fixed", recursive=True)
    try:
        def stream(root: str, workers: int) -> list[tuple[str, list[int]]]:
            ds = StreamingDataset(root, columns=["id", "input_ids"], batch_size=32, seed=5)
            batches = ds.loader(num_workers=workers)
            return [(i, row.tolist()) for b in batches for i, row in zip(b["id"], b["input_ids"])]

        local = stream(str(fixed_out), 0)
        assert stream("memory://outs/fixed", 0) == local
        assert stream("memory://outs/fixed", 2) == stream(str(fixed_out), 2)
        assert len(local) == ROWS
        table = read_table("memory://outs/fixed/tokens/data-00000-of-00008.arrow", ["id"])
        assert table.num_rows == SHARD_ROWS
    finally:
        fs.rm("/outs/fixed", recursive=True)


# ------------------------------------------------------------------ collate


def _hf(tokenizer_dir: str, side: str, pad_token: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.padding_side = side
    if pad_token:
        tok.pad_token = pad_token
    return tok


@pytest.mark.parametrize("side", ["right", "left"])
def test_dynamic_padding_equals_the_tokenizers_padding(request, corpus, minilm_dir, bpe_dir, side):
    out = request.getfixturevalue("ragged_out" if side == "right" else "left_out")
    tok = _hf(minilm_dir, "right") if side == "right" else _hf(bpe_dir, "left", "<|endoftext|>")
    texts = corpus[1]
    ds = ShardDataset(str(out), columns=["id", "input_ids", "attention_mask"]
                      + (["token_type_ids"] if side == "right" else []))
    assert isinstance(ds[:2]["input_ids"], Ragged)
    for multiple in (None, 8):
        loader = DataLoader(ds, batch_size=24, shuffle=True, collate_fn=ds.collator(pad_to_multiple_of=multiple))
        for batch in loader:
            want = tok([texts[i] for i in batch["id"]], padding=True, truncation=True, max_length=MAX_LENGTH,
                       pad_to_multiple_of=multiple, return_tensors="pt")
            for name in want:
                assert torch.equal(batch[name], want[name]), (side, multiple, name)
    rows = [ds[i] for i in (3, 1, 4, 1, 5)]  # a list of rows (no __getitems__) pads the same
    from_rows, gathered = ds.collator()(rows), ds.collator()(ds.__getitems__([3, 1, 4, 1, 5]))
    assert torch.equal(from_rows["input_ids"], gathered["input_ids"])
    stream = StreamingDataset(str(out), columns=["id", "input_ids", "attention_mask"], batch_size=24, seed=0)
    batch = next(iter(stream.loader(num_workers=1)))
    want = tok([texts[i] for i in batch["id"]], padding=True, truncation=True, max_length=MAX_LENGTH,
               return_tensors="pt")
    assert torch.equal(batch["input_ids"], want["input_ids"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_trim_of_fixed_width_batches_equals_padding_to_longest(request, corpus, minilm_dir, bpe_dir, side):
    out = request.getfixturevalue("fixed_out" if side == "right" else "left_fixed_out")
    tok = _hf(minilm_dir, "right") if side == "right" else _hf(bpe_dir, "left", "<|endoftext|>")
    ds = ShardDataset(str(out), columns=["id", "input_ids", "attention_mask"])
    full = DataLoader(ds, batch_size=40, collate_fn=ds.collator())
    assert next(iter(full))["input_ids"].shape == (40, MAX_LENGTH)
    for batch in DataLoader(ds, batch_size=40, shuffle=True, collate_fn=ds.collator(trim=True)):
        want = tok([corpus[1][i] for i in batch["id"]], padding=True, truncation=True, max_length=MAX_LENGTH,
                   return_tensors="pt")
        assert torch.equal(batch["input_ids"], want["input_ids"]) and torch.equal(batch["attention_mask"],
                                                                                  want["attention_mask"])


@pytest.mark.parametrize("rows", [4, INLINE_BYTES // 8])
def test_batch_crosses_processes_packed_and_unchanged(rows):
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions)

    batch = Batch({"input_ids": torch.randint(0, 30_000, (rows, 8)), "labels": torch.full((rows,), -100),
                   "embedding": torch.randn(rows, 3).to(torch.bfloat16), "score": torch.randn(rows),
                   "id": [f"r{i}" for i in range(rows)]})
    back = ForkingPickler.loads(ForkingPickler.dumps(batch))
    assert type(back) is Batch and list(back) == list(batch) and back["id"] == batch["id"]
    for name in ("input_ids", "labels", "embedding", "score"):
        assert back[name].dtype == batch[name].dtype and torch.equal(back[name], batch[name]), name


# ------------------------------------------------------------------ the output directory


def test_uncommitted_shards_and_unfinished_stages(fixed_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(fixed_out, out)
    manifest = json.loads((out / "manifest.json").read_text())
    embeddings = manifest["stages"]["embeddings"]
    embeddings["status"] = "running"
    dropped = sorted(embeddings["shards"])[-2:]
    for name in dropped:
        del embeddings["shards"][name]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "embeddings" / ".staging").mkdir(exist_ok=True)
    (out / "embeddings" / ".staging" / f"{dropped[0]}.1234.tmp").write_bytes(b"partial")
    shutil.copy(out / "embeddings" / sorted(embeddings["shards"])[0], out / "embeddings" / "data-00099-of-00099.arrow")

    with pytest.raises(StageIncomplete, match=r"embeddings stage is still running.*6 of 8 shards.*allow_incomplete"):
        ShardDataset(str(out), "embeddings")
    with pytest.raises(StageIncomplete):
        StreamingDataset(str(out), "both", batch_size=8)
    assert len(ShardDataset(str(out), "tokens")) == ROWS
    partial = ShardDataset(str(out), "both", columns=["id", "embedding"], allow_incomplete=True)
    assert len(partial) == ROWS - 2 * SHARD_ROWS
    dropped_ids = {i for name in dropped for i in read_shard(out / "tokens" / name).column("id").to_pylist()}
    assert not dropped_ids & set(partial[:]["id"])
    del manifest["stages"]["embeddings"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageIncomplete, match="has not started"):
        ShardDataset(str(out), "embeddings")


def test_interop_datasets_and_ray_data(fixed_out, ray_cluster):
    import ray.data

    ours = ShardDataset(str(fixed_out), "both", columns=["input_ids", "attention_mask", "embedding"])[:]
    tokens = datasets.load_from_disk(str(fixed_out / "tokens")).with_format("torch")
    assert torch.equal(tokens[:]["input_ids"], ours["input_ids"])
    embeddings = datasets.load_from_disk(str(fixed_out / "embeddings")).with_format("torch")
    assert torch.equal(embeddings[:]["embedding"], ours["embedding"])

    paths = committed_shards(str(fixed_out), "tokens")
    ray_ds = ray.data.from_items([{"path": p} for p in paths]).map_batches(
        lambda batch: read_table(batch["path"][0].as_py(), ["id", "input_ids", "attention_mask"]),
        batch_size=1, batch_format="pyarrow")
    rows = 0
    for batch in ray_ds.select_columns(["input_ids", "attention_mask"]).iter_torch_batches(batch_size=64):
        assert batch["input_ids"].shape[1] == MAX_LENGTH
        rows += len(batch["input_ids"])
    assert rows == ROWS
