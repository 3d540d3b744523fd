"""Every core busy however few units or shards a job has: a unit tokenized on many threads, the next token
shard read while a piece computes, packed batches sized by real tokens (pipeline.tokenize.stage,
pipeline.encode.stage, pipeline.encode.forward), and the padding waste shown by status."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runs import digests, embedpipe, manifest
from tiny_models import build_tiny_bert

from pipeline.config import validate_config
from pipeline.encode.forward import plan_packed_batches
from pipeline.encode.pieces import piece_count
from pipeline.encode.stage import ShardEncoder
from pipeline.errors import InputError
from pipeline.inputs.plan import plan_units
from pipeline.run.driver import run_job
from pipeline.run.encoder_pool import plan_encoders
from pipeline.tokenize import stage as tokenize_stage
from pipeline.tokenize.loading import load_tokenize_spec
from pipeline.tokenize.stage import ReadSpec, run_unit, tokenize_batches, tokenize_threads

WORDS = "the a cat dog sat on mat fast slow red blue model vector token shard batch text data".split()


def _corpus(path: Path, rows: int) -> Path:
    rng = np.random.default_rng(1)
    with path.open("w") as f:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS, int(rng.integers(0, 60))))
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("every-core") / "tiny-bert")


def _config(corpus: Path, out: Path, model: Path, *, shard_rows: int = 100_000, **encoder):
    return validate_config({
        "input": {"path": str(corpus), "id_column": "id"},
        "output": {"path": str(out), "shard_rows": shard_rows},
        "tokenizer": {"max_length": 48},
        "encoder": {"model": str(model), "pooling": "mean", "piece_rows": 16, **encoder},
        "ray": {"executor": "local", "num_cpus": 2},
    })


def test_a_unit_tokenized_on_many_threads_gives_the_same_rows_and_bytes(tmp_path, tiny_bert, monkeypatch):
    # Small read batches, so that a unit is many batches in flight at once and their order matters.
    monkeypatch.setattr(tokenize_stage, "BATCH_ROWS", 7)
    corpus = _corpus(tmp_path / "c.jsonl", 150)
    config = _config(corpus, tmp_path / "unused", tiny_bert)
    spec = load_tokenize_spec(config)
    batches = [([f"r{i}" for i in range(start, start + 7)], [f"{WORDS[i % 18]} text {i} " * (i % 9)
                                                              for i in range(start, start + 7)])
               for start in range(0, 70, 7)]
    alone = tokenize_batches(spec, iter(batches), threads=1)
    for threads in (2, 3):
        shared = tokenize_batches(spec, iter(batches), threads=threads)
        assert len(shared) == threads * len(alone)  # each batch spread over every thread
        joined, whole = type(alone[0]).concat(shared), type(alone[0]).concat(alone)
        assert joined.ids == whole.ids
        assert np.array_equal(joined.flat_ids, whole.flat_ids) and np.array_equal(joined.lengths, whole.lengths)

    (unit,) = plan_units([_input_file(corpus)], 100_000)
    read = ReadSpec("text", "id")
    reports = {}
    for threads in (1, 2, 3):
        out = tmp_path / f"out-{threads}"
        (out / "tokens").mkdir(parents=True)
        reports[threads] = run_unit(unit, "shard-00000.arrow", read, spec, str(out), threads)
    assert {r["threads"] for r in reports.values()} == {1, 2, 3}
    assert len({(r["sha256"], r["input_sha256"], r["rows"], r["tokens"]) for r in reports.values()}) == 1


def _input_file(path: Path):
    from pipeline.inputs.discovery import discover

    (found,) = discover(str(path), "auto")
    return found


def test_tokenize_threads_share_the_cpus_only_when_fewer_units_than_cpus_are_left():
    assert tokenize_threads(cpus=2, units_left=1) == 2
    assert tokenize_threads(cpus=8, units_left=3) == 2
    assert tokenize_threads(cpus=2, units_left=2) == 1
    assert tokenize_threads(cpus=2, units_left=50) == 1
    assert tokenize_threads(cpus=1, units_left=1) == 1


def test_a_one_unit_job_tokenizes_on_every_cpu_and_a_many_unit_job_on_one_each(tmp_path, tiny_bert):
    corpus = _corpus(tmp_path / "c.jsonl", 120)
    one = tmp_path / "one"
    run_job(_config(corpus, one, tiny_bert), stages=("tokens",))
    (shard,) = manifest(one)["stages"]["tokens"]["shards"].values()
    assert shard["threads"] == 2
    many = tmp_path / "many"
    run_job(_config(corpus, many, tiny_bert, shard_rows=30), stages=("tokens",))
    threads = [s["threads"] for s in manifest(many)["stages"]["tokens"]["shards"].values()]
    assert threads == [1] * 4  # 4 units for 2 CPUs, all submitted at once: one thread each
    from pipeline.output.shards import read_shard

    one_ids = read_shard(next((one / "tokens").glob("*.arrow"))).column("input_ids").to_pylist()
    many_ids = [row for path in sorted((many / "tokens").glob("*.arrow"))
                for row in read_shard(path).column("input_ids").to_pylist()]
    assert one_ids == many_ids


def _tokens_of_two_shards(tmp_path: Path, tiny_bert: Path):
    corpus = _corpus(tmp_path / "c.jsonl", 80)
    out = tmp_path / "out"
    config = _config(corpus, out, tiny_bert, shard_rows=40)
    run_job(config, stages=("tokens",))
    (out / "embeddings").mkdir()
    return config, out, sorted(manifest(out)["stages"]["tokens"]["shards"])


def test_the_next_shard_is_read_while_a_piece_computes_and_read_once(tmp_path, tiny_bert):
    config, out, (first, second) = _tokens_of_two_shards(tmp_path, tiny_bert)
    spec = plan_encoders(config, load_tokenize_spec(config), {"CPU": 2}).spec
    encoder = ShardEncoder(spec)
    reads = []
    real_read = encoder._read
    encoder._read = lambda out_dir, name: reads.append(name) or real_read(out_dir, name)
    pieces = piece_count(40, 16)
    done = [encoder.embed_piece(str(out), first, p, read_ahead=second) for p in range(pieces)]
    assert encoder._ahead is not None and encoder._ahead[0] == (str(out), second)
    done += [encoder.embed_piece(str(out), second, p) for p in range(pieces)]
    assert reads == [first, second]  # each shard read once; the second by the reader thread

    plain = ShardEncoder(spec)  # the same vectors as an encoder that never reads ahead
    for (status, piece), name, p in zip(done, [first] * pieces + [second] * pieces, list(range(pieces)) * 2):
        again_status, again = plain.embed_piece(str(out), name, p)
        assert status["tokens_sha256"] == again_status["tokens_sha256"]
        assert np.array_equal(piece.rows, again.rows) and piece.embeddings.tobytes() == again.embeddings.tobytes()


def test_a_shard_that_cannot_be_read_ahead_fails_its_own_piece_not_the_one_computing(tmp_path, tiny_bert):
    config, out, (first, second) = _tokens_of_two_shards(tmp_path, tiny_bert)
    encoder = ShardEncoder(plan_encoders(config, load_tokenize_spec(config), {"CPU": 2}).spec)
    damaged = out / "tokens" / second
    damaged.write_bytes(damaged.read_bytes()[:100])
    status, _ = encoder.embed_piece(str(out), first, 0, read_ahead=second)
    assert status["rows"] == 16
    encoder._ahead[1].exception(timeout=30)  # the read ahead has failed by now
    with pytest.raises(InputError, match=f"tokens/{second}: not a readable Arrow shard"):
        encoder.embed_piece(str(out), second, 0)


def test_a_two_shard_job_reads_ahead_and_equals_a_job_that_cannot(tmp_path, tiny_bert):
    """The pool hints the next waiting shard to the actors near a shard's end, and that changes no byte."""
    corpus = _corpus(tmp_path / "c.jsonl", 90)
    ahead = tmp_path / "ahead"
    run_job(_config(corpus, ahead, tiny_bert, shard_rows=30), stages=("tokens",))
    run_job(_config(corpus, ahead, tiny_bert, shard_rows=30), stages=("embeddings",))  # every shard waiting
    shards = manifest(ahead)["stages"]["embeddings"]["shards"]
    assert len(shards) == 3
    reads = [shards[name]["token_reads"] for name in sorted(shards)]
    # Each of the 2 actors reads a shard once; from the second shard on, while it computed the last one's piece.
    assert all(sum(r.values()) == shards[name]["encoders"] for r, name in zip(reads, sorted(shards)))
    assert reads[0]["ahead"] == 0 and sum(r["ahead"] for r in reads[1:]) >= 2, reads
    alone = tmp_path / "alone"
    config = _config(corpus, alone, tiny_bert, shard_rows=30)
    run_job(config, stages=("tokens",))
    (alone / "embeddings").mkdir()
    encoder = ShardEncoder(plan_encoders(config, load_tokenize_spec(config), {"CPU": 2}).spec)
    for name in shards:
        encoder.embed_shard(str(alone), name)
    assert digests(alone / "embeddings") == digests(ahead / "embeddings", "data-*.arrow")


