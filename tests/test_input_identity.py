"""Input identity by content, not mtime (issue 20): each unit's input is hashed as the tokenize task reads it,
recorded per shard (``input_sha256``), and re-hashed on resume: a file rewritten with the same size and its
modification time restored is found, naming the file and the byte or row range. Real files, real readers."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runs import embedpipe, manifest, output_files

from pipeline.errors import ConfigError
from pipeline.inputs import identity
from pipeline.inputs.columnar import hash_columns
from pipeline.inputs.discovery import discover
from pipeline.inputs.identity import changed_units, check_committed_inputs, input_hasher, unit_digest
from pipeline.inputs.plan import plan_units
from pipeline.output.manifest import differences
from pipeline.tokenize.stage import ReadSpec, read_unit, run_unit

TEXTS = [f"row {i} " + "word " * (i % 11) for i in range(60)]
SHARD_ROWS = 20  # three units of 20 rows


def _write(path: Path, texts: list[str]) -> None:
    """The corpus in the format its name says; Parquet uncompressed and plain, so one character is one byte."""
    if path.name.endswith(".parquet"):
        table = pa.table({"id": [f"k{i}" for i in range(len(texts))], "text": texts})
        pq.write_table(table, path, row_group_size=7, compression="NONE", use_dictionary=False,
                       write_statistics=False)
    elif path.name.endswith((".txt", ".txt.gz")):
        body = "".join(t + "\n" for t in texts).encode()
        path.write_bytes(gzip.compress(body, mtime=0) if path.name.endswith(".gz") else body)
    else:
        body = b"".join(json.dumps({"id": f"k{i}", "text": t}).encode() + b"\n" for i, t in enumerate(texts))
        path.write_bytes(gzip.compress(body, mtime=0) if path.name.endswith(".gz") else body)


def _rewrite_keeping_size_and_mtime(path: Path, texts: list[str]) -> None:
    """What ``rsync -t`` or ``cp -p`` leave: other bytes, the same size and modification time."""
    before = path.stat()
    _write(path, texts)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _one_letter_changed(row: int) -> list[str]:
    texts = list(TEXTS)
    texts[row] = texts[row].replace("row", "rox", 1)  # same length
    return texts


def _read_digests(units, read: ReadSpec) -> list[str]:
    """Each unit's digest as the tokenize task computes it: fed while its rows are read."""
    found = []
    for unit in units:
        hasher = input_hasher()
        for _ in read_unit(unit, read, hasher):
            pass
        found.append(hasher.hexdigest())
    return found


FORMATS = ["c.jsonl", "c.txt", "c.parquet", "c.jsonl.gz"]


def _read_spec(name: str) -> ReadSpec:
    return ReadSpec("text", None if name.startswith("c.txt") else "id")


@pytest.mark.parametrize("name", FORMATS)
def test_a_units_digest_is_deterministic_and_changes_with_one_byte_of_its_range(tmp_path, name):
    path = tmp_path / name
    _write(path, TEXTS)
    files = discover(str(path))
    units = plan_units(files, SHARD_ROWS)
    assert len(units) == 3
    read = _read_spec(name)
    first = _read_digests(units, read)
    # The same bytes, read again (the tokenize path) or re-hashed (the resume path), give the same digests.
    assert _read_digests(units, read) == first
    assert [unit_digest(u, read.text_column, read.id_column) for u in units] == first
    assert len(set(first)) == 3

    if name.endswith(".gz"):
        _write(path, _one_letter_changed(25))  # a gzip member's size moves with its content
    else:
        _rewrite_keeping_size_and_mtime(path, _one_letter_changed(25))  # row 25: in the second unit
    again = discover(str(path))
    if not name.endswith(".gz"):
        assert [f.fingerprint() for f in again] == [f.fingerprint() for f in files]  # the old check sees nothing
    new_units = plan_units(again, SHARD_ROWS)
    assert [u.to_json() for u in new_units] == [u.to_json() for u in units]  # nor does the plan
    now = _read_digests(new_units, read)
    assert now[0] == first[0] and now[2] == first[2]
    assert now[1] != first[1]


def test_a_line_units_digest_is_the_sha256_of_exactly_its_byte_range(tmp_path):
    import hashlib

    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({"text": t}).encode() + b"\n" for t in TEXTS))
    units = plan_units(discover(str(path)), SHARD_ROWS)
    raw = path.read_bytes()
    assert _read_digests(units, ReadSpec("text", None)) == [
        hashlib.sha256(raw[u.byte_start:u.byte_stop]).hexdigest() for u in units]  # the BOM included


