"""The local executor (pipeline/run/local_engine.py): real worker processes, real kills, no Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import engine_tasks
import psutil
import pytest

from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.run.engine import WORKER_ENV, TaskFailed, WorkerLost
from pipeline.run.executor import choose_executor
from pipeline.run.local_engine import LocalEngine

TESTS = str(Path(__file__).parent)


@pytest.fixture
def engine():
    # The workers import engine_tasks from the tests folder, as a job's workers import pipeline.
    env = {**WORKER_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))}
    engine = LocalEngine(2, env=env)
    yield engine
    engine.shutdown()


def _get_all(engine, refs):
    return [engine.get(ref) for ref in refs]


def test_tasks_run_in_worker_processes_and_return_their_results(engine):
    refs = [engine.submit(engine_tasks.square, i, num_cpus=1) for i in range(6)]
    assert _get_all(engine, refs) == [i * i for i in range(6)]
    assert engine.get(engine.submit(engine_tasks.env, "RAYON_NUM_THREADS", num_cpus=1)) == "1"


def test_cpu_slots_bound_how_many_tasks_run_at_once(engine):
    spans = _get_all(engine, [engine.submit(engine_tasks.stamp, 0.3, num_cpus=1) for _ in range(4)])
    # Two CPU slots: at no moment do three 1-CPU tasks overlap; two do.
    events = sorted([(start, 1) for _, start, _ in spans] + [(end, -1) for _, _, end in spans])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak == 2
    assert len({pid for pid, _, _ in spans}) == 2  # idle workers are reused, not started per task


def test_a_task_that_raises_fails_with_its_exception(engine):
    with pytest.raises(TaskFailed) as failed:
        engine.get(engine.submit(engine_tasks.fail, "bad row 7", num_cpus=1))
    assert isinstance(failed.value.cause, ValueError) and "bad row 7" in str(failed.value.cause)
    assert engine.get(engine.submit(engine_tasks.square, 3, num_cpus=1)) == 9  # the worker is still usable


def test_a_killed_worker_is_reported_lost_and_the_engine_goes_on(engine):
    lost = engine.submit(engine_tasks.die, num_cpus=1)
    with pytest.raises(WorkerLost, match="killed by signal 9"):
        engine.get(lost)
    # Its CPU slot came back: two more tasks still run side by side.
    assert _get_all(engine, [engine.submit(engine_tasks.square, i, num_cpus=1) for i in (4, 5)]) == [16, 25]


def test_results_passed_as_task_arguments_are_resolved(engine):
    parts = [engine.submit(engine_tasks.square, i, num_cpus=1) for i in (1, 2, 3)]
    engine.wait(parts, timeout=30)
    for ref in parts:
        engine.get(ref)
    assert engine.get(engine.submit(engine_tasks.add, *parts, 10, num_cpus=0.25)) == 24


def test_an_actor_keeps_its_state_and_answers_calls_in_order(engine):
    actor = engine.start_actor(engine_tasks.Counter, 10, resources={"num_cpus": 0.5})
    refs = [engine.call(actor, "bump", i) for i in (1, 2, 3)]
    assert _get_all(engine, refs) == [11, 13, 16]
    value, pid = engine.call(actor, "pair", num_returns=2)
    assert engine.get(value) == 16 and engine.get(pid) != os.getpid()


def test_a_killed_actor_fails_its_queued_calls_and_gives_its_slots_back(engine):
    actor = engine.start_actor(engine_tasks.Counter, 0, resources={"num_cpus": 2})
    dying, queued = engine.call(actor, "die"), engine.call(actor, "bump", 1)
    for ref in (dying, queued):
        with pytest.raises(WorkerLost):
            engine.get(ref)
    with pytest.raises(WorkerLost):  # a call on a dead actor fails at once
        engine.get(engine.call(actor, "bump", 1))
    # The actor booked both CPUs; a 1-CPU task runs only because its death gave them back.
    assert engine.get(engine.submit(engine_tasks.square, 7, num_cpus=1)) == 49


def test_an_actor_whose_constructor_fails_fails_every_call_with_that_error(engine):
    actor = engine.start_actor(engine_tasks.BrokenActor, resources={"num_cpus": 0})
    with pytest.raises(TaskFailed, match="cannot start"):
        engine.get(engine.call(actor, "ping"))


def test_workers_ignore_sigint_the_driver_decides(engine):
    assert engine.get(engine.submit(engine_tasks.interrupt_self_then_answer, num_cpus=1)) == "still here"


def test_shutdown_leaves_no_worker_behind(engine):
    actor = engine.start_actor(engine_tasks.Counter, 0, resources={"num_cpus": 0.5})
    busy = engine.submit(engine_tasks.stamp, 30, num_cpus=1)  # still running at shutdown
    engine.get(engine.call(actor, "bump", 1))
    engine.wait([busy], timeout=0.2)
    pids = [w.process.pid for w in engine._workers]
    assert len(pids) >= 2 and all(psutil.Process(pid).ppid() == os.getpid() for pid in pids)
    engine.shutdown()
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_workers_die_with_a_killed_driver(tmp_path):
    """kill -9 of the driver takes its workers with it (PR_SET_PDEATHSIG): none is left to write into OUT."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {TESTS!r})\n"
        "import engine_tasks\n"
        "from pipeline.run.local_engine import LocalEngine\n"
        f"engine = LocalEngine(2, env={{'PYTHONPATH': {TESTS!r} + os.pathsep + os.environ.get('PYTHONPATH', '')}})\n"
        "ref = engine.submit(engine_tasks.stamp, 60, num_cpus=1)\n"
        "engine.wait([ref], timeout=1.0)\n"
        "print(' '.join(str(w.process.pid) for w in engine._workers), flush=True)\n"
        "time.sleep(60)\n")
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker_pids = [int(p) for p in driver.stdout.readline().split()]
    assert worker_pids
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in worker_pids):
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in worker_pids)


