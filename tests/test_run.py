"""The tokenize stage end to end on the session's Ray cluster: shards, manifest, datasets, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from pipeline.config import validate_config
from pipeline.errors import ConfigError, JobFailed
from pipeline.output.shards import read_shard
from pipeline.run.driver import run_tokenize

GOOD = [f"Row {i}: " + ("some words here " * (i % 40)) + ("中文" if i % 7 == 0 else "") for i in range(230)]


def _corpus(path: Path, extra_bad: list[bytes] = ()) -> Path:
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in GOOD]
    for k, bad in enumerate(extra_bad):
        lines.insert(10 + 20 * k, bad)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _config(corpus: Path, out: Path, **tokenizer):
    return validate_config({
        "input": {"path": str(corpus), "max_quarantined": 5},
        "output": {"path": str(out), "shard_rows": 50},
        "tokenizer": {"name": "minilm", "max_length": 64, **tokenizer},
    })


def test_shards_equal_the_reference_and_load_with_datasets(ray_cluster, tmp_path, minilm_dir):
    corpus = _corpus(tmp_path / "c.jsonl")
    result = run_tokenize(_config(corpus, tmp_path / "out"))
    tokens = tmp_path / "out" / "tokens"
    names = sorted(p.name for p in tokens.glob("*.arrow"))
    assert names == [f"data-0000{i}-of-00005.arrow" for i in range(5)]
    rows = [row for name in names for row in read_shard(tokens / name).to_pylist()]
    ref = AutoTokenizer.from_pretrained(minilm_dir)(GOOD, padding="max_length", truncation=True, max_length=64)
    assert [r["input_ids"] for r in rows] == ref["input_ids"]
    assert [r["attention_mask"] for r in rows] == ref["attention_mask"]
    assert [r["id"] for r in rows] == [f"c.jsonl:{i + 1}" for i in range(len(GOOD))]

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"rows_in": 230, "rows_out": 230, "quarantined": 0}
    shard_records = manifest["stages"]["tokens"]["shards"]
    assert sorted(shard_records) == names
    for name, record in shard_records.items():
        assert record["bytes"] == (tokens / name).stat().st_size
    totals = manifest["stages"]["tokens"]["totals"]
    assert totals["tokens"] == sum(map(sum, ref["attention_mask"])) == result.totals["tokens"]
    assert sum(totals["length_histogram"]["counts"]) == 230
    assert totals["truncated_rows"] == sum(len(x) > 64 for x in AutoTokenizer.from_pretrained(minilm_dir)(GOOD)["input_ids"])

    ds = datasets.load_from_disk(str(tokens))
    assert len(ds) == 230 and ds[3]["input_ids"] == ref["input_ids"][3]
    batch = ds.with_format("torch")[:4]
    assert isinstance(batch["input_ids"], torch.Tensor) and batch["input_ids"].shape == (4, 64)
    assert not list(tokens.glob(".staging/*"))


def test_rerun_does_nothing_and_other_config_is_refused(ray_cluster, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    run_tokenize(_config(corpus, out))
    before = {p.name: p.read_bytes() for p in (out / "tokens").glob("*.arrow")}
    again = run_tokenize(_config(corpus, out))
    assert again.nothing_to_do
    with pytest.raises(ConfigError, match=r"different job \(config tokenizer.max_length \(64 -> 32\)"):
        run_tokenize(_config(corpus, out, max_length=32))
    forced = run_tokenize(_config(corpus, out, max_length=32), force=True)
    assert not forced.nothing_to_do
    after = {p.name: p.read_bytes() for p in (out / "tokens").glob("*.arrow")}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)


def test_resume_redoes_only_missing_or_damaged_shards(ray_cluster, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    run_tokenize(_config(corpus, out))
    original = {p.name: p.read_bytes() for p in (out / "tokens").glob("*.arrow")}
    (out / "tokens" / "data-00001-of-00005.arrow").unlink()
    damaged = out / "tokens" / "data-00003-of-00005.arrow"
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["tokens"]["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_tokenize(_config(corpus, out))
    assert result.skipped_shards == 3
    assert {p.name: p.read_bytes() for p in (out / "tokens").glob("*.arrow")} == original


def test_bad_rows_go_to_quarantine_and_are_counted(ray_cluster, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", [b"not json", b'{"text": null}', b'{"text": "\xff\xfe"}'])
    out = tmp_path / "out"
    run_tokenize(_config(corpus, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"rows_in": 233, "rows_out": 230, "quarantined": 3}
    records = [json.loads(line) for f in sorted((out / "quarantine").glob("*.jsonl")) for line in f.open()]
    assert [(r["source"], r["position"]) for r in records] == [("c.jsonl", "line 11"), ("c.jsonl", "line 31"),
                                                              ("c.jsonl", "line 51")]
    assert "malformed JSON" in records[0]["reason"] and "null" in records[1]["reason"]
    assert "UTF-8" in records[2]["reason"]
    # The good rows' shards hold exactly the good rows, in order.
    texts_out = sum(read_shard(p).num_rows for p in (out / "tokens").glob("*.arrow"))
    assert texts_out == 230


def test_too_many_quarantined_rows_fail_the_job(ray_cluster, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", [b"bad"] * 6)
    with pytest.raises(JobFailed, match="6 of 236 input rows were quarantined"):
        run_tokenize(_config(corpus, tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed"


def test_chunking_long_documents(ray_cluster, tmp_path, minilm_dir):
    corpus = _corpus(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    run_tokenize(_config(corpus, out, stride=8, padding="none"))
    ds = datasets.load_from_disk(str(out / "tokens"))
    ref = AutoTokenizer.from_pretrained(minilm_dir)(GOOD, truncation=True, max_length=64, stride=8,
                                                   return_overflowing_tokens=True)
    assert ds["input_ids"] == ref["input_ids"]
    assert ds["id"] == [f"c.jsonl:{i + 1}" for i in ref["overflow_to_sample_mapping"]]
    assert max(ds["chunk"]) > 0