def test_packed_batches_hold_a_budget_of_real_tokens():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 300, size=500)
    batches = plan_packed_batches(lengths, 2048)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(500))  # every row once
    assert np.array_equal(lengths[rows], np.sort(lengths, kind="stable"))  # shortest first
    for i, batch in enumerate(batches):
        assert lengths[batch].sum() <= 2048 or len(batch) == 1
        if i + 1 < len(batches):  # full: the next row would not have fit
            assert lengths[batch].sum() + lengths[batches[i + 1][0]] > 2048
    assert [b.tolist() for b in plan_packed_batches(np.array([5000, 10]), 100)] == [[1], [0]]
    assert plan_packed_batches(np.array([], dtype=np.int64), 100) == []


def test_status_shows_the_padding_the_forwards_computed(tmp_path, tiny_bert):
    corpus = _corpus(tmp_path / "c.jsonl", 60)
    out = tmp_path / "out"
    run_job(_config(corpus, out, tiny_bert))
    result = embedpipe("status", str(out), "--json")
    assert result.returncode == 0, result.stderr
    stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    record = manifest(out)["stages"]["embeddings"]["shards"]
    assert stages["embeddings"]["computed_tokens"] == sum(s["computed_tokens"] for s in record.values())
    assert stages["embeddings"]["computed_tokens"] > stages["embeddings"]["tokens"] == stages["tokens"]["tokens"] > 0
    assert stages["tokens"]["computed_tokens"] is None
    text = embedpipe("status", str(out)).stdout
    assert "computed with padding" in text
    from pipeline.run.report import build_run_report

    report = build_run_report(out, "run", 0, None, 1.0, since="")
    assert report["stages"]["embeddings"]["computed_tokens"] == stages["embeddings"]["computed_tokens"]


