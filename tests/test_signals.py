"""SIGTERM and SIGINT mid-run: exit 143 / 130 with one clear line, a run report, the manifest marked
interrupted, the lock released, no process of the job left; the rerun finishes byte-identical to an
undisturbed run. Real CLI runs with the real MiniLM (its shards take long enough to be caught in flight).
Behind the ``faults`` marker."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
from cli_runs import REPO, embedpipe, manifest, output_files, start_embedpipe

pytestmark = pytest.mark.faults

ROWS, SHARD_ROWS = 1200, 60


EXECUTORS = ("local", "ray")


@pytest.fixture(scope="module")
def job(tmp_path_factory, request) -> dict:
    """The default MiniLM job on 1,200 rows, on the executor the test is parametrized with."""
    root = tmp_path_factory.mktemp(f"signals-{request.param}")
    corpus = root / "corpus.jsonl"
    sample = [json.loads(line)["text"] for line in (REPO / "pipeline/sample_data/corpus.jsonl").open()]
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": sample[i % len(sample)]}) + "\n"
                              for i in range(ROWS)))
    args = ["conf/default.yaml", "--set", f"input.path={corpus}", "--set", "input.id_column=id",
            "--set", f"output.shard_rows={SHARD_ROWS}", "--set", "tokenizer.max_length=128", "--no-progress",
            "--set", f"ray.executor={request.param}"]
    reference = root / "reference"
    done = embedpipe("run", *args, "-o", str(reference), "--log-format", "json", timeout=600)
    assert done.returncode == 0, done.stderr
    return {"args": args, "reference": output_files(reference), "log": done.stderr}


@pytest.mark.parametrize("job", EXECUTORS, indirect=True)
def test_progress_lines_come_at_most_every_5_s_per_stage(job):
    """The README's promise for logs of scheduled runs (no terminal): one progress line per stage per 5 s,
    and the stage's last line whenever it finishes. Read from the undisturbed run's JSON log."""
    from datetime import datetime

    events = [json.loads(line) for line in job["log"].splitlines() if '"progress"' in line]
    for stage in ("tokenize", "embed"):
        times = [datetime.fromisoformat(e["ts"]) for e in events
                 if e["stage"] == stage and e["shards_done"] < e["shards_total"]]
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
        assert all(gap >= 5.0 for gap in gaps), (stage, gaps)
        assert any(e["stage"] == stage and e["shards_done"] == e["shards_total"] for e in events), stage
    assert len([e for e in events if e["stage"] == "embed"]) >= 3  # enough lines for the gaps to mean something


def _committed(out: Path, stage: str) -> int:
    try:
        return len(manifest(out)["stages"][stage]["shards"])
    except (FileNotFoundError, KeyError, ValueError):
        return 0


@pytest.mark.parametrize("job", EXECUTORS, indirect=True)
@pytest.mark.parametrize("signum,code,grace", [(signal.SIGTERM, 143, "10"), (signal.SIGINT, 130, "0")])
def test_a_signal_mid_run_stops_cleanly_and_the_rerun_resumes(job, tmp_path, signum, code, grace):
    out = tmp_path / "out"
    proc = start_embedpipe("run", *job["args"], "-o", str(out), "--grace", grace)
    shards = ROWS // SHARD_ROWS
    deadline = time.monotonic() + 300
    while _committed(out, "embeddings") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be interrupted"
    family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    sent = time.monotonic()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == code, stderr[-3000:]
    assert took < float(grace) + 30, f"stopping took {took:.0f} s"
    lines = [line for line in stderr.splitlines() if line.startswith("embedpipe:")]
    assert lines and f"interrupted by {signal.Signals(signum).name}" in lines[-1] and "resume" in lines[-1]
    assert "Traceback" not in stderr and "core dumped" not in stderr.lower()
    record = manifest(out)
    committed = len(record["stages"]["embeddings"]["shards"])
    assert record["status"] == "interrupted" and 2 <= committed < shards
    assert record["last_run"]["status"] == "interrupted"
    reports = sorted((out / "reports").glob("*.json"))
    assert reports and json.loads(reports[-1].read_text())["exit_status"] == code
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in family if psutil.pid_exists(p)], timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    status = json.loads(embedpipe("status", str(out), "--json").stdout)
    assert status["job_status"] == "interrupted" and status["lock"] is None
    rerun = embedpipe("run", *job["args"], "-o", str(out), timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({committed} already done)" in rerun.stdout
    assert output_files(out) == job["reference"]
    assert embedpipe("verify", str(out)).returncode == 0
