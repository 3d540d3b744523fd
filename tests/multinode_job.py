"""A job on a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), run by test_faults.

usage: python multinode_job.py CONFIG_JSON OUT_REF OUT_DISTURBED REPORT_JSON
Runs the job undisturbed into OUT_REF, then again into OUT_DISTURBED with an encoder actor paused in
the middle of a shard (``embed.after_piece:2:pause``: a piece computed, not yet returned; through the
job's runtime environment): the worker node that actor runs on is removed (kill, not graceful) while the shard is in flight there.
Writes REPORT_JSON (Ray's raylets print on stdout): the nodes each run's tokenize units ran on, the node
removed, the paused process and whether it died with its node, the arrivals at the paused site (the
lost piece is embedded again: more arrivals than the pieces), and the driver's resubmission warnings.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.cluster_utils import Cluster

from pipeline.config import validate_config
from pipeline.faults import ENV_FAULT, ENV_FAULT_DIR
from pipeline.output.manifest import load_manifest
from pipeline.run.driver import run_job

PAUSED_SITE, PAUSED_ARRIVAL = "embed.after_piece", 2
RAY_INIT: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}


class _RetryCounter(logging.Handler):
    """Counts the driver's resubmissions after a lost process or node: "trying again" (a unit or shard
    resubmitted by the driver) and "replacing an encoder actor" (an actor Ray could not recover)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.trying_again = 0
        self.replaced_actors = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.trying_again += "trying again" in message
        self.replaced_actors += "replacing an encoder actor" in message


def config_path(settings: dict, out: str) -> str:
    """The settings as a YAML job file (JSON is YAML) for the CLI."""
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    json.dump({**settings, "output": {**settings["output"], "path": out}}, handle)
    handle.close()
    return handle.name


def _nodes_used(out: str) -> list[str]:
    shards = load_manifest(Path(out))["stages"]["tokens"]["shards"].values()
    return sorted({s["node"] for s in shards})


def _node_of(pid: int, workers: list) -> Any:
    """The worker node whose raylet is an ancestor of process ``pid`` (Ray's workers are its descendants)."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in workers}
    for parent in psutil.Process(pid).parents():
        if parent.pid in raylets:
            return raylets[parent.pid]
    raise RuntimeError(f"process {pid} runs on no worker node")


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def main() -> None:
    config_json, out_ref, out_disturbed, report_path = sys.argv[1:5]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(3)]
    cluster.wait_for_nodes()
    try:
        _run_twice(cluster, workers, json.loads(config_json), out_ref, out_disturbed, report_path)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _run_twice(cluster: Cluster, workers: list, settings: dict, out_ref: str, out_disturbed: str,
               report_path: str) -> None:
    ray.init(address=cluster.address, **RAY_INIT)
    run_job(validate_config({**settings, "output": {**settings["output"], "path": out_ref}}))
    ray.shutdown()

    fault_dir = Path(tempfile.mkdtemp(prefix="multinode-faults-"))
    paused = fault_dir / f"{PAUSED_SITE}.{PAUSED_ARRIVAL}.paused"
    removal: dict[str, Any] = {}
    finished = threading.Event()

    def remove_the_paused_actors_node() -> None:
        while not paused.exists():
            if finished.wait(0.05):
                return
        try:
            time.sleep(0.1)  # the pid is written just after the file is created
            pid = int(paused.read_text())
            victim = _node_of(pid, workers)
            removal.update(pid=pid, node=victim.unique_id)
            cluster.remove_node(victim, allow_graceful=False)
            removal["pid_gone"] = _gone(pid)
        except Exception as exc:  # noqa: BLE001 - reported, and the test fails on the missing removal
            removal["error"] = repr(exc)
        finally:
            # Lets the paused process go on if it survived (the report then says so and the test fails).
            (fault_dir / f"{PAUSED_SITE}.{PAUSED_ARRIVAL}.resume").touch()

    ray.init(address=cluster.address, runtime_env={"env_vars": {
        ENV_FAULT: f"{PAUSED_SITE}:{PAUSED_ARRIVAL}:pause", ENV_FAULT_DIR: str(fault_dir)}}, **RAY_INIT)
    retries = _RetryCounter()
    logging.getLogger("embedpipe").addHandler(retries)
    remover = threading.Thread(target=remove_the_paused_actors_node, daemon=True)
    remover.start()
    try:
        run_job(validate_config({**settings, "output": {**settings["output"], "path": out_disturbed}}))
    finally:
        finished.set()
        remover.join(timeout=60)
        logging.getLogger("embedpipe").removeHandler(retries)
        ray.shutdown()
    arrivals = sum(1 for p in fault_dir.glob(f"{PAUSED_SITE}.*") if p.suffix.lstrip(".").isdigit())

    # The CLI as a separate driver process joining this cluster with --address (two worker nodes left).
    out_cli = out_disturbed + "-cli"
    cli = subprocess.run([sys.executable, "-m", "jobs.cli", "run", config_path(settings, out_cli), "--address",
                          cluster.address, "--no-progress"], check=False, capture_output=True, text=True, timeout=300)
    report = {"cli_exit": cli.returncode, "cli_stderr": cli.stderr[-2000:], "cli_out": out_cli,
              "cli_nodes": _nodes_used(out_cli) if cli.returncode == 0 else [],
              "trying_again": retries.trying_again, "replaced_actors": retries.replaced_actors,
              "removed": [removal["node"]] if "node" in removal else [], "paused_pid_gone": removal.get("pid_gone"),
              "removal_error": removal.get("error"),
              "paused_arrivals": arrivals, "ref_nodes": _nodes_used(out_ref),
              "disturbed_nodes": _nodes_used(out_disturbed), "worker_nodes": [w.unique_id for w in workers]}
    with open(report_path, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
