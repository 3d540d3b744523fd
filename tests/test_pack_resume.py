"""A packed job killed mid-way resumes to shards byte-identical to an undisturbed run's, and one worker makes
the same bytes as two (slow: four CLI runs).

The kill is the fault-site mechanism's (pipeline/faults.py): the driver is SIGKILLed right after it records
its fifth shard (of seven), before the manifest is rewritten, so the rerun finds committed files the manifest may not
list yet and must redo or keep exactly the right ones.
"""

from __future__ import annotations

import json

import pytest
from cli_runs import REPO, cli_env, digests, embedpipe

CORPUS = REPO / "pipeline" / "sample_data" / "corpus.jsonl"


def _config(tmp_path, name: str, cpus: int = 2) -> str:
    config = {"input": {"path": str(CORPUS), "id_column": "id"}, "output": {"path": str(tmp_path / name),
                                                                            "shard_rows": 500},
              "tokenizer": {"name": str(REPO / "conf/tokenizers/decoder-bpe"), "max_length": 256, "pack": True},
              "ray": {"num_cpus": cpus}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.slow
def test_killed_packed_job_resumes_to_identical_shards(tmp_path):
    clean = embedpipe("tokenize", _config(tmp_path, "clean"), "--no-progress")
    assert clean.returncode == 0, clean.stderr
    env = cli_env(EMBEDPIPE_FAULT="driver.after_record:5", EMBEDPIPE_FAULT_DIR=str(tmp_path / "faults"))
    config = _config(tmp_path, "killed")
    killed = embedpipe("tokenize", config, "--no-progress", env=env)
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    listed = len(manifest["stages"]["tokens"]["shards"])  # the manifest is saved at most once a second
    assert manifest["status"] != "complete" and listed < 7
    resumed = embedpipe("tokenize", config, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"({listed} already done)" in resumed.stdout
    want = digests(tmp_path / "clean" / "tokens", "*")
    assert len([n for n in want if n.endswith(".arrow")]) == 7
    assert digests(tmp_path / "killed" / "tokens", "*") == want
    verified = embedpipe("verify", str(tmp_path / "killed"))
    assert verified.returncode == 0, verified.stdout
    # One worker instead of two: the same blocks, byte for byte.
    alone = embedpipe("tokenize", _config(tmp_path, "one-worker", cpus=1), "--no-progress")
    assert alone.returncode == 0, alone.stderr
    assert digests(tmp_path / "one-worker" / "tokens", "*") == want