def _native_bfloat16() -> bool:
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_bfloat16_on_a_cpu_without_native_kernels_is_warned_about(caplog):
    import torch

    from pipeline.encode.cpu_linear import warn_if_bfloat16_is_slow

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    with caplog.at_level("WARNING", logger="embedpipe"):
        assert warn_if_bfloat16_is_slow(torch.float32) is False
        assert warn_if_bfloat16_is_slow(torch.bfloat16, min_speedup=0.0) is (not native)
    assert ("emulates bfloat16" in caplog.text) is (not native)


@pytest.mark.skipif(not _native_bfloat16(), reason="this CPU has no native bfloat16")
def test_bfloat16_no_faster_than_float32_is_measured_and_warned_about(caplog, tmp_path):
    """With native kernels the speed-up is measured on the model's widest linear layer (the tiny BERT's
    intermediate, 32 x 64 here), and a CPU where it falls short of min_speedup is warned about."""
    from pipeline.encode.cpu_linear import _widest_linear, bfloat16_linear_speedup, warn_if_bfloat16_is_slow
    from pipeline.encode.models import load_encoder

    import torch

    model = load_encoder(build_tiny_bert(tmp_path / "bert"), dtype=torch.bfloat16)
    config = model.config
    assert _widest_linear(model) == (config.hidden_size, config.intermediate_size)
    assert bfloat16_linear_speedup(384, 1536, tokens=64, repeats=3) > 0
    with caplog.at_level("INFO"):
        assert warn_if_bfloat16_is_slow(torch.bfloat16, model, min_speedup=1e9) is True
        assert warn_if_bfloat16_is_slow(torch.bfloat16, model, min_speedup=0.0) is False
    assert "runs the linear layers at" in caplog.text and "measured" in caplog.text
