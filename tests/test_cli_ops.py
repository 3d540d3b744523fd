"""The launcher for people and schedulers, in real subprocesses: help, exit codes, plan, logs, reports,
incremental runs, and the live progress display on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from cli_runs import REPO, cli_env, digests, embedpipe, manifest
from tiny_models import build_tiny_bert

COMMANDS = ("run", "tokenize", "embed", "plan", "status", "verify", "inspect", "plot")


def _jsonl(path: Path, first: int, count: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "text": f"row {i} " + "word " * (i % 17)}) + "\n"
                            for i in range(first, first + count)))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ops")
    model = build_tiny_bert(root / "tiny-bert")
    inputs = root / "inputs"
    inputs.mkdir()
    _jsonl(inputs / "a.jsonl", 0, 70)
    _jsonl(inputs / "c.jsonl", 0, 50)
    config = root / "job.yaml"
    config.write_text(
        f"input: {{path: '{inputs}/*.jsonl', id_column: id}}\n"
        "output: {path: unused, shard_rows: 30}\n"
        "tokenizer: {max_length: 32}\n"
        f"encoder: {{model: {model}}}\n"
    )
    return {"root": root, "config": str(config), "inputs": inputs}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    done = embedpipe(command, "--help")
    assert done.returncode == 0 and "Example" in done.stdout, done.stdout


def test_exit_codes(setup, tmp_path):
    assert embedpipe("run", setup["config"], "--set", "tokenizer.padding=sideways").returncode == 2
    assert embedpipe("status", str(tmp_path / "nowhere")).returncode == 2
    too_strict = embedpipe("tokenize", setup["config"], "-o", str(tmp_path / "q"), "--set",
                           "input.max_text_bytes=20", "--set", "input.max_quarantined=0")
    assert too_strict.returncode == 1 and "input.max_quarantined" in too_strict.stderr
    report = json.loads(next((tmp_path / "q" / "reports").glob("*.json")).read_text())
    assert report["exit_status"] == 1 and "max_quarantined" in report["error"]


def test_plan_writes_nothing_and_predicts_the_run(setup, tmp_path):
    out = tmp_path / "out"
    done = embedpipe("plan", setup["config"], "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert not out.exists()
    preview = json.loads(done.stdout)
    assert preview["rows"] == 120 and len(preview["units"]) == 5 and preview["rerun"].startswith("fresh")
    assert embedpipe("run", setup["config"], "-o", str(out), "--no-progress").returncode == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    again = json.loads(embedpipe("plan", setup["config"], "-o", str(out), "--json", "--no-estimate").stdout)
    assert again["rerun"].startswith("nothing to do") and again["would_skip"] == {"tokens": 5, "embeddings": 5}
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [u["shard"] for u in preview["units"]] == sorted(manifest(out)["stages"]["tokens"]["shards"])


@pytest.mark.slow  # whole CLI runs (~45 s / ~13 s): the default suite stays under 10 minutes
def test_plan_and_status_predict_what_run_redoes_on_a_damaged_output(setup, tmp_path):
    out = tmp_path / "out"
    assert embedpipe("run", setup["config"], "-o", str(out), "--no-progress").returncode == 0
    undisturbed = {stage: digests(out / stage) for stage in ("tokens", "embeddings")}
    damaged = sorted(undisturbed["tokens"])[2]
    shard = out / "tokens" / damaged
    data = bytearray(shard.read_bytes())
    data[-9] ^= 0xFF  # same size, other bytes: only a checksum tells
    shard.write_bytes(bytes(data))
    # the embedding shard made from the damaged token shard is still intact, yet it must be redone too
    preview = json.loads(embedpipe("plan", setup["config"], "-o", str(out), "--json", "--no-estimate").stdout)
    assert preview["would_skip"] == {"tokens": 4, "embeddings": 4}, preview["rerun"]
    done = embedpipe("run", setup["config"], "-o", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "tokens: 5 shards" in done.stdout and done.stdout.count("(4 already done)") == 2, done.stdout
    assert {stage: digests(out / stage) for stage in ("tokens", "embeddings")} == undisturbed
    # status (sizes only) cannot see a same-size edit, but does see an embedding made from another token shard
    (out / "tokens" / damaged).unlink()
    status = json.loads(embedpipe("status", str(out), "--json").stdout)
    by_stage = {s["stage"]: s for s in status["stages"]}
    assert by_stage["tokens"]["damaged"] == [damaged] and by_stage["embeddings"]["damaged"] == []
    assert by_stage["embeddings"]["stale"] == [damaged] and by_stage["embeddings"]["committed"] == 4
    preview = json.loads(embedpipe("plan", setup["config"], "-o", str(out), "--json", "--no-estimate").stdout)
    assert preview["would_skip"] == {"tokens": 4, "embeddings": 4}


def test_json_logs_and_the_run_report_agree_with_the_manifest(setup, tmp_path):
    out = tmp_path / "out"
    done = embedpipe("run", setup["config"], "-o", str(out), "--no-progress", "--log-format", "json")
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    events = [e.get("event") for e in entries]
    assert "plan" in events and "progress" in events and events[-1] == "run_report"
    assert all({"ts", "level", "message"} <= set(e) for e in entries)
    reports = list((out / "reports").glob("*.json"))
    assert len(reports) == 1
    report, record = json.loads(reports[0].read_text()), manifest(out)
    assert report["exit_status"] == 0 and report["counts"] == record["counts"]
    for stage in ("tokens", "embeddings"):
        assert report["stages"][stage]["rows"] == record["stages"][stage]["totals"]["rows"] == 120
        assert report["stages"][stage]["seconds"] > 0 and report["stages"][stage]["rows_per_s"] > 0
    assert report["cluster"]["cpus"] >= 1 and report["peak_rss_mb"]["largest_process"] > 50
    noop = embedpipe("run", setup["config"], "-o", str(out), "--no-progress", "--log-format", "json")
    second = max((out / "reports").glob("*.json"))
    assert json.loads(second.read_text())["nothing_to_do"] and "nothing to do" in noop.stdout


@pytest.mark.slow
def test_incremental_run_adds_shards_only_for_new_files(setup, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a.jsonl", "c.jsonl"):
        (inputs / name).write_bytes((setup["inputs"] / name).read_bytes())
    args = ("run", setup["config"], "--set", f"input.path={inputs}/*.jsonl", "-o", str(tmp_path / "out"),
            "--no-progress")
    out = tmp_path / "out"
    assert embedpipe(*args).returncode == 0
    before = {stage: digests(out / stage) for stage in ("tokens", "embeddings")}
    _jsonl(inputs / "b.jsonl", 0, 40)  # sorts between the old files
    done = embedpipe(*args)
    assert done.returncode == 0, done.stderr
    assert "incremental: 1 new input files -> 2 new units" in done.stderr
    for stage, old in before.items():
        now = digests(out / stage)
        assert {k: now[k] for k in old} == old  # committed shards untouched
        assert sorted(set(now) - set(old)) == ["data-00005-of-00007.arrow", "data-00006-of-00007.arrow"]
    record = manifest(out)
    assert record["increments"][0]["files"] == ["b.jsonl"] and record["counts"]["rows_in"] == 160
    assert embedpipe("verify", str(out)).returncode == 0
    import datasets

    assert len(datasets.load_from_disk(str(out / "tokens"))) == 160
    assert "nothing to do" in embedpipe(*args).stdout
    (inputs / "a.jsonl").write_text((inputs / "a.jsonl").read_text() + '{"id": "late", "text": "x"}\n')
    changed = embedpipe(*args)
    assert changed.returncode == 2 and "input files" in changed.stderr  # an old file changed: not incremental


def _run_on_a_pty(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Run a command with a pseudo-terminal as its stdout and stderr; return everything it drew."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows x 120 columns
    process = subprocess.Popen(args, cwd=REPO, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    drawn, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the command has exited and closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(leader)
    assert process.returncode == 0, drawn.decode(errors="replace")[-2000:]
    return drawn.decode("utf-8", errors="replace")


def test_progress_bars_update_on_a_terminal(setup, tmp_path):
    drawn = _run_on_a_pty([sys.executable, "-m", "jobs.cli", "run", setup["config"], "-o", str(tmp_path / "out"),
                           "--set", "output.shard_rows=10"], cli_env(COLUMNS="120"))
    assert "tokenize" in drawn and "embed" in drawn and "shard" in drawn
    assert drawn.count("\r") >= 4  # the bars were redrawn in place
    assert "rows/s" in drawn and "12/12" in drawn
    assert "tokens: 12 shards" in drawn and "embeddings: 12 shards" in drawn  # the summary lines
