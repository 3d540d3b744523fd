"""Outputs on object storage: the CLI writes, resumes, locks, verifies and reads an ``s3://`` output.

The store is a real S3 API server on loopback (moto's ``moto_server``, started for the module), reached
through s3fs exactly as a bucket on AWS or MinIO would be: credentials and endpoint from the ``AWS_*``
environment. The shards written there must equal, byte for byte, the same job's on a local disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import cli_env, embedpipe, output_files, start_embedpipe
from tiny_models import build_tiny_bert

BUCKET = "embedpipe-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_moto(log_path: Path, **server_env: str) -> tuple[subprocess.Popen, int]:
    """A moto S3 API server on a free loopback port (``server_env`` added to its environment), once it listens."""
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if moto is None:
        pytest.fail("moto_server is missing: install the test extras (pip install -e '.[test]')")
    port = _free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, **server_env))
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"moto_server did not start; see {log_path}")
            time.sleep(0.2)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with one bucket; the AWS_* variables that reach it, set for the module."""
    server, port = _start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield {"env": env, "fs": fs}
    finally:
        _stop(server)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def job(tmp_path_factory, s3) -> dict:
    """A small corpus with a bad row, a tiny BERT, and the same job's output on a local disk to compare with."""
    root = tmp_path_factory.mktemp("objstore")
    lines = [json.dumps({"id": f"doc-{i}", "text": f"row {i} " + "word " * (i % 23)}) for i in range(150)]
    lines[17] = '{"id": "doc-17", "text": null}'
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    settings = {  # YAML is a superset of JSON
        "input": {"path": str(root / "corpus.jsonl"), "id_column": "id"},
        "output": {"path": "unused", "shard_rows": 40},
        "tokenizer": {"max_length": 32},
        "encoder": {"model": str(build_tiny_bert(root / "tiny-bert")), "pooling": "mean", "normalize": True},
        "ray": {"num_cpus": 2},
    }
    config = root / "job.yaml"
    config.write_text(json.dumps(settings, indent=1))
    local = root / "local"
    done = embedpipe("run", str(config), "-o", str(local), "--no-progress")
    assert done.returncode == 0, done.stderr
    return {"root": root, "config": str(config), "local": local, "reference": output_files(local)}


def _env(s3: dict, **extra: str) -> dict[str, str]:
    return cli_env(**s3["env"], **extra)


def _objects(s3: dict, url: str) -> dict[str, str]:
    """sha256 of every object a job publishes under ``url`` except the manifest, keyed like ``output_files``."""
    import hashlib

    fs, prefix = s3["fs"], url.removeprefix("s3://")
    fs.invalidate_cache()
    found = {}
    for stage in ("tokens", "embeddings", "quarantine"):
        for key in fs.find(f"{prefix}/{stage}"):
            found[f"{stage}/{key.rsplit('/', 1)[-1]}"] = hashlib.sha256(fs.cat_file(key)).hexdigest()
    return found


def test_a_job_on_s3_equals_the_same_job_on_disk_and_reads_back(job, s3):
    url = f"s3://{BUCKET}/equal"
    done = embedpipe("run", job["config"], "-o", url, "--no-progress", env=_env(s3))
    assert done.returncode == 0, done.stderr
    assert _objects(s3, url) == job["reference"]
    assert not s3["fs"].exists(f"{BUCKET}/equal/.lock"), "the lock object outlived the job"

    checked = embedpipe("verify", url, env=_env(s3))
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr
    status = json.loads(embedpipe("status", url, "--json", env=_env(s3)).stdout)
    assert status["job_status"] == "complete" and status["lock"] is None
    assert [s["committed"] for s in status["stages"]] == [4, 4]
    reports = s3["fs"].ls(f"{BUCKET}/equal/reports")
    assert len(reports) == 1 and json.loads(s3["fs"].cat_file(reports[0]))["exit_status"] == 0
    noop = embedpipe("run", job["config"], "-o", url, "--no-progress", env=_env(s3))
    assert noop.returncode == 0 and "nothing to do" in noop.stdout

    shown = embedpipe("inspect", f"{url}/tokens/data-00000-of-00004.arrow", "--rows", "1", env=_env(s3))
    assert shown.returncode == 0 and "doc-0" in shown.stdout, shown.stdout + shown.stderr
    planned = json.loads(embedpipe("plan", job["config"], "-o", url, "--json", "--no-estimate", env=_env(s3)).stdout)
    assert planned["rerun"] == "nothing to do: every shard is committed"
    png = job["root"] / "s3-pca.png"
    drawn = embedpipe("plot", url, "--out", str(png), "--sample", "100", env=_env(s3))
    assert drawn.returncode == 0 and png.stat().st_size > 10_000, drawn.stderr

    # Readers: pipeline.data and datasets straight from the bucket.
    from pipeline.data import ShardDataset, StreamingDataset

    remote = ShardDataset(url, "both", columns=["input_ids", "embedding"])
    on_disk = ShardDataset(str(job["local"]), "both", columns=["input_ids", "embedding"])
    assert len(remote) == len(on_disk) == 149
    for a, b in zip(remote.__getitems__([0, 77, 148]).values(), on_disk.__getitems__([0, 77, 148]).values()):
        assert (a == b).all()
    streamed = [i for batch in StreamingDataset(url, columns=["id"], batch_size=32, seed=3) for i in batch["id"]]
    assert sorted(streamed) == sorted(f"doc-{i}" for i in range(150) if i != 17)
    import datasets

    loaded = datasets.load_from_disk(f"{url}/embeddings", storage_options={"endpoint_url": s3["env"]["AWS_ENDPOINT_URL"]})
    assert loaded.num_rows == 149 and loaded[0]["id"] == "doc-0"


