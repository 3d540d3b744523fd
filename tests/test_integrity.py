"""Nothing lost, nothing half-written: bad rows, unreadable files, the lock, verify and status."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runs import embedpipe, manifest, start_embedpipe

from pipeline.config import validate_config
from pipeline.errors import InputError
from pipeline.inputs.discovery import discover
from pipeline.inputs.plan import plan_units
from pipeline.ops.status import output_status
from pipeline.ops.verify import verify_output
from pipeline.output.lock import lock_holder, output_lock
from pipeline.output.shards import read_shard, write_shard
from pipeline.run.driver import run_job, run_tokenize

GOOD = [{"id": f"g{i}", "text": f"Good row {i}. " + "words " * (i % 13) + ("中文" if i % 5 == 0 else "")} for i in range(60)]
GOOD.append({"id": "empty", "text": ""})  # an empty string is a valid row: tokenized, not dropped

# (raw line, reason fragment) for every kind of bad row (a blank line is not a row: skipped and counted apart)
BAD = [
    (b'{"id": "u", "text": "caf\xe9 latin-1"}', "invalid UTF-8"),
    (b'{"id": "n", "text": null}', "'text' is null"),
    (b'{"id": "i", "text": 42}', "'text' is int"),
    (b'{"id": "z", "text": "nul\\u0000byte"}', "NUL byte"),
    (b'{"id": "m", "text": "unterminated', "malformed JSON"),
    (b'{"id": "big", "text": "' + b"x" * 3000 + b'"}', "over input.max_text_bytes"),
    (b'{"text": "no id here"}', "id field 'id' is missing"),
    (b'["a", "list"]', "not a JSON object"),
]


def _write_jsonl(path: Path, good: list[dict], bad: list[bytes] = ()) -> Path:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    for k, raw in enumerate(bad):
        lines.insert(3 + 6 * k, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _config(corpus: Path, out: Path, **input_keys):
    return validate_config({
        "input": {"path": str(corpus), "id_column": "id", "max_text_bytes": 2000, **input_keys},
        "output": {"path": str(out), "shard_rows": 25},
        "tokenizer": {"name": "minilm", "max_length": 32},
    })


def test_every_kind_of_bad_row_is_quarantined_and_the_good_rows_are_untouched(ray_cluster, tmp_path):
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", GOOD, [raw for raw, _ in BAD])
    result = run_tokenize(_config(mixed, tmp_path / "out", max_quarantined=len(BAD)))
    assert result.totals["rows_in"] == len(GOOD) + len(BAD)
    assert result.totals["quarantined"] == len(BAD) and result.totals["rows"] == len(GOOD)
    records = [json.loads(line) for path in sorted((tmp_path / "out" / "quarantine").glob("*.jsonl"))
               for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(BAD)
    by_line = sorted(records, key=lambda r: int(r["position"].split()[1]))
    for record, (raw, reason) in zip(by_line, BAD):
        assert reason in record["reason"], (record, reason)
        assert record["source"] == "mixed.jsonl" and record["position"].startswith("line ")
    nul = next(r for r in records if "NUL" in r["reason"])
    assert "\\u0000" in json.dumps(nul["raw"])  # kept, escaped
    assert next(r for r in records if "UTF-8" in r["reason"])["raw"].endswith('latin-1"}')

    # The good rows alone give the same token rows.
    alone = _write_jsonl(tmp_path / "alone.jsonl", GOOD)
    run_tokenize(_config(alone, tmp_path / "alone"))
    mixed_rows = [r for p in sorted((tmp_path / "out" / "tokens").glob("*.arrow")) for r in read_shard(p).to_pylist()]
    alone_rows = [r for p in sorted((tmp_path / "alone" / "tokens").glob("*.arrow")) for r in read_shard(p).to_pylist()]
    assert mixed_rows == alone_rows
    assert next(r for r in mixed_rows if r["id"] == "empty")["length"] == 2  # [CLS] [SEP]
    assert verify_output(tmp_path / "out").ok


def test_nul_policy_strip_and_keep(ray_cluster, tmp_path, bpe_dir):
    """A byte-level BPE has a token for byte 0 (MiniLM's normalizer would drop NUL whatever the policy), so the ids
    tell the policies apart: strip tokenizes the text without its NULs, keep the raw text, reject quarantines it."""
    from transformers import AutoTokenizer

    raw = "x\u0000y \u0000\u0000Good row"
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": raw}, {"id": "b", "text": "plain"}])
    hf = AutoTokenizer.from_pretrained(bpe_dir)
    want = {"strip": hf(raw.replace("\u0000", ""))["input_ids"], "keep": hf(raw)["input_ids"]}
    assert want["strip"] != want["keep"]  # else this tokenizer could not tell the policies apart either
    got = {}
    for policy in ("strip", "keep", "reject"):
        out = tmp_path / policy
        config = validate_config({
            "input": {"path": str(corpus), "id_column": "id", "nul_bytes": policy, "max_quarantined": 1},
            "output": {"path": str(out), "shard_rows": 25},
            "tokenizer": {"name": bpe_dir, "max_length": 32, "pad_token": "<|endoftext|>"},
        })
        result = run_tokenize(config)
        rows = {r["id"]: r["input_ids"][:r["length"]] for p in sorted((out / "tokens").glob("*.arrow"))
                for r in read_shard(p).to_pylist()}
        got[policy] = rows
        assert rows["b"] == hf("plain")["input_ids"]
        assert result.totals["quarantined"] == (policy == "reject")
    assert got["strip"]["a"] == want["strip"]
    assert got["keep"]["a"] == want["keep"]
    assert "a" not in got["reject"]
    (quarantined,) = [json.loads(line) for line in (tmp_path / "reject" / "quarantine").glob("*.jsonl").__next__()
                      .read_text(encoding="utf-8").splitlines()]
    assert "NUL byte at character 1" in quarantined["reason"] and quarantined["position"] == "line 1"


def _unreadable_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    table = pa.table({"id": ["a", "b"], "text": ["one", "two"]})
    parquet = tmp_path / "corrupt.parquet"
    pq.write_table(table, parquet)
    parquet.write_bytes(parquet.read_bytes()[:-12])  # the footer is gone
    good_gz = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD))
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(good_gz[: len(good_gz) // 2])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    bz = tmp_path / "garbage.jsonl.bz2"
    bz.write_bytes(bz2.compress(b"x" * 100)[:20] + b"garbage")
    return {"parquet": (parquet, "Parquet"), "gzip": (truncated, "end-of-stream"), "empty": (empty, "0 bytes"),
            "bz2": (bz, "cannot be read")}


def test_a_file_that_cannot_be_read_is_named_with_the_reason(tmp_path):
    for kind, (path, reason) in _unreadable_inputs(tmp_path).items():
        with pytest.raises(InputError) as caught:
            files = discover(str(path))
            plan_units(files, 100)
        message = str(caught.value)
        assert str(path) in message and "cannot be read" in message and reason in message, (kind, message)


def test_unreadable_files_exit_1_in_the_cli_before_any_work(tmp_path):
    path, _ = _unreadable_inputs(tmp_path)["gzip"]
    done = embedpipe("tokenize", "conf/default.yaml", "--set", f"input.path={path}", "-o", str(tmp_path / "o"))
    assert done.returncode == 1 and "truncated.jsonl.gz" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o" / "tokens").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to become another user")
def test_permission_denied_is_named():
    """Run as 'nobody' so that the file mode is enforced (root reads anything)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="embedpipe-perm-"))  # pytest's tmp dirs are closed to other users
    try:
        root.chmod(0o777)
        corpus = _write_jsonl(root / "secret.jsonl", GOOD)
        corpus.chmod(0o600)
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
             os.sys.executable, "-m", "jobs.cli", "tokenize", "conf/default.yaml",
             "--set", f"input.path={corpus}", "-o", str(root / "o")],
            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120,
            env=dict(os.environ, HOME=str(root), HF_HUB_OFFLINE="1"))
    finally:
        shutil.rmtree(root)
    assert done.returncode == 1, done.stderr
    assert "secret.jsonl" in done.stderr and "Permission denied" in done.stderr