def test_the_columnar_digest_is_of_the_values_not_the_layout():
    """Chunking, slice offsets, string layout and dictionary encoding do not move it; a value does."""
    texts = pa.array(["a", "bb", None, "dddd", ""], pa.string())

    def digest(table):
        hasher = input_hasher()
        hash_columns(hasher, table)
        return hasher.hexdigest()

    base = digest(pa.table({"text": texts}))
    assert digest(pa.table({"text": pa.chunked_array([texts[:2], texts[2:]])})) == base
    assert digest(pa.table({"text": texts.cast(pa.large_string())})) == base
    assert digest(pa.table({"text": texts.dictionary_encode()})) == base
    assert digest(pa.table({"text": pa.array(["x", "a", "bb", None, "dddd", ""])}).slice(1)) == base
    assert digest(pa.table({"text": pa.array(["a", "bb", "", "dddd", ""])})) != base  # a null is not ""
    assert digest(pa.table({"text": pa.array(["a", "bb", None, "dddd", "x"])})) != base
    assert digest(pa.table({"text": pa.array(["ab", "b", None, "dddd", ""])})) != base  # where values end counts
    assert digest(pa.table({"other": texts})) != base  # the column's name counts
    ids = pa.array([1, 2, 3, 4, 5], pa.int32())
    assert digest(pa.table({"text": texts, "id": ids})) == digest(pa.table({"text": texts, "id": ids.cast(pa.int64())}))
    assert digest(pa.table({"text": texts, "id": ids})) != digest(pa.table({"text": texts, "id": ids.cast(pa.string())}))


# ---------------------------------------------------------------- the resume check


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    import tiny_tokenizers

    from pipeline.config import validate_config
    from pipeline.tokenize.loading import load_tokenize_spec

    tokenizer = tiny_tokenizers.train_wordpiece(tmp_path_factory.mktemp("tok") / "wordpiece")
    return load_tokenize_spec(validate_config({"input": {"path": "unused"},
                                               "tokenizer": {"name": str(tokenizer), "max_length": 16}}))


def _interrupted_job(tmp_path: Path, name: str, spec, committed: int = 2) -> tuple[dict, list]:
    """The manifest of a job stopped after committing the first ``committed`` shards, made by the real task."""
    path = tmp_path / name
    _write(path, TEXTS)
    units = plan_units(discover(str(path)), SHARD_ROWS)
    out = tmp_path / "out"
    shards = {}
    for unit in units[:committed]:
        shard = f"data-{unit.index:05d}-of-{len(units):05d}.arrow"
        shards[shard] = run_unit(unit, shard, _read_spec(name), spec, str(out))
    return {"plan": {"units": [u.to_json() for u in units]},
            "stages": {"tokens": {"status": "running", "shards": shards}}}, units


def _check(old, path: Path, name: str, force: bool = False) -> list[str]:
    units = plan_units(discover(str(path)), SHARD_ROWS)
    read = _read_spec(name)
    return check_committed_inputs(old, units, read.text_column, read.id_column, force)


@pytest.mark.parametrize("name", FORMATS)
def test_the_resume_check_names_the_file_and_range_whose_content_changed(tmp_path, spec, name):
    old, units = _interrupted_job(tmp_path, name, spec)
    shard = old["stages"]["tokens"]["shards"]["data-00001-of-00003.arrow"]
    assert len(shard["input_sha256"]) == 64 and shard["input_sha256"] == unit_digest(units[1], "text",
                                                                                    _read_spec(name).id_column)
    path = tmp_path / name
    assert _check(old, path, name) == []  # unchanged: resume goes ahead
    # A change under a unit not committed yet is no mix: that unit is read as it is now.
    if name.endswith(".gz"):
        _write(path, _one_letter_changed(45))
    else:
        _rewrite_keeping_size_and_mtime(path, _one_letter_changed(45))
    assert _check(old, path, name) == []
    if name.endswith(".gz"):
        _write(path, _one_letter_changed(25))
    else:
        _rewrite_keeping_size_and_mtime(path, _one_letter_changed(25))
    with pytest.raises(ConfigError) as refused:
        _check(old, path, name)
    message = str(refused.value)
    assert str(path) in message and "data-00001-of-00003.arrow" in message and "--force" in message
    assert "data-00000" not in message  # the unchanged unit is not named
    where = "rows 20-39" if name.endswith(".parquet") else "lines 21-40"
    assert where in message
    if not name.endswith(".parquet"):
        assert f"bytes {units[1].byte_start}-{units[1].byte_stop}" in message
    # --force: the findings come back for the driver to start over (differences() then says so).
    findings = _check(old, path, name, force=True)
    assert len(findings) == 1 and str(path) in findings[0]
    fresh = {"stage_hashes": {"tokens": "t"}, "tokenizer_sha256": "x", "config_hash": "c", "config": {},
             "input": {"fingerprint": "f", "content_changed": findings}, "plan": old["plan"]}
    same = {**fresh, "input": {"fingerprint": "f"}, "stages": {}}
    assert differences(same, {**fresh, "input": {"fingerprint": "f"}}) == []
    assert any("input content" in d for d in differences(same, fresh))


def test_a_finished_tokens_stage_is_not_re_hashed(tmp_path, spec, monkeypatch):
    old, _ = _interrupted_job(tmp_path, "c.jsonl", spec, committed=3)
    old["stages"]["tokens"]["status"] = "complete"
    monkeypatch.setattr(identity, "changed_units", lambda *a, **k: pytest.fail("a finished job was re-hashed"))
    _rewrite_keeping_size_and_mtime(tmp_path / "c.jsonl", _one_letter_changed(5))
    assert _check(old, tmp_path / "c.jsonl", "c.jsonl") == []
    assert check_committed_inputs(None, [], "text", None) == []