@pytest.mark.faults
def test_a_rerun_on_s3_redoes_only_missing_or_damaged_objects(job, s3):
    url, prefix = f"s3://{BUCKET}/resume", f"{BUCKET}/resume"
    assert embedpipe("run", job["config"], "-o", url, "--no-progress", env=_env(s3)).returncode == 0
    fs = s3["fs"]
    fs.rm_file(f"{prefix}/tokens/data-00001-of-00004.arrow")
    fs.pipe_file(f"{prefix}/embeddings/data-00002-of-00004.arrow", b"not arrow")
    fs.invalidate_cache()
    status = json.loads(embedpipe("status", url, "--json", env=_env(s3)).stdout)
    assert {s["stage"]: s["damaged"] for s in status["stages"]} == {
        "tokens": ["data-00001-of-00004.arrow"], "embeddings": ["data-00002-of-00004.arrow"]}
    assert embedpipe("verify", url, env=_env(s3)).returncode == 1

    again = embedpipe("run", job["config"], "-o", url, "--no-progress", "--log-format", "json", env=_env(s3))
    assert again.returncode == 0, again.stderr
    resume = next(json.loads(line) for line in again.stderr.splitlines() if '"resume"' in line)
    # Tokens: 3 kept, 1 redone; embeddings: 2 kept (shard 1's is stale once its tokens are redone, 2's damaged).
    assert resume["skipped"] == {"tokens": 3, "embeddings": 2}
    assert _objects(s3, url) == job["reference"]
    assert embedpipe("verify", url, env=_env(s3)).returncode == 0


def test_one_job_per_s3_output_and_a_dead_holders_lease_is_taken_over(job, s3):
    from pipeline.output.lock import LockInfo, lock_holder, output_lock

    url, lock_key = f"s3://{BUCKET}/locked", f"{BUCKET}/locked/.lock"
    with output_lock(url, command="test"):
        assert lock_holder(url).pid == os.getpid()
        refused = embedpipe("run", job["config"], "-o", url, "--no-progress", env=_env(s3))
        assert refused.returncode == 3, refused.stderr
        assert f"pid {os.getpid()}" in refused.stderr and "locked by a running job" in refused.stderr
    assert lock_holder(url) is None and not s3["fs"].exists(lock_key)

    # Another host's lease that has not run out binds; once it has, it is taken over.
    other = LockInfo("elsewhere", 4242, "2026-01-01T00:00:00+00:00", "run", expires_at=time.time() + 600)
    s3["fs"].pipe_file(lock_key, json.dumps(other.__dict__).encode())
    assert lock_holder(url).host == "elsewhere"
    from pipeline.errors import LockHeld

    with pytest.raises(LockHeld, match="pid 4242 on elsewhere"):
        output_lock(url).acquire()
    other.expires_at = time.time() - 1
    s3["fs"].pipe_file(lock_key, json.dumps(other.__dict__).encode())
    with output_lock(url) as lock:
        assert lock.previous.host == "elsewhere"

    # A job on this host killed with -9 leaves its lease behind: the next run sees the pid is gone and takes over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = LockInfo(socket.gethostname(), dead.pid, "2026-01-01T00:00:00+00:00", "run", expires_at=time.time() + 600)
    s3["fs"].pipe_file(lock_key, json.dumps(mine.__dict__).encode())
    assert lock_holder(url) is None
    done = embedpipe("run", job["config"], "-o", url, "--no-progress", env=_env(s3))
    assert done.returncode == 0, done.stderr
    assert f"took over the lock of {url} left by a job that is gone: pid {dead.pid}" in done.stderr