def _job(**ray) -> dict:
    return {"input": {"path": "x.jsonl"}, "ray": ray}


def test_auto_picks_local_without_a_cluster_and_ray_with_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever this machine has
    monkeypatch.setitem(sys.modules, "ray", None)  # not initialized in this process
    assert choose_executor(validate_config(_job())) == "local"
    assert choose_executor(validate_config(_job(address="ray://head:10001"))) == "ray"
    assert choose_executor(validate_config(_job(executor="ray"))) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert choose_executor(validate_config(_job())) == "ray"


def test_an_explicit_local_executor_wins_over_ray_address_and_says_so(monkeypatch, caplog):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with caplog.at_level("WARNING", logger="embedpipe"):
        assert choose_executor(validate_config(_job(executor="local"))) == "local"
    assert "RAY_ADDRESS is 'ray://head:10001', but ray.executor: local" in caplog.text
    monkeypatch.delenv("RAY_ADDRESS")
    caplog.clear()
    with caplog.at_level("WARNING", logger="embedpipe"):
        assert choose_executor(validate_config(_job(executor="local"))) == "local"
    assert caplog.text == ""


def test_local_executor_refuses_a_cluster_address_and_a_gpu_encoder():
    with pytest.raises(ConfigError, match="ray.address"):
        choose_executor(validate_config(_job(executor="local", address="auto")))
    config = validate_config({**_job(executor="local"), "encoder": {"device": "cuda"}})
    with pytest.raises(ConfigError, match="CPU only"):
        choose_executor(config)


# ---------------------------------------------------------------- whole jobs on each executor


@pytest.fixture(scope="module")
def small_job(tmp_path_factory):
    from tiny_models import build_tiny_bert

    root = tmp_path_factory.mktemp("executors")
    lines = [f'{{"id": "d{i}", "text": "row {i} ' + "words of text " * (i % 9) + '"}' for i in range(90)]
    lines.insert(40, '{"id": "bad", "text": null}')
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return root, build_tiny_bert(root / "tiny-bert")


def _small_config(root: Path, model: Path, out: Path, executor: str):
    return validate_config({
        "input": {"path": str(root / "corpus.jsonl"), "id_column": "id", "max_quarantined": 2},
        "output": {"path": str(out), "shard_rows": 30},
        "tokenizer": {"max_length": 32},
        "encoder": {"model": str(model), "pooling": "mean", "normalize": True, "piece_rows": 16},
        "ray": {"num_cpus": 2, "executor": executor},
    })


def test_both_executors_write_the_same_bytes(ray_cluster, small_job, tmp_path):
    from cli_runs import manifest, output_files

    from pipeline.run.driver import run_job

    root, model = small_job
    for executor in ("local", "ray"):
        results = run_job(_small_config(root, model, tmp_path / executor, executor))
        assert results["embeddings"].totals["rows"] == 90
        assert manifest(tmp_path / executor)["last_run"]["cluster"]["executor"] == executor
    assert output_files(tmp_path / "local") == output_files(tmp_path / "ray")
    shards = manifest(tmp_path / "local")["stages"]["embeddings"]["shards"].values()
    assert max(s["encoders"] for s in shards) == 2  # two local encoder processes shared a shard's pieces


@pytest.fixture(scope="module")
def local_reference(small_job, tmp_path_factory) -> dict[str, str]:
    from cli_runs import output_files

    from pipeline.run.driver import run_job

    out = tmp_path_factory.mktemp("reference") / "out"
    run_job(_small_config(*small_job, out, "local"))
    return output_files(out)


@pytest.mark.parametrize("site", ["tokenize.before_commit", "embed.after_piece", "embed.before_commit"])
def test_a_local_worker_killed_mid_job_is_replaced_and_the_job_completes(small_job, local_reference, tmp_path,
                                                                         monkeypatch, site):
    """kill -9 inside a local task or encoder process: the driver runs its work again, within the run."""
    from cli_runs import output_files

    from pipeline.run.driver import run_job

    root, model = small_job
    monkeypatch.setenv("EMBEDPIPE_FAULT", f"{site}:2")
    monkeypatch.setenv("EMBEDPIPE_FAULT_DIR", str(tmp_path / "counters"))
    run_job(_small_config(root, model, tmp_path / "out", "local"))
    assert (tmp_path / "counters" / f"{site}.2").exists(), "the fault never fired"
    assert output_files(tmp_path / "out") == local_reference
