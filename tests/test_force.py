"""--force and the output directory: embedpipe deletes and overwrites only what it wrote, and only once the job
cannot be refused any more; changed encoder settings redo the embeddings alone. Real CLI runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cli_runs import digests, embedpipe, manifest, output_files
from tiny_models import build_tiny_bert


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative names), the manifest and reports left out."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and "reports" not in p.parts and p.name != ".lock"}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("force")
    model = build_tiny_bert(root / "tiny-bert")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"r{i}", "text": f"row {i} " + "word " * (i % 13)}) + "\n"
                              for i in range(60)))
    config = root / "job.yaml"
    config.write_text(f"input: {{path: '{corpus}', id_column: id}}\noutput: {{path: unused, shard_rows: 25}}\n"
                      f"tokenizer: {{max_length: 32}}\nencoder: {{model: {model}}}\n")
    return {"root": root, "config": str(config), "model": model}


def _cli(job: dict, command: str, out: Path, *extra: str):
    return embedpipe(command, job["config"], "-o", str(out), "--no-progress", *extra)


def test_user_files_where_a_job_writes_are_never_touched(job, tmp_path):
    out = tmp_path / "out"
    (out / "tokens").mkdir(parents=True)
    (out / "tokens" / "mine.txt").write_text("mine")
    (out / "quarantine").mkdir()
    (out / "quarantine" / "x.txt").write_text("x")
    before = _tree(out)
    for force in ((), ("--force",)):
        done = _cli(job, "tokenize", out, *force)
        assert done.returncode == 2, done.stderr
        assert "tokens/mine.txt" in done.stderr and "quarantine/x.txt" in done.stderr
        assert _tree(out) == before and not (out / "manifest.json").exists()


def test_a_manifest_embedpipe_did_not_write_is_never_overwritten(job, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my project"}')
    for force in ((), ("--force",)):
        done = _cli(job, "tokenize", out, *force)
        assert done.returncode == 2 and "not an embedpipe manifest" in done.stderr, done.stderr
        assert (out / "manifest.json").read_text() == '{"name": "my project"}'
        assert not (out / "tokens").exists()


@pytest.mark.slow
def test_a_directory_of_other_files_needs_force_and_keeps_them(job, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("notes")
    (out / "data").mkdir()
    (out / "data" / "raw.jsonl").write_text("{}\n")
    refused = _cli(job, "tokenize", out)
    assert refused.returncode == 2 and "notes.txt" in refused.stderr and "--force" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data", "notes.txt"]
    done = _cli(job, "tokenize", out, "--force")
    assert done.returncode == 0, done.stderr
    assert (out / "notes.txt").read_text() == "notes" and (out / "data" / "raw.jsonl").read_text() == "{}\n"
    assert embedpipe("verify", str(out)).returncode == 0


@pytest.mark.slow
def test_force_on_another_job_removes_only_what_embedpipe_wrote(job, tmp_path):
    out = tmp_path / "out"
    assert _cli(job, "tokenize", out).returncode == 0
    (out / "tokens" / "mine.txt").write_text("mine")
    (out / "README.md").write_text("about this output")
    old_shards = digests(out / "tokens")
    refused = _cli(job, "tokenize", out, "--set", "tokenizer.max_length=16")
    assert refused.returncode == 2 and "--force" in refused.stderr
    done = _cli(job, "tokenize", out, "--set", "tokenizer.max_length=16", "--force")
    assert done.returncode == 0, done.stderr
    assert (out / "tokens" / "mine.txt").read_text() == "mine" and (out / "README.md").exists()
    new_shards = digests(out / "tokens")
    assert new_shards.keys() == old_shards.keys() and all(new_shards[k] != old_shards[k] for k in old_shards)
    assert manifest(out)["config"]["tokenizer"]["max_length"] == 16


@pytest.mark.slow
def test_changed_encoder_settings_redo_only_the_embeddings(job, tmp_path):
    out = tmp_path / "out"
    assert _cli(job, "run", out).returncode == 0
    tokens_before = {k: v for k, v in output_files(out).items() if not k.startswith("embeddings/")}
    embeddings_before = digests(out / "embeddings")
    # a tokenize-only rerun does not care about the encoder
    assert _cli(job, "tokenize", out, "--set", "encoder.normalize=true").returncode == 0
    refused = _cli(job, "embed", out, "--set", "encoder.normalize=true")
    assert refused.returncode == 2 and "encoder.normalize" in refused.stderr and "tokens are kept" in refused.stderr
    preview = json.loads(embedpipe("plan", job["config"], "-o", str(out), "--stages", "embed", "--json",
                                   "--no-estimate", "--set", "encoder.normalize=true").stdout)
    assert preview["rerun"].startswith("refused") and "encoder.normalize" in preview["rerun"]
    done = _cli(job, "embed", out, "--set", "encoder.normalize=true", "--force")
    assert done.returncode == 0, done.stderr
    assert {k: v for k, v in output_files(out).items() if not k.startswith("embeddings/")} == tokens_before
    after = digests(out / "embeddings")
    assert after.keys() == embeddings_before.keys() and all(after[k] != embeddings_before[k] for k in after)
    assert manifest(out)["config"]["encoder"]["normalize"] is True
    assert embedpipe("verify", str(out)).returncode == 0
    # and the same settings again: nothing to do
    again = _cli(job, "run", out, "--set", "encoder.normalize=true")
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 2, again.stdout


@pytest.mark.slow
def test_a_refused_force_deletes_nothing(job, tmp_path):
    out = tmp_path / "out"
    assert _cli(job, "run", out).returncode == 0
    before = _tree(out)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(job["model"], no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    done = _cli(job, "run", out, "--set", f"encoder.model={no_weights}", "--force")
    assert done.returncode == 2 and "holds no weights" in done.stderr, done.stderr
    assert _tree(out) == before
    assert manifest(out)["status"] == "complete" and embedpipe("verify", str(out)).returncode == 0