@pytest.mark.faults
def test_a_short_lease_is_renewed_through_a_long_job_and_refuses_a_second_job(job, s3, tmp_path):
    """A 2 s lease (``EMBEDPIPE_LOCK_LEASE_SECONDS``) held by a job paused for over four leases (the
    driver waits at its first shard record, ``driver.after_record:1:pause``): its renewals keep the
    lease in the future, a second job on the same output is refused (exit 3, naming the holder), and
    the first, let go, completes with the same objects as the local run and removes its lease."""
    lease = 2.0
    url, lock_key = f"s3://{BUCKET}/lease", f"{BUCKET}/lease/.lock"
    counters = tmp_path / "counters"
    first = start_embedpipe("run", job["config"], "-o", url, "--no-progress", env=_env(
        s3, EMBEDPIPE_LOCK_LEASE_SECONDS=str(lease), EMBEDPIPE_FAULT="driver.after_record:1:pause",
        EMBEDPIPE_FAULT_DIR=str(counters)))
    try:
        paused = counters / "driver.after_record.1.paused"
        deadline = time.monotonic() + 240
        while not paused.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the job never reached its first record"
            time.sleep(0.1)
        assert paused.read_text() == str(first.pid)  # the driver itself waits, lock held
        seen = []
        until = time.time() + 4 * lease
        while time.time() < until:
            seen.append((time.time(), json.loads(s3["fs"].cat_file(lock_key))["expires_at"]))
            time.sleep(lease / 4)
        second = embedpipe("run", job["config"], "-o", url, "--no-progress",
                           env=_env(s3, EMBEDPIPE_LOCK_LEASE_SECONDS=str(lease)))
        assert second.returncode == 3, second.stdout + second.stderr
        assert "locked by a running job" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
        assert first.poll() is None, "the first job ended while it should be paused"
        # Renewed every lease/4: never run out while looked at, and moved on by about the time that passed.
        assert all(expires > at for at, expires in seen), seen
        assert seen[-1][1] - seen[0][1] > 3 * lease, seen
    finally:
        (counters / "driver.after_record.1.resume").touch()
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert _objects(s3, url) == job["reference"]
    assert not s3["fs"].exists(lock_key), "the lease outlived the job"


SHARDS = 4  # 150 rows (one quarantined) in units of 40: four shards per stage
# fault -> (the exit status the site implies, the arrivals the first run makes at the site: exactly, for
# the driver; at least, for a worker or actor). A driver killed at its n-th record dies with SIGKILL, so no
# arrival after the n-th; a worker or actor killed there is retried within the run (exit 0), and the retry
# arrives once more: SHARDS + 1 (more only if Ray's retry and the driver's resubmission both ran it).
# No ``commit.*`` case: those sites fire in any process (the driver writes manifests, workers and actors
# shards) in an order the scheduling decides, so no exit status follows from them; and on an object store
# ``commit.before_rename`` is the same state as ``commit.write`` (no rename: both fire just before the one
# upload call), so a case for it would only repeat one. The upload-then-die state has its own cases:
# ``tokenize.after_commit`` and ``embed.after_commit`` kill right after the upload, before the report.
S3_KILLS = {
    "driver.after_record:3": (-signal.SIGKILL, 3),
    "embed.before_commit:2": (0, SHARDS + 1),
    "tokenize.after_commit:2": (0, SHARDS + 1),  # a worker killed right after its uploads, before it reports
    "embed.after_commit:3": (0, SHARDS + 1),     # an actor killed right after its upload, before it reports
}


def _arrivals(counters: Path, site: str) -> int:
    """How many arrivals at ``site`` the fault counters recorded (files ``<site>.<n>``)."""
    return sum(1 for p in counters.glob(f"{site}.*") if p.name.removeprefix(f"{site}.").isdigit())


