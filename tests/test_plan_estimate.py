"""`embedpipe plan`'s time estimate: the model of how the stages schedule (pure, on made-up rates) and the
rates plan measures on a tiny model, in real subprocesses and in process. No assertion on measured times."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_runs import REPO, cli_env, embedpipe
from tiny_models import build_tiny_bert

from pipeline.encode.forward import DEFAULT_TOKENS_PER_BATCH
from pipeline.encode.pieces import DEFAULT_PIECE_ROWS
from pipeline.ops.estimate import Cluster, Encoders, Rates, estimate_job, piece_costs, spread
from pipeline.run.encoder_pool import size_encoders

LENGTHS = np.random.default_rng(0).integers(20, 256, 1000)
RATES = Rates(tokenize_tokens_per_s=300_000, encode_tokens_per_s=4_000, model_load_s=3.0, driver_import_s=2.0)


def _encoders(cpus: int, gpus: int = 0, piece_rows: int | None = None) -> Encoders:
    device, actors, booked, _ = size_encoders("auto", cpus, gpus)
    return Encoders(device, actors, booked.get("num_cpus", 0.0), piece_rows or DEFAULT_PIECE_ROWS[device],
                    DEFAULT_TOKENS_PER_BATCH[device], 256)


def _estimate(stages, cpus: int, shard_rows: list[int], gpus: int = 0, piece_rows: int | None = None, executor="local",
              lengths: np.ndarray = LENGTHS):
    tokens = [rows * float(lengths.mean()) for rows in shard_rows]
    return estimate_job(stages, Cluster(executor, cpus, gpus, "test"), tokens, shard_rows, lengths, RATES,
                        _encoders(cpus, gpus, piece_rows) if "embeddings" in stages else None)


def test_more_cpus_embed_faster_down_to_the_piece_count():
    # One shard of 3,000 rows of one length in pieces of 1,000: three pieces, so a fourth actor has nothing to do.
    same = np.full(100, 128)
    times = [_estimate(("embeddings",), cpus, [3000], piece_rows=1000, lengths=same).embed for cpus in (1, 2, 3, 4, 8)]
    assert times[0] > times[1] > times[2]
    assert times[2] == times[3] == times[4]
    # Pieces of unequal lengths: the longest piece (the longest rows) bounds it sooner.
    mixed = [_estimate(("embeddings",), cpus, [3000], piece_rows=1000).embed for cpus in (1, 2, 3)]
    assert mixed[0] > mixed[1] == mixed[2]


def test_one_shard_uses_every_actor():
    start = 1.0 + RATES.driver_import_s + RATES.model_load_s  # local executor: when the models are loaded
    one, two = (_estimate(("embeddings",), cpus, [3000]).embed - start for cpus in (1, 2))
    assert one / two == pytest.approx(2.0, rel=0.05)  # 24 pieces of similar cost on two actors


def test_tokenize_is_bounded_by_the_units():
    single = [_estimate(("tokens",), cpus, [100_000]).tokenize - 1.0 for cpus in (1, 2, 16)]
    # One unit is one task, on as many threads as the CPUs when it is the job's only unit.
    assert single[0] / single[1] == pytest.approx(2, rel=1e-6) and single[0] / single[2] == pytest.approx(16)
    many = [_estimate(("tokens",), cpus, [6250] * 16).tokenize - 1.0 for cpus in (1, 16)]
    assert many[0] / many[1] == pytest.approx(16, rel=1e-6)  # one thread each: as many units as CPUs
    uneven = _estimate(("tokens",), 4, [90_000, 10_000]).tokenize - 1.0  # 2 threads each: the big unit bounds it
    assert uneven == pytest.approx(90_000 * LENGTHS.mean() / RATES.tokenize_tokens_per_s / 2)


def test_run_overlaps_the_stages():
    shards = [2500] * 8
    for cpus, gpus in ((4, 0), (8, 2)):  # a CPU cluster, and a GPU one
        tokenize = _estimate(("tokens",), cpus, shards, gpus, executor="ray").tokenize
        embed = _estimate(("embeddings",), cpus, shards, gpus, executor="ray").embed
        run = _estimate(("tokens", "embeddings"), cpus, shards, gpus, executor="ray")
        assert run.embed >= max(tokenize, embed) - 1e-9  # each stage at least as long as alone
        assert run.total < tokenize + embed  # but they overlap
        assert run.tokenize < run.embed


def test_padding_is_what_the_batches_compute():
    encoders = _encoders(2)
    costs = piece_costs(LENGTHS, 3000, encoders)
    real = int(spread(LENGTHS, 3000).sum())
    assert len(costs) == 24 and real < sum(costs) < 1.1 * real  # length-sorted pieces waste little
    nine = piece_costs(np.full(10, 9), 10, encoders)
    assert nine == [10 * 16]  # widths round up to a multiple of 8
    packed = Encoders("cpu", 2, 0.5, 128, 2048, 256, packed=True)
    assert sum(piece_costs(LENGTHS, 3000, packed)) == real
    assert list(spread(np.array([5, 1, 3]), 6)) == [1, 1, 3, 3, 5, 5]


def test_without_an_encoder_rate_embed_is_not_estimated():
    rates = Rates(tokenize_tokens_per_s=300_000)
    estimate = estimate_job(("tokens", "embeddings"), Cluster("ray", 8, 2, "test"), [1e6], [5000], LENGTHS, rates,
                            _encoders(8, 2))
    assert estimate.tokenize > 0 and estimate.embed is None and estimate.total is None
    assert estimate.pieces == 1 and estimate.computed_tokens > 0


# ---------------------------------------------------------------- what plan measures, on a tiny model


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("estimate")
    model = build_tiny_bert(root / "tiny-bert")
    corpus = root / "rows.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"r{i}", "text": f"row {i} " + "word " * (i % 23)}) + "\n"
                              for i in range(300)))
    config = root / "job.yaml"
    config.write_text(f"input: {{path: '{corpus}', id_column: id}}\noutput: {{path: {root / 'out'}, shard_rows: 100}}\n"
                      f"tokenizer: {{max_length: 32}}\nencoder: {{model: {model}}}\nray: {{executor: local}}\n")
    return {"root": root, "config": str(config)}


def _plan(job: dict, *args: str) -> dict:
    done = embedpipe("plan", job["config"], "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_plan_measures_rates_and_estimates_every_stage(job):
    estimate = _plan(job)["estimate"]
    measured, seconds = estimate["measured"], estimate["seconds"]
    assert estimate["cluster"]["executor"] == "local" and estimate["cluster"]["gpus"] == 0
    assert measured["tokenizer_tokens_per_s"] > 0 and measured["encoder_tokens_per_s"] > 0
    assert measured["model_load_s"] > 0 and measured["device"] == "cpu" and measured["dtype"] == "float32"
    assert 0 < seconds["tokenize"] <= seconds["embed"] <= seconds["total"]
    assert estimate["work"]["pieces"] == 3 and estimate["work"]["padding"] >= 1.0
    assert not [note for note in estimate["notes"] if "not estimated" in note]  # a busy machine is only noted


def test_the_terminal_lines_say_the_cluster_and_the_rates(job):
    done = embedpipe("plan", job["config"], "--cpus", "3")
    assert done.returncode == 0, done.stderr
    assert "time: tokenize ~" in done.stdout and "on 3 CPUs (--cpus 3, local executor)" in done.stdout
    assert "tokens/s/worker" in done.stdout and "tokens/s/actor (cpu float32; 3 actors" in done.stdout
    assert "Loading weights" not in done.stderr


def test_no_estimate_loads_no_model(job):
    """In one process: plan --no-estimate imports no model class; plan with the estimate does (it loads one)."""
    script = (
        "import sys\nfrom jobs.cli import main\n"
        "def plan(*extra):\n"
        f"    try:\n        main(['plan', {job['config']!r}, '--json', *extra])\n"
        "    except SystemExit as exc:\n        assert not exc.code, exc.code\n"
        "    print('MODEL', 'transformers.models.bert.modeling_bert' in sys.modules)\n"
        "plan('--no-estimate')\nplan()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    first, second = [line for line in done.stdout.splitlines() if line.startswith("MODEL")]
    assert first == "MODEL False" and second == "MODEL True"
    assert json.loads(done.stdout[:done.stdout.index("MODEL")])["estimate"] is None


def test_tokenize_plan_estimates_without_torch(job):
    script = (f"import sys\nfrom jobs.cli import main\ntry:\n    main(['plan', {job['config']!r}, '--json', "
              "'--stages', 'tokenize'])\nexcept SystemExit as exc:\n    assert not exc.code\n"
              "print('TORCH', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "TORCH False"
    estimate = json.loads(done.stdout[:done.stdout.index("TORCH")])["estimate"]
    assert estimate["seconds"]["tokenize"] > 0 and estimate["seconds"]["embed"] is None


def test_cpus_and_gpus_change_the_cluster_assumed(job):
    from pipeline.config import load_config
    from pipeline.ops.preview import preview_job

    config = load_config(job["config"])
    one = preview_job(config, ("tokens", "embeddings"), cpus=1).estimate
    four = preview_job(config, ("tokens", "embeddings"), cpus=4).estimate
    assert (one["cluster"]["cpus"], four["cluster"]["cpus"]) == (1, 4) and "--cpus 4" in four["cluster"]["source"]
    assert (one["work"]["actors"], four["work"]["actors"]) == (1, 4)
    assert one["work"]["tokenize_slots"] == 1 and four["work"]["tokenize_slots"] == 2  # 4 actors book half a CPU
    assert all(one["seconds"].values()) and all(four["seconds"].values())


def test_a_gpu_cluster_seen_from_a_cpu_machine_is_not_guessed(job, monkeypatch):
    from pipeline.config import load_config
    from pipeline.ops.preview import format_preview, preview_job

    monkeypatch.setattr("pipeline.run.executor.visible_gpus", lambda: 0)  # whatever this machine has
    preview = preview_job(load_config(job["config"]), ("tokens", "embeddings"), cpus=16, gpus=2)
    estimate = preview.estimate
    assert estimate["cluster"] == {"executor": "ray", "cpus": 16, "gpus": 2,
                                   "source": "--cpus 16 and --gpus 2, ray executor"}
    assert estimate["seconds"]["tokenize"] > 0 and estimate["seconds"]["embed"] is None
    assert estimate["seconds"]["total"] is None and "encoder_tokens_per_s" not in estimate["measured"]
    assert estimate["work"]["device"] == "cuda" and any("this machine has none" in n for n in estimate["notes"])
    assert "embed not estimated" in format_preview(preview)


def test_a_named_ray_cluster_is_not_contacted(job):
    estimate = _plan(job, "--stages", "tokenize", "--set", "ray.executor=auto", "--set",
                     "ray.address=ray://nowhere:10001")["estimate"]
    unknown = [note for note in estimate["notes"] if "not estimated" in note]
    assert estimate["cluster"] is None and "--cpus" in unknown[0] and "nowhere" in unknown[0]
    sized = _plan(job, "--stages", "tokenize", "--set", "ray.executor=auto", "--set",
                  "ray.address=ray://nowhere:10001", "--cpus", "32")["estimate"]
    assert sized["cluster"]["cpus"] == 32 and sized["cluster"]["executor"] == "ray"
    assert sized["seconds"]["tokenize"] > 0



def test_the_cluster_assumed_and_where_it_came_from(job, monkeypatch):
    from pipeline.config import load_config
    from pipeline.ops.measure import cluster_for, worker_environment

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("pipeline.run.executor.visible_gpus", lambda: 0)
    cluster, source = cluster_for(load_config(job["config"], ["ray.num_cpus=3"]))
    assert (cluster.executor, cluster.cpus, cluster.gpus) == ("local", 3, 0) and "ray.num_cpus" in source
    cluster, _ = cluster_for(load_config(job["config"], ["ray.executor=ray", "ray.num_cpus=5"]))
    assert (cluster.executor, cluster.cpus) == ("ray", 5) and "local Ray cluster" in cluster.source
    assert cluster_for(load_config(job["config"], ["ray.executor=ray"]), gpus=4)[0].gpus == 4
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with worker_environment():  # the tokenizer is timed as a worker runs it, and the setting comes back after
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false" and os.environ["RAYON_NUM_THREADS"] == "1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
