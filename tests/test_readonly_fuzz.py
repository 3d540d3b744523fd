"""Every read-only command (status, verify, inspect, plot, plan) on a foreign, partial or damaged output:
findings and an exit code, never a traceback. A small seeded fuzz over the manifest and the shard bytes."""

from __future__ import annotations

import json
import random
import shutil
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import build_tiny_bert

from jobs.cli import main
from pipeline.config import validate_config
from pipeline.run.driver import run_job

CASES = 24


@pytest.fixture(scope="module")
def good(ray_cluster, tmp_path_factory) -> dict:
    """A finished output whose second shard holds 0 rows (every row of its unit quarantined)."""
    root = tmp_path_factory.mktemp("fuzz")
    model = build_tiny_bert(root / "tiny-bert")
    corpus = root / "c.jsonl"
    rows = [{"id": f"r{i}", "text": f"row {i} " + "word " * (i % 9)} for i in range(20)]
    rows += [{"id": f"bad{i}", "text": None} for i in range(10)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "good"
    settings = {"input": {"path": str(corpus), "id_column": "id", "max_quarantined": 0.5},
                "output": {"path": str(out), "shard_rows": 10}, "tokenizer": {"max_length": 16},
                "encoder": {"model": str(model)}}
    run_job(validate_config(settings))
    config = root / "job.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    assert any(s["rows"] == 0 for s in json.loads((out / "manifest.json").read_text())
               ["stages"]["tokens"]["shards"].values())
    return {"out": out, "config": str(config)}


def _damage(out: Path, rng: random.Random) -> str:
    manifest = out / "manifest.json"
    shards = sorted(out.glob("*/data-*.arrow"))
    kind = rng.choice(["truncated manifest", "manifest of another shape", "foreign manifest", "truncated shard",
                       "flipped bytes", "shard removed", "metadata junk", "empty stage folder"])
    if kind == "truncated manifest":
        data = manifest.read_bytes()
        manifest.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "manifest of another shape":
        record = json.loads(manifest.read_text())
        part = rng.choice(["plan", "stages", "units", "shard"])
        if part == "plan":
            record["plan"] = rng.choice([None, [], {"units": 3, "shards": "x"}])
        elif part == "stages":
            record["stages"] = rng.choice([[], {"tokens": []}, {"tokens": {"shards": {"a": 1}}}])
        elif part == "units":
            record["plan"]["units"] = [rng.choice([1, "x", None])]
        else:
            name = next(iter(record["stages"]["tokens"]["shards"]))
            record["stages"]["tokens"]["shards"][name][rng.choice(["rows", "bytes", "sha256", "name"])] = None
        manifest.write_text(json.dumps(record))
    elif kind == "foreign manifest":
        manifest.write_text(json.dumps(rng.choice([[], 1, "x", None, {"name": "my project"}])))
    elif kind == "truncated shard":
        shard = rng.choice(shards)
        data = shard.read_bytes()
        shard.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "flipped bytes":
        shard = rng.choice(shards)
        data = bytearray(shard.read_bytes())
        for _ in range(rng.randint(1, 50)):
            data[rng.randrange(len(data))] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif kind == "shard removed":
        rng.choice(shards).unlink()
    elif kind == "metadata junk":
        (out / rng.choice(["tokens", "embeddings"]) / rng.choice(["dataset_info.json", "state.json"])).write_text("{no")
    else:
        shutil.rmtree(out / "embeddings")
        (out / "embeddings").mkdir()
    return kind


def test_read_only_commands_give_findings_never_a_traceback(good, tmp_path):
    rng = random.Random(7)
    runner = CliRunner()
    seen = set()
    for case in range(CASES):
        out = tmp_path / f"case{case}"
        shutil.copytree(good["out"], out)
        kind = _damage(out, rng)
        seen.add(kind)
        commands = [["status", str(out)], ["verify", str(out)], ["inspect", str(out)],
                    ["inspect", str(out / "tokens")], ["plan", good["config"], "-o", str(out), "--no-estimate"],
                    ["plot", str(out), "--out", str(tmp_path / "p.png"), "--sample", "5", "--labels", "0"]]
        for command in commands:
            result = runner.invoke(main, command)
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                trace = "".join(traceback.format_exception(result.exception))
                pytest.fail(f"case {case} ({kind}): embedpipe {' '.join(command[:1])} raised\n{trace[-2000:]}")
            assert result.exit_code in (0, 1, 2), (kind, command, result.output)
            if command[0] == "verify":
                assert result.exit_code != 0, (kind, result.output)  # every damage here is a finding
    assert len(seen) >= 6


def test_verify_and_status_of_an_undamaged_output_with_an_empty_shard(good):
    runner = CliRunner()
    assert runner.invoke(main, ["verify", str(good["out"])]).exit_code == 0
    assert runner.invoke(main, ["status", str(good["out"])]).exit_code == 0