def test_a_second_job_on_a_locked_output_exits_3_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with output_lock(out, command="test"):
        done = embedpipe("tokenize", "conf/default.yaml", "-o", str(out))
        assert lock_holder(out).pid == os.getpid()
        assert output_status(out).lock["pid"] == os.getpid()
    assert done.returncode == 3
    assert f"pid {os.getpid()}" in done.stderr and "locked by a running job" in done.stderr
    assert lock_holder(out) is None


def test_a_lock_left_by_a_dead_process_is_taken_over(ray_cluster, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run(["python3", "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"host": "old-host", "pid": int(dead.stdout), "started_at": "then"}))
    corpus = _write_jsonl(tmp_path / "c.jsonl", GOOD)
    result = run_tokenize(_config(corpus, out))
    assert result.totals["rows"] == len(GOOD)
    assert lock_holder(out) is None


def test_two_concurrent_runs_one_runs_the_other_exits_3(tmp_path):
    out = tmp_path / "out"
    corpus = _write_jsonl(tmp_path / "c.jsonl", GOOD)
    args = ("tokenize", "conf/default.yaml", "--set", f"input.path={corpus}", "--set", "input.id_column=id",
            "-o", str(out), "--no-progress")
    first, second = start_embedpipe(*args), start_embedpipe(*args)
    codes = sorted([first.wait(timeout=300), second.wait(timeout=300)])
    assert codes == [0, 3], (first.stderr.read(), second.stderr.read())
    assert verify_output(out).ok


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory) -> Path:
    """A finished two-stage job to damage in different ways (each test works on a copy)."""
    root = tmp_path_factory.mktemp("finished")
    corpus = _write_jsonl(root / "c.jsonl", GOOD, [BAD[1][0]])
    config = validate_config({
        "input": {"path": str(corpus), "id_column": "id", "max_quarantined": 1},
        "output": {"path": str(root / "out"), "shard_rows": 25},
        "tokenizer": {"name": "minilm", "max_length": 32},
        "encoder": {"model": "minilm"},
    })
    run_job(config)
    return root / "out"


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def _problems(out: Path) -> str:
    result = verify_output(out)
    assert not result.ok
    return "\n".join(result.problems)


def test_verify_passes_on_a_finished_job_and_the_cli_says_ok(finished):
    result = verify_output(finished)
    assert result.ok, result.problems
    assert result.checked["tokens"]["rows"] == len(GOOD) and result.checked["tokens"]["quarantined"] == 1
    assert result.checked["embeddings"]["rows"] == len(GOOD)
    done = embedpipe("verify", str(finished))
    assert done.returncode == 0 and done.stdout.strip().endswith("OK")
    status = embedpipe("status", str(finished), "--json")
    stages = {s["stage"]: s for s in json.loads(status.stdout)["stages"]}
    assert stages["tokens"]["committed"] == stages["tokens"]["planned"] == 3
    assert stages["tokens"]["quarantined"] == 1 and stages["embeddings"]["missing"] == []


def test_verify_finds_a_flipped_byte(finished, tmp_path):
    out = _copy(finished, tmp_path)
    shard = out / "embeddings" / "data-00001-of-00003.arrow"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "embeddings/data-00001-of-00003.arrow: sha256 differs" in _problems(out)
    done = embedpipe("verify", str(out))
    assert done.returncode == 1 and "sha256 differs" in done.stdout


def test_verify_finds_missing_stray_and_misaligned_shards(finished, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "tokens" / "data-00002-of-00003.arrow").unlink()
    shutil.copy(out / "tokens" / "data-00000-of-00003.arrow", out / "tokens" / "data-00009-of-00009.arrow")
    problems = _problems(out)
    assert "tokens/data-00002-of-00003.arrow: listed in the manifest but missing on disk" in problems
    assert "shard files not in the manifest: data-00009-of-00009.arrow" in problems
    status = output_status(out)
    assert status.stages[0].damaged == ["data-00002-of-00003.arrow"]

    out2 = _copy(finished, tmp_path / "b")
    # Reverse the rows of an embedding shard and make the manifest agree with the file: only alignment can tell.
    name = "data-00001-of-00003.arrow"
    table = read_shard(out2 / "embeddings" / name)
    committed = write_shard(table.take(list(reversed(range(table.num_rows)))), out2 / "embeddings" / name)
    record = manifest(out2)
    record["stages"]["embeddings"]["shards"][name].update(bytes=committed.bytes, sha256=committed.sha256)
    (out2 / "manifest.json").write_text(json.dumps(record))
    assert f"embeddings/{name}: row 0: id differs from tokens/{name}" in _problems(out2)


def test_verify_reconciles_counts_and_duplicate_ids(finished, tmp_path):
    out = _copy(finished, tmp_path)
    (quarantined,) = (out / "quarantine").glob("*.jsonl")
    quarantined.write_text("")
    record = manifest(out)
    record["counts"]["rows_in"] += 1
    (out / "manifest.json").write_text(json.dumps(record))
    problems = _problems(out)
    assert f"quarantine/{quarantined.name}: 0 records, the manifest recorded 1" in problems
    assert "manifest counts" in problems and "do not add up" in problems
    assert "duplicate" not in problems

    # A duplicate id (no chunking here: the plain id is the key), planted in both stages of shard 1 alike and
    # restamped in the manifest, so that nothing but the duplicate is left to find.
    dup = _copy(finished, tmp_path / "dup")
    name = "data-00001-of-00003.arrow"
    record = manifest(dup)
    first_id = read_shard(dup / "tokens" / "data-00000-of-00003.arrow").column("id")[0].as_py()
    for stage in ("tokens", "embeddings"):
        table = read_shard(dup / stage / name)
        ids = table.column("id").to_pylist()
        ids[5] = first_id
        table = table.set_column(table.column_names.index("id"), "id", pa.array(ids, pa.string()))
        committed = write_shard(table, dup / stage / name)
        record["stages"][stage]["shards"][name].update(bytes=committed.bytes, sha256=committed.sha256)
        if stage == "tokens":
            record["stages"]["embeddings"]["shards"][name]["tokens_sha256"] = committed.sha256
    (dup / "manifest.json").write_text(json.dumps(record))
    (finding,) = verify_output(dup).problems
    where = f"id {first_id!r} (2 rows): data-00000-of-00003.arrow row 0 and {name} row 5"
    assert finding in (f"tokens: 1 duplicate row ids, e.g. {first_id}", f"tokens: 1 duplicate row ids, e.g. {where}")


def test_staging_leftovers_are_removed_by_the_next_run(ray_cluster, tmp_path):
    corpus = _write_jsonl(tmp_path / "c.jsonl", GOOD)
    config = _config(corpus, tmp_path / "out")
    run_tokenize(config)
    staging = tmp_path / "out" / "tokens" / ".staging"
    staging.mkdir(exist_ok=True)
    (staging / "data-00000-of-00003.arrow.deadbeef.tmp").write_bytes(b"half a shard")
    assert verify_output(tmp_path / "out").warnings
    assert run_tokenize(config).nothing_to_do
    assert not any(staging.iterdir())
    assert verify_output(tmp_path / "out").ok
