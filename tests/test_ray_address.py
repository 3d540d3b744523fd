"""``RAY_ADDRESS``, as the README's cron and systemd recipes set it: the CLI joins that cluster.

A real one-node cluster from ``ray start --head --block`` (one CPU, no dashboard) runs beside the
test; ``embedpipe tokenize`` with ``RAY_ADDRESS`` pointing at it must run there (the manifest's run
record names that cluster's address and its one CPU), and without the variable, with that cluster
still up, it must start a local cluster of its own (``ray.num_cpus`` CPUs, another address).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runs import cli_env, embedpipe, manifest, output_files
from tiny_models import build_tiny_bert

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """The GCS address (``127.0.0.1:PORT``) of a one-CPU head from ``ray start --head --block``, and the
    environment that reaches it (one token for both sides: Ray 2.60 turns token authentication on when
    ``~/.ray/auth_token`` exists, as the walkthrough tests leave it)."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: socket paths are limited to 107 bytes
    env = cli_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token",
                  RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "1", f"--port={port}",
         "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed:\n{head.stderr.read()[-3000:]}") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}", env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the cluster's processes go with it
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its orderly stop takes ~30 s here; the group holds all of the cluster
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_address_joins_that_cluster_and_without_it_a_local_one_starts(
        ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """The run record's cluster is the ``RAY_ADDRESS`` head (its address, 1 CPU); unset, the local executor
    (no Ray, 2 CPUs); unset with ``ray.executor: ray``, a new local Ray cluster (2 CPUs), not the running one."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"r{i}", "text": f"row {i} of the corpus"}) + "\n" for i in range(30)))
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({
        "input": {"path": str(corpus), "id_column": "id"}, "output": {"path": "unused", "shard_rows": 10},
        "tokenizer": {"max_length": 16}, "encoder": {"model": str(build_tiny_bert(tmp_path / "tiny-bert"))},
        "ray": {"num_cpus": 2}}))
    address, head_env = ray_head
    env = dict(head_env, RAY_ADDRESS=address)
    joined = embedpipe("tokenize", str(config), "-o", str(tmp_path / "joined"), "--no-progress", env=env)
    assert joined.returncode == 0, joined.stderr
    cluster = manifest(tmp_path / "joined")["last_run"]["cluster"]
    # GCS reports the node's own IP (not the loopback the test dialled): compare the port.
    port = address.rsplit(":", 1)[1]
    assert cluster["address"].endswith(f":{port}") and cluster["nodes"] == 1 and cluster["cpus"] == 1, cluster

    env.pop("RAY_ADDRESS")
    local = embedpipe("tokenize", str(config), "-o", str(tmp_path / "local"), "--no-progress", env=env)
    assert local.returncode == 0, local.stderr
    cluster = manifest(tmp_path / "local")["last_run"]["cluster"]
    assert cluster["executor"] == "local" and cluster["address"] is None and cluster["cpus"] == 2, cluster

    new = embedpipe("tokenize", str(config), "-o", str(tmp_path / "new"), "--set", "ray.executor=ray",
                    "--no-progress", env=env)
    assert new.returncode == 0, new.stderr
    cluster = manifest(tmp_path / "new")["last_run"]["cluster"]
    assert cluster["executor"] == "ray" and not cluster["address"].endswith(f":{port}") and cluster["cpus"] == 2
    assert output_files(tmp_path / "new") == output_files(tmp_path / "local") == output_files(tmp_path / "joined")
