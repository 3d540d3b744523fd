"""A job on a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), run by test_faults.

usage: python multinode_job.py CONFIG_JSON OUT_REF OUT_DISTURBED REPORT_JSON
Runs the job undisturbed into OUT_REF, then again into OUT_DISTURBED removing a
worker node (kill, not graceful) as soon as the first token shard is committed.
Writes REPORT_JSON (Ray's raylets print on stdout): the nodes each run's tokenize units ran on, and the node removed.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.config import validate_config
from pipeline.output.manifest import load_manifest
from pipeline.run.driver import run_job


class _RetryCounter(logging.Handler):
    """Counts the driver's "trying again" warnings (resubmissions after a lost process or node)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "trying again" in record.getMessage()


def config_path(settings: dict, out: str) -> str:
    """The settings as a YAML job file (JSON is YAML) for the CLI."""
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    json.dump({**settings, "output": {**settings["output"], "path": out}}, handle)
    handle.close()
    return handle.name


def _nodes_used(out: str) -> list[str]:
    shards = load_manifest(Path(out))["stages"]["tokens"]["shards"].values()
    return sorted({s["node"] for s in shards})


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
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    retries = _RetryCounter()
    logging.getLogger("embedpipe").addHandler(retries)

    run_job(validate_config({**settings, "output": {**settings["output"], "path": out_ref}}))
    removed: list[str] = []

    def remove_a_node(event) -> None:
        if event.stage == "tokenize" and event.shards_done >= 1 and not removed:
            victim = workers[1]
            removed.append(victim.unique_id)
            cluster.remove_node(victim, allow_graceful=False)

    run_job(validate_config({**settings, "output": {**settings["output"], "path": out_disturbed}}),
            progress=remove_a_node)
    # The CLI as a separate driver process joining this cluster with --address.
    out_cli = out_disturbed + "-cli"
    cli = subprocess.run([sys.executable, "-m", "jobs.cli", "run", config_path(settings, out_cli), "--address",
                          cluster.address, "--no-progress"], capture_output=True, text=True, timeout=300)
    report = {"cli_exit": cli.returncode, "cli_stderr": cli.stderr[-2000:], "cli_out": out_cli,
              "cli_nodes": _nodes_used(out_cli) if cli.returncode == 0 else [],
              "driver_retries": retries.count, "removed": removed, "ref_nodes": _nodes_used(out_ref), "disturbed_nodes": _nodes_used(out_disturbed),
              "worker_nodes": [w.unique_id for w in workers]}
    with open(report_path, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
