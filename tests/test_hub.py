"""Models and tokenizers by hub id (pipeline.hub): tiny models saved into a real Hugging Face cache layout
under a temporary HF_HOME, resolved offline by huggingface_hub itself (HF_HUB_OFFLINE=1, set by conftest)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runs import cli_env, digests, embedpipe
from tiny_models import build_tiny_bert

from pipeline.config import validate_config
from pipeline.encode.models import load_encoder
from pipeline.encode.stage import ShardEncoder, plan_embed
from pipeline.errors import ConfigError
from pipeline.hub import fetch_model, is_hub_id, pin_revisions
from pipeline.inputs.discovery import discover
from pipeline.output.manifest import new_manifest
from pipeline.run.increments import plan_job
from pipeline.tokenize.loading import load_tokenize_spec
from pipeline.tokenize.stage import ReadSpec, run_unit

REPO_ID = "tiny-org/tiny-bert"
# Two commits of the repo: v1 (the tag) and the newer one main points at; each a different seed's weights.
OLD, NEW = (hashlib.sha1(tag.encode()).hexdigest() for tag in ("v1", "v2"))
TEXTS = ["the cat sat on the mat", "a dog ran fast", "", "machine learning models need data", "ok"]


def _snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs: dict[str, str]) -> Path:
    """Copy ``source`` into ``cache`` as huggingface_hub lays a download out: snapshots/<commit>/, refs/<name>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref, sha in refs.items():
        (repo / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The two local model directories (seed 0 = v1, seed 1 = main)."""
    root = tmp_path_factory.mktemp("hub-models")
    return {"v1": build_tiny_bert(root / "v1", seed=0), "main": build_tiny_bert(root / "main", seed=1)}


@pytest.fixture
def hf_home(tmp_path, built, monkeypatch) -> Path:
    """A temporary HF_HOME holding the repo at two commits, for this process and the CLI processes it starts."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    _snapshot(cache, REPO_ID, OLD, built["v1"], {"v1": OLD})
    _snapshot(cache, REPO_ID, NEW, built["main"], {"main": NEW})
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub reads HF_HOME once, at import (long done in this process): point it at the same cache.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return home


def _corpus(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def _config(tmp_path: Path, model: str, **encoder):
    return validate_config({"input": {"path": str(_corpus(tmp_path / "c.jsonl")), "id_column": "id"},
                            "output": {"path": str(tmp_path / "out")}, "tokenizer": {"max_length": 16},
                            "encoder": {"model": model, "pooling": "mean", **encoder}})


def _tokenize_and_embed(config, out: Path) -> dict[str, str]:
    """Both stages of the job's one shard in this process, with the stage functions a run's tasks and actors call."""
    config, _ = pin_revisions(config)
    (out / "embeddings").mkdir(parents=True)
    spec = load_tokenize_spec(config)
    plan = plan_job(discover(config.input.path), config.output.shard_rows, None)
    (unit,), (name,) = plan.units, plan.names
    run_unit(unit, name, ReadSpec("text", "id"), spec, str(out))
    ShardEncoder(plan_embed(config, spec, "cpu", 1)).embed_shard(str(out), name)
    return {f"{stage}/{n}": d for stage in ("tokens", "embeddings") for n, d in digests(out / stage).items()}


def test_a_hub_id_gives_the_bytes_of_its_local_directory(hf_home, built, tmp_path):
    hub = _tokenize_and_embed(_config(tmp_path / "a", REPO_ID), tmp_path / "a" / "out")
    local = _tokenize_and_embed(_config(tmp_path / "b", str(built["main"])), tmp_path / "b" / "out")
    assert len(hub) == 2 and hub == local
    older = _tokenize_and_embed(_config(tmp_path / "c", REPO_ID, revision="v1"), tmp_path / "c" / "out")
    assert older["embeddings/data-00000-of-00001.arrow"] != hub["embeddings/data-00000-of-00001.arrow"]


def test_revision_picks_the_snapshot_and_workers_load_that_commit(hf_home, built, tmp_path):
    config, pinned = pin_revisions(_config(tmp_path, REPO_ID, revision="v1"))
    assert config.encoder.revision == config.tokenizer.revision == OLD  # the tokenizer follows the encoder's
    assert pinned == {"encoder": {"name": REPO_ID, "revision": "v1", "commit": OLD},
                      "tokenizer": {"name": REPO_ID, "revision": "v1", "commit": OLD}}
    spec = plan_embed(config, load_tokenize_spec(config), "cpu", 1)
    assert spec.hub_model == (REPO_ID, OLD) and Path(spec.model_dir).name == OLD
    # Fetched again as a worker does, from "its node's" cache at the commit (torch's linear layers: comparable).
    worker = ShardEncoder(dataclasses.replace(spec, cpu_linear="torch")).model
    expected = load_encoder(built["v1"]).state_dict()
    assert all(torch.equal(worker.state_dict()[k], v) for k, v in expected.items())
    # A tokenizer named apart from the encoder takes its own revision (main unless tokenizer.revision says).
    _, apart = pin_revisions(validate_config({"input": {"path": "x"}, "tokenizer": {"name": REPO_ID},
                                              "encoder": {"model": str(built["v1"])}}))
    assert apart == {"tokenizer": {"name": REPO_ID, "revision": "main", "commit": NEW}}


def test_the_manifest_holds_the_commit_and_a_moved_main_is_another_job(hf_home, built, tmp_path):
    config = _config(tmp_path, REPO_ID)
    pinned, models = pin_revisions(config)
    files = discover(config.input.path)
    plan = plan_job(files, config.output.shard_rows, None)
    manifest = new_manifest(pinned, files, plan.units, "t" * 64, plan.names, models)
    assert manifest["models"]["encoder"] == {"name": REPO_ID, "revision": "main", "commit": NEW}
    assert manifest["models"]["tokenizer"]["commit"] == NEW
    assert manifest["config"]["encoder"]["revision"] == manifest["config"]["tokenizer"]["revision"] == NEW
    assert pin_revisions(config)[0].output_hash() == pinned.output_hash()  # main unmoved: the same job

    (hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "refs" / "main").write_text(OLD)  # main moves
    moved = pin_revisions(config)[0]
    assert moved.encoder.revision == OLD
    assert moved.output_hash() != pinned.output_hash()
    before, after = pinned.stage_hashes(), moved.stage_hashes()
    assert before["tokens"] != after["tokens"] and before["embeddings"] != after["embeddings"]
    # Commands reading the output (inspect, export, the training collator) load the commit the job used.
    from pipeline.ops.inspect import load_decoder

    assert Path(load_decoder(manifest).tokenizer.name_or_path).name == NEW


def test_local_directories_and_aliases_hash_as_before_revisions_existed(built, tmp_path):
    config = _config(tmp_path, str(built["main"]))
    assert pin_revisions(config) == (config, {})
    dumped = config.model_dump(mode="json")
    assert "revision" not in dumped["encoder"] and "revision" not in dumped["tokenizer"]
    assert not is_hub_id("minilm") and not is_hub_id(str(built["main"])) and is_hub_id(REPO_ID)
    with pytest.raises(ConfigError, match="encoder.revision: 'v1' is set, but encoder.model"):
        pin_revisions(_config(tmp_path, str(built["main"]), revision="v1"))


def test_remote_code_is_refused_before_the_weights(hf_home, built, tmp_path):
    """Only the small files are cached: the auto_map refusal comes from them, before any weight is looked for."""
    small = tmp_path / "small"
    small.mkdir()
    for path in built["main"].glob("*.json"):
        shutil.copy(path, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling.MyModel"}}))
    commit = hashlib.sha1(b"remote").hexdigest()
    _snapshot(hf_home / "hub", "tiny-org/remote", commit, small, {"main": commit})
    with pytest.raises(ConfigError, match=r"'tiny-org/remote' .* asks for remote code .* refused before downloading"):
        fetch_model("tiny-org/remote", commit)
    # Allowed, the next step is the weights, which this cache lacks: named as such, with the way to fetch them.
    with pytest.raises(ConfigError, match=r"no \*\.safetensors weights in the Hugging Face cache .*hf download"):
        fetch_model("tiny-org/remote", commit, trust_remote_code=True)


def test_a_model_neither_cached_nor_reachable_exits_2_naming_it(hf_home, tmp_path):
    """A real `embedpipe plan` process (no Ray), offline, with HF_HOME from the environment."""
    corpus = _corpus(tmp_path / "c.jsonl")
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{path: {corpus}}}\nencoder: {{model: tiny-org/absent, revision: v9}}\n")
    result = embedpipe("plan", str(config), env=cli_env(HF_HOME=str(hf_home)))
    assert result.returncode == 2, result.stderr
    assert "tiny-org/absent" in result.stderr and "'v9'" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_resolves_hub_ids_from_the_environments_hf_home(hf_home, tmp_path):
    """`embedpipe plan` in a fresh process: HF_HOME from the environment, the commits shown, no Ray started."""
    corpus = _corpus(tmp_path / "c.jsonl")
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{path: {corpus}}}\ntokenizer: {{max_length: 16}}\n"
                      f"encoder: {{model: {REPO_ID}, revision: v1}}\n")
    # The tokenize stage's plan: no model weights read, yet the encoder is resolved too (the hashes need it).
    result = embedpipe("plan", str(config), "--json", "--stages", "tokenize", "-o", str(tmp_path / "out"),
                       env=cli_env(HF_HOME=str(hf_home)))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["models"]["encoder"] == {"name": REPO_ID, "revision": "v1", "commit": OLD}
    assert plan["models"]["tokenizer"]["commit"] == OLD and plan["rerun"] == "fresh output: every shard would be written"