def test_a_gone_or_shortened_file_is_a_finding(tmp_path, spec):
    old, units = _interrupted_job(tmp_path, "c.txt", spec)
    path = tmp_path / "c.txt"
    path.write_bytes(path.read_bytes()[: units[1].byte_stop - 10])
    found = changed_units(old, units, "text", None)  # this run's files: as discovered before the cut
    assert len(found) == 1 and "lines 21-40" in found[0]
    other = tmp_path / "other.txt"
    _write(other, TEXTS)
    found = changed_units(old, plan_units(discover(str(other)), SHARD_ROWS), "text", None)
    assert len(found) == 2 and all("c.txt: no longer among the input files" in f for f in found)


def test_shards_without_a_digest_are_passed_over_with_a_warning(tmp_path, spec, caplog):
    old, units = _interrupted_job(tmp_path, "c.jsonl", spec)
    for record in old["stages"]["tokens"]["shards"].values():
        del record["input_sha256"]
    _rewrite_keeping_size_and_mtime(tmp_path / "c.jsonl", _one_letter_changed(5))
    with caplog.at_level("WARNING", logger="embedpipe"):
        assert changed_units(old, units, "text", "id") == []
    assert "record no input digest" in caplog.text


def test_an_object_stores_content_tag_spares_the_re_read(tmp_path, spec, monkeypatch):
    """Where the store keeps a content tag (S3 ETag ...) and it is the one recorded, the object is not read."""
    old, units = _interrupted_job(tmp_path, "c.jsonl", spec)
    tagged = [dataclasses.replace(u, file=dataclasses.replace(u.file, etag='ETag:"abc"')) for u in units]
    for record in old["stages"]["tokens"]["shards"].values():
        record["input_etag"] = 'ETag:"abc"'
    reads = []
    real = identity.unit_digest
    monkeypatch.setattr(identity, "unit_digest", lambda *a: reads.append(a) or real(*a))
    assert changed_units(old, tagged, "text", "id") == [] and reads == []
    # Another tag: the object was written again; it is re-hashed, and found the same or not by its bytes.
    retagged = [dataclasses.replace(u, file=dataclasses.replace(u.file, etag='ETag:"def"')) for u in units]
    assert changed_units(old, retagged, "text", "id") == [] and len(reads) == 2
    _rewrite_keeping_size_and_mtime(tmp_path / "c.jsonl", _one_letter_changed(5))
    assert len(changed_units(old, retagged, "text", "id")) == 1


def test_content_tags_come_from_the_stores_info():
    from pipeline.inputs.files import content_tag

    assert content_tag({"size": 3, "ETag": '"9b2cf535f27731c974343645a3985328"'}).startswith("ETag:")
    assert content_tag({"md5Hash": "m==", "etag": "CJ"}) == "md5Hash:m=="
    assert content_tag({"ETag": 'W/"weak"'}) is None and content_tag({"size": 3, "mtime": 1.0}) is None
    assert content_tag({"crc32c": "AAAAAA=="}) is None  # 32 bits cannot stand for the bytes


# ---------------------------------------------------------------- end to end, through the CLI



@pytest.mark.slow
def test_a_same_size_same_mtime_edit_after_an_interrupted_run_is_refused(tmp_path, wordpiece_dir):
    corpus = tmp_path / "c.jsonl"
    _write(corpus, TEXTS)
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{path: '{corpus}', id_column: id}}\noutput: {{path: unused, shard_rows: 20}}\n"
                      f"tokenizer: {{name: '{wordpiece_dir}', max_length: 16}}\n")
    out = tmp_path / "out"

    def tokenize(*extra):
        return embedpipe("tokenize", str(config), "-o", str(out), "--no-progress", *extra)

    assert tokenize().returncode == 0
    # Make it an interrupted run that committed shards 0 and 1: shard 2 and the stage's end undone.
    record = manifest(out)
    record["status"] = record["stages"]["tokens"]["status"] = "interrupted"
    del record["stages"]["tokens"]["shards"]["data-00002-of-00003.arrow"]
    (out / "tokens" / "data-00002-of-00003.arrow").unlink()
    (out / "manifest.json").write_text(json.dumps(record))
    _rewrite_keeping_size_and_mtime(corpus, _one_letter_changed(5))  # under the committed shard 0
    refused = tokenize()
    assert refused.returncode == 2, refused.stderr
    assert str(corpus) in refused.stderr and "lines 1-20" in refused.stderr and "--force" in refused.stderr
    assert (out / "tokens" / "data-00000-of-00003.arrow").exists()  # a refusal deletes nothing
    forced = tokenize("--force")
    assert forced.returncode == 0, forced.stderr
    fresh = tmp_path / "fresh"
    assert embedpipe("tokenize", str(config), "-o", str(fresh), "--no-progress").returncode == 0
    assert output_files(out) == output_files(fresh)  # every shard from the new input, none from the old
    assert "content_changed" in manifest(out)["input"]  # the record says why the job started over
    checked = embedpipe("verify", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert tokenize().returncode == 0  # finished: a rerun does nothing