@pytest.mark.faults
@pytest.mark.parametrize("fault", list(S3_KILLS))
def test_killed_mid_job_on_s3_then_rerun_is_identical(job, s3, fault, tmp_path):
    """SIGKILL at the n-th arrival at a site, on an S3 output: the driver's kill needs a rerun (exit -9),
    a worker's or actor's is retried by Ray in the same run (exit 0, one more arrival); either way the
    objects end equal to the local run's, and a killed upload-then-report leaves nothing lost."""
    site, n = fault.rsplit(":", 1)
    expected_exit, expected_arrivals = S3_KILLS[fault]
    url = f"s3://{BUCKET}/killed-{fault.replace(':', '-').replace('.', '-')}"
    counters = tmp_path / "counters"
    env = _env(s3, EMBEDPIPE_FAULT=fault, EMBEDPIPE_FAULT_DIR=str(counters))
    first = embedpipe("run", job["config"], "-o", url, "--no-progress", env=env)
    assert (counters / f"{site}.{n}").exists(), f"{fault}: arrival {n}, the one that kills, never came"
    assert first.returncode == expected_exit, first.stderr
    arrivals = _arrivals(counters, site)
    if expected_exit == 0:
        assert arrivals >= expected_arrivals, f"the killed work was not run again: {arrivals} arrivals"
    else:
        assert arrivals == expected_arrivals, f"arrivals after the driver's death: {arrivals}"
    if expected_exit == 0:  # retried within the run: already complete, nothing lost or doubled
        assert _objects(s3, url) == job["reference"]
    again = embedpipe("run", job["config"], "-o", url, "--no-progress", env=_env(s3))
    assert again.returncode == 0, again.stderr
    assert ("nothing to do" in again.stdout) == (expected_exit == 0), again.stdout
    assert _objects(s3, url) == job["reference"]
    assert embedpipe("verify", url, env=_env(s3)).returncode == 0


def _policy(*deny_put: str) -> str:
    """An IAM policy allowing everything except PutObject on the ``deny_put`` object ARNs."""
    statements = [{"Effect": "Allow", "Action": "*", "Resource": "*"}]
    if deny_put:
        statements.append({"Effect": "Deny", "Action": "s3:PutObject", "Resource": list(deny_put)})
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


@pytest.mark.faults
def test_a_denied_upload_fails_clearly_and_a_rerun_once_allowed_is_identical(job, tmp_path):
    """A real PutObject refused by the server (403 AccessDenied from an IAM policy that moto enforces) for one
    embedding shard: exit 1 naming the object and the upload, no traceback, every object the store holds a
    whole, listed one; then the policy is lifted and a rerun ends byte-identical to the local run.

    Its own moto server: IAM enforcement is server-wide (``INITIAL_NO_AUTH_ACTION_COUNT``: the first four
    requests, which set up the bucket, user, policy and key, go unchecked; every later one is signed and
    checked against the policy)."""
    import boto3
    import fsspec

    server, port = _start_moto(tmp_path / "moto.log", INITIAL_NO_AUTH_ACTION_COUNT="4")
    try:
        endpoint = f"http://127.0.0.1:{port}"
        root = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "testing",
                "aws_secret_access_key": "testing"}
        boto3.client("s3", **root).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **root)
        iam.create_user(UserName="writer")
        denied = "embeddings/data-00002-of-00004.arrow"
        iam.put_user_policy(UserName="writer", PolicyName="job", PolicyDocument=_policy(
            f"arn:aws:s3:::{BUCKET}/denied/{denied}"))
        key = iam.create_access_key(UserName="writer")["AccessKey"]
        creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, key=creds["AWS_ACCESS_KEY_ID"],
                               secret=creds["AWS_SECRET_ACCESS_KEY"], endpoint_url=endpoint)
        store = {"fs": fs}
        url = f"s3://{BUCKET}/denied"

        first = embedpipe("run", job["config"], "-o", url, "--no-progress", env=cli_env(**creds))
        assert first.returncode == 1, first.stdout + first.stderr
        assert "upload failed" in first.stderr and f"{url}/{denied}" in first.stderr, first.stderr
        assert "Access Denied" in first.stderr and "Traceback" not in first.stderr, first.stderr
        held = _objects(store, url)
        assert denied not in held
        assert {k: v for k, v in held.items() if v != job["reference"].get(k)} == {}, "an object differs"
        record = json.loads(fs.cat_file(f"{BUCKET}/denied/manifest.json"))
        assert record["status"] != "complete"
        for stage, entry in record["stages"].items():
            for name, shard in entry["shards"].items():
                assert held.get(f"{stage}/{name}") == shard["sha256"], f"{stage}/{name} listed but not held whole"

        boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"]).put_user_policy(
            UserName="writer", PolicyName="job", PolicyDocument=_policy())
        again = embedpipe("run", job["config"], "-o", url, "--no-progress", env=cli_env(**creds))
        assert again.returncode == 0, again.stderr
        assert _objects(store, url) == job["reference"]
        assert embedpipe("verify", url, env=cli_env(**creds)).returncode == 0
    finally:
        _stop(server)
