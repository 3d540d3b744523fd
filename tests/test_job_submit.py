"""The README's scale-out recipe for real: `ray job submit` to a Ray cluster started with `ray start --head`.

Ray's job server lives in the dashboard, which needs `ray[default]`'s extra packages. They are installed
once, with pip, into a side folder (`.venv/ray-dashboard-<ray version>`) that only the cluster's processes
see, so the rest of the suite keeps running on the minimal Ray that embedpipe depends on.
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
import urllib.request
from pathlib import Path

import pytest
import ray
from cli_runs import REPO, cli_env, embedpipe, manifest

pytestmark = pytest.mark.walkthrough
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_packages() -> Path:
    """A folder with what `ray[default]` adds to this environment (pip computes the list)."""
    target = REPO / ".venv" / f"ray-dashboard-{ray.__version__}"
    if (target / ".complete").exists():
        return target
    report = target.with_suffix(".report.json")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--dry-run", "--report", str(report), f"ray[default]=={ray.__version__}"], check=True)
    wanted = [f"{item['metadata']['name']}=={item['metadata']['version']}"
              for item in json.loads(report.read_text())["install"]]
    subprocess.run([*pip, "--no-deps", "--target", str(target), *wanted], check=True)
    (target / ".complete").touch()
    return target


@pytest.fixture
def job_cluster():
    """A one-node cluster from `ray start --head --block`, with its dashboard and job server."""
    dashboard, gcs = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: socket paths are limited to 107 bytes
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # both sides agree
    env = cli_env(PYTHONPATH=str(dashboard_packages()), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **auth)
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", f"--port={gcs}",
         "--dashboard-host", "127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without the token: the server is up
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{head.stderr.read()[-3000:]}") from None
            time.sleep(1)
    yield url, gcs, env
    os.killpg(head.pid, signal.SIGTERM)  # --block: the cluster's processes go with it
    head.wait(timeout=60)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline_on_the_existing_cluster(job_cluster, tmp_path):
    url, gcs, env = job_cluster
    out = tmp_path / "out"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
         "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
         "--", "python", "-m", "jobs.cli", "run", "conf/default.yaml", "-o", str(out),
         "--set", "tokenizer.max_length=64", "--log-format", "json"],
        cwd=REPO, env=env,
        capture_output=True, text=True, timeout=900)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout + submit.stderr
    # The driver ran inside the job, on the cluster it was submitted to, not on a new local one.
    report = json.loads(next((out / "reports").glob("*.json")).read_text())
    assert report["exit_status"] == 0
    assert report["cluster"]["address"].endswith(f":{gcs}") and report["cluster"]["cpus"] == 2.0
    assert manifest(out)["counts"]["rows_out"] == 3010
    verify = embedpipe("verify", str(out))
    assert verify.returncode == 0, verify.stdout + verify.stderr
