"""Work below the shard: a token shard's pieces embedded by every actor, committed once, byte for byte the
same as one encoder embedding the whole shard (pipeline.encode.pieces, pipeline.run.encoder_pool)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cli_runs import digests, embedpipe, manifest
from tiny_models import build_tiny_bert

from pipeline.config import validate_config
from pipeline.encode.pieces import Piece, assemble_shard, length_order, longest_first, piece_count, piece_rows_of
from pipeline.encode.stage import ShardEncoder, embedding_schema
from pipeline.run.driver import run_job
from pipeline.run.encoder_pool import plan_encoders, size_encoders
from pipeline.run.ray_engine import RayEngine
from pipeline.tokenize.loading import load_tokenize_spec

WORDS = "the a cat dog sat on mat fast slow red blue model vector token shard batch text data".split()
ROWS = 100
PIECE_ROWS = 16


def _corpus(path: Path, rows: int = ROWS) -> Path:
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(rows):
            words = rng.choice(WORDS, size=int(rng.integers(0, 50)))
            f.write(json.dumps({"id": f"doc-{i}", "text": " ".join(words)}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("pieces") / "tiny-bert")


def _config(corpus: Path, out: Path, model: Path, **encoder):
    return validate_config({
        "input": {"path": str(corpus), "id_column": "id"},
        "output": {"path": str(out)},  # the default shard size: one shard
        "tokenizer": {"max_length": 64},
        "encoder": {"model": str(model), "pooling": "mean", "normalize": True, "piece_rows": PIECE_ROWS, **encoder},
    })


def test_pieces_cut_the_length_order_into_fixed_slices():
    order = length_order(np.array([5, 1, 5, 3, 1, 9, 2]))
    assert order.tolist() == [1, 4, 6, 3, 0, 2, 5]  # ties keep row order
    assert [piece_rows_of(order, p, 3).tolist() for p in range(piece_count(7, 3))] == [[1, 4, 6], [3, 0, 2], [5]]
    assert piece_count(0, 16) == 1 and piece_count(16, 16) == 1 and piece_count(17, 16) == 2
    assert longest_first(3) == [2, 1, 0]


def test_one_shard_is_embedded_by_every_actor_and_equals_one_encoder(ray_cluster, tmp_path, tiny_bert):
    """The session cluster has 2 CPUs, so 2 encoder actors: both compute pieces of the job's one shard, and
    the committed shard is byte-identical to one in-process encoder embedding it whole."""
    corpus = _corpus(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    config = _config(corpus, out, tiny_bert)
    run_job(config)
    record = manifest(out)["stages"]["embeddings"]["shards"]
    assert len(record) == 1
    (name, shard), = record.items()
    assert shard["pieces"] == piece_count(ROWS, PIECE_ROWS) == 7
    assert shard["encoders"] == 2, shard
    # The positions the forwards computed, counted as they ran: each piece's batch plan, rows x padded width.
    from pipeline.encode.forward import WIDTH_MULTIPLE, padded_width, plan_batches
    from pipeline.output.shards import read_shard

    lengths = read_shard(out / "tokens" / name).column("length").to_numpy()
    order = length_order(lengths)
    planned = 0
    for piece in range(shard["pieces"]):
        piece_lengths = lengths[piece_rows_of(order, piece, PIECE_ROWS)]
        for batch in plan_batches(piece_lengths, 2048, WIDTH_MULTIPLE, 64):
            planned += len(batch) * padded_width(int(piece_lengths[batch].max()), WIDTH_MULTIPLE, 64)
    assert shard["computed_tokens"] == planned > shard["tokens"]

    # The same shard embedded whole by one encoder, in this process, from a copy of the token shard.
    alone = tmp_path / "alone"
    shutil.copytree(out / "tokens", alone / "tokens")
    (alone / "embeddings").mkdir()
    encoder = ShardEncoder(plan_encoders(config, load_tokenize_spec(config), {"CPU": 2}).spec)
    report = encoder.embed_shard(str(alone), name)
    assert report["sha256"] == shard["sha256"]
    assert digests(alone / "embeddings") == digests(out / "embeddings", "*.arrow")


def _piece(rows, value, sha="s" * 64) -> Piece:
    rows = np.asarray(rows, dtype=np.int64)
    return Piece(rows, np.full((len(rows), 2), value, dtype=np.float32), sha)


def _token_shard(tmp_path: Path, rows: int) -> tuple[Path, str, pa.Schema]:
    from pipeline.encode.stage import EmbedSpec
    from pipeline.output.shards import read_shard_and_sha256, write_shard

    out = tmp_path / "o"
    (out / "tokens").mkdir(parents=True)
    (out / "embeddings").mkdir()
    table = pa.table({"id": [f"r{i}" for i in range(rows)], "length": pa.array([1] * rows, pa.int32())})
    write_shard(table, out / "tokens" / "shard-00000.arrow")
    sha = read_shard_and_sha256(out / "tokens" / "shard-00000.arrow")[1]

    class _Options:
        pooling, output_dtype = "mean", "float32"

    spec = EmbedSpec("m", _Options(), "cpu", False, False, "right", None, hidden_size=2)
    return out, sha, embedding_schema(spec, with_chunk=False)


def test_assemble_puts_rows_back_in_order_and_refuses_gaps_overlaps_and_stale_pieces(tmp_path):
    out, sha, schema = _token_shard(tmp_path, 4)
    report = assemble_shard(str(out), "shard-00000.arrow", schema, "float32",
                            [_piece([3, 1], 1.0, sha), _piece([0, 2], 2.0, sha)])
    assert report["rows"] == 4
    from pipeline.output.shards import read_shard

    table = read_shard(out / "embeddings" / "shard-00000.arrow")
    assert table.column("id").to_pylist() == ["r0", "r1", "r2", "r3"]
    assert [v[0] for v in table.column("embedding").to_pylist()] == [2.0, 1.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="cover 3 of 4 rows"):
        assemble_shard(str(out), "shard-00000.arrow", schema, "float32", [_piece([3, 1], 1.0, sha), _piece([0], 2.0, sha)])
    with pytest.raises(ValueError, match=r"cover 4 of 4 rows \(1 more than once\)"):
        assemble_shard(str(out), "shard-00000.arrow", schema, "float32",
                       [_piece([3, 1, 2], 1.0, sha), _piece([0, 2], 2.0, sha)])
    with pytest.raises(ValueError, match="embedded from a token shard with sha256 sss"):
        assemble_shard(str(out), "shard-00000.arrow", schema, "float32", [_piece([0, 1, 2, 3], 1.0)])


def test_encoder_sizing_leaves_a_cpu_slot_for_tokenizing_and_committing():
    device, count, resources, _ = size_encoders("auto", cpus=1, gpus=1)
    assert (device, count) == ("cuda", 1) and resources["num_cpus"] < 1  # a 1-CPU, 1-GPU node must not hang
    device, count, resources, _ = size_encoders("auto", cpus=8, gpus=8)
    assert count == 8 and count * resources["num_cpus"] <= 7
    assert size_encoders("auto", cpus=16, gpus=2)[2] == {"num_gpus": 1, "num_cpus": 1.0}
    assert size_encoders("cpu", cpus=4, gpus=2)[:2] == ("cpu", 4)
    assert size_encoders("auto", cpus=1, gpus=0)[2] == {"num_cpus": 0.0}  # a 1-CPU job with many units must not hang
    assert size_encoders("auto", cpus=2, gpus=0)[2] == {"num_cpus": 0.5}


@pytest.mark.slow  # whole CLI runs (~45 s / ~13 s): the default suite stays under 10 minutes
def test_a_cluster_with_a_gpu_but_torch_without_one_is_a_clear_config_error(tmp_path, tiny_bert):
    """``device: auto`` on a Ray node that declares a GPU torch cannot see (this CPU machine): exit 2, named."""
    corpus = _corpus(tmp_path / "c.jsonl", rows=10)
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{path: {corpus}, id_column: id}}\noutput: {{path: {tmp_path / 'out'}}}\n"
                      f"tokenizer: {{max_length: 64}}\nencoder: {{model: {tiny_bert}}}\n")
    script = ("import ray, sys; ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, logging_level='ERROR');"
              "from jobs.cli import main; sys.argv = ['embedpipe', 'run', sys.argv[1], '--no-progress']; main()")
    import subprocess
    import sys

    from cli_runs import REPO, cli_env

    done = subprocess.run([sys.executable, "-c", script, str(config)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "encoder.device" in done.stderr and "torch sees no GPU" in done.stderr, done.stderr


@pytest.mark.slow
def test_bytes_are_the_same_for_one_two_and_three_actors(tmp_path, tiny_bert):
    """Whole CLI runs with 1, 2 and 3 CPUs (one encoder actor each): the same embedding bytes."""
    corpus = _corpus(tmp_path / "c.jsonl", rows=300)
    seen = {}
    for cpus in (1, 2, 3):
        config = tmp_path / f"job-{cpus}.yaml"
        config.write_text(
            f"input: {{path: {corpus}, id_column: id}}\noutput: {{path: {tmp_path / f'out-{cpus}'}}}\n"
            f"tokenizer: {{max_length: 64}}\nencoder: {{model: {tiny_bert}, piece_rows: {PIECE_ROWS}}}\n"
            f"ray: {{num_cpus: {cpus}}}\n")
        done = embedpipe("run", str(config), "--no-progress")
        assert done.returncode == 0, done.stderr
        shards = manifest(tmp_path / f"out-{cpus}")["stages"]["embeddings"]["shards"]
        assert {s["encoders"] for s in shards.values()} == {cpus}
        seen[cpus] = digests(tmp_path / f"out-{cpus}" / "embeddings", "*")
    assert seen[1] == seen[2] == seen[3]


def test_the_ray_engine_reads_the_session_cluster(ray_cluster):
    assert RayEngine().resources() == {"CPU": 2, "GPU": 0}
    assert size_encoders("auto", cpus=2, gpus=0)[:2] == ("cpu", 2)


def test_a_resumed_job_never_mixes_embeddings_computed_two_ways(ray_cluster, tmp_path, tiny_bert):
    """The settings resolved on the cluster (device auto, its default dtype and budgets, piece size) are
    recorded; a run that would resolve them otherwise is refused, and --force redoes the embeddings."""
    from pipeline.errors import ConfigError
    from pipeline.output.manifest import COMPUTED_WITH_KEY

    corpus = _corpus(tmp_path / "c.jsonl", rows=20)
    out = tmp_path / "out"
    config = _config(corpus, out, tiny_bert)
    run_job(config)
    path = out / "manifest.json"
    record = json.loads(path.read_text())
    assert record[COMPUTED_WITH_KEY] == {"device": "cpu", "dtype": "float32", "tf32": False,
                                         "piece_rows": PIECE_ROWS, "max_tokens_per_batch": 2048}
    before = digests(out / "embeddings", "*.arrow")
    record[COMPUTED_WITH_KEY] |= {"device": "cuda", "dtype": "bfloat16"}  # as a GPU cluster would have made them
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="encoder device resolves to 'cpu' on this cluster, the committed "
                                          "embeddings were computed with 'cuda'"):
        run_job(config)
    run_job(config, force=True)
    assert json.loads(path.read_text())[COMPUTED_WITH_KEY]["device"] == "cpu"
    assert digests(out / "embeddings", "*.arrow") == before



def test_encoder_packed_runs_the_unpadded_forward_in_the_actors(ray_cluster, tmp_path, tiny_bert):
    """``encoder.packed: true`` reaches the actors: they compute only the real tokens (the run's own count),
    and the vectors equal the padded run's."""
    from pipeline.data.reader import arrow_to_tensor
    from pipeline.output.shards import read_shard

    corpus = _corpus(tmp_path / "c.jsonl", rows=40)
    vectors, records = {}, {}
    for packed in (False, True):
        out = tmp_path / f"out-{packed}"
        run_job(_config(corpus, out, tiny_bert, packed=packed))
        (records[packed],) = manifest(out)["stages"]["embeddings"]["shards"].values()
        table = read_shard(next((out / "embeddings").glob("*.arrow")))
        vectors[packed] = arrow_to_tensor(table.column("embedding"), table.schema.field("embedding")).numpy()
    assert records[True]["computed_tokens"] == records[True]["tokens"] < records[False]["computed_tokens"]
    cosine = (vectors[True] * vectors[False]).sum(1)  # normalized vectors
    assert cosine.min() >= 0.99999
