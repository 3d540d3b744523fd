"""Readers of every input format, file discovery, column checks and the plan of work units."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.inputs.columns import check_columns
from pipeline.inputs.discovery import discover
from pipeline.inputs.plan import plan_units
from pipeline.tokenize.stage import ReadSpec, read_unit

TEXTS = [f"document number {i} " + "word " * (i % 13) for i in range(257)]


def _rows(units, text_column="text", id_column=None):
    ids, texts, bad = [], [], []
    for unit in units:
        for batch in read_unit(unit, ReadSpec(text_column, id_column)):
            ids += batch.ids
            texts += batch.texts
            bad += batch.bad
    return ids, texts, bad


def _write_jsonl(path, texts, compress=False, trailing_newline=True):
    body = "\n".join(json.dumps({"id": f"k{i}", "text": t}, ensure_ascii=False) for i, t in enumerate(texts))
    data = (body + ("\n" if trailing_newline else "")).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_jsonl_units_cover_every_line_once(tmp_path, compress, trailing_newline):
    path = _write_jsonl(tmp_path / ("c.jsonl.gz" if compress else "c.jsonl"), TEXTS, compress, trailing_newline)
    files = discover(str(path))
    units = plan_units(files, shard_rows=50)
    assert [u.num_rows for u in units] == [50] * 5 + [7]
    ids, texts, bad = _rows(units)
    assert texts == TEXTS and not bad
    assert ids == [f"{path.name}:{i + 1}" for i in range(len(TEXTS))]
    starts = [u.byte_start for u in units]
    assert starts[0] == 0 and all(a.byte_stop == b.byte_start for a, b in zip(units, units[1:]))


def test_large_file_is_cut_by_bytes_at_line_starts(tmp_path):
    path = _write_jsonl(tmp_path / "big.jsonl", TEXTS)
    units = plan_units(discover(str(path)), shard_rows=10_000, max_unit_bytes=1000)
    assert len(units) > 5
    raw = path.read_bytes()
    for unit in units:
        assert unit.byte_start == 0 or raw[unit.byte_start - 1:unit.byte_start] == b"\n"
        # a unit passes the byte limit by at most the one line that crosses it
        assert unit.byte_stop - unit.byte_start < 1000 + max(len(line) for line in raw.splitlines()) + 1
    assert _rows(units)[1] == TEXTS


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_plan_is_deterministic_and_independent_of_chunking(tmp_path, monkeypatch, compress, trailing_newline):
    """The planner scans line files in blocks of ``_SCAN_CHUNK`` bytes (8 MiB: this whole file is one block);
    cut into blocks of 1 byte up to more than the file, the units must not move, by rows or by bytes."""
    import pipeline.inputs.plan as planner

    path = _write_jsonl(tmp_path / ("c.jsonl.gz" if compress else "c.jsonl"), TEXTS, compress, trailing_newline)
    files = discover(str(path))
    for limits in ({"shard_rows": 7}, {"shard_rows": 10_000, "max_unit_bytes": 500}):
        first = [u.to_json() for u in plan_units(files, **limits)]
        assert [u.to_json() for u in plan_units(files, **limits)] == first  # deterministic
        assert len(first) > 10 and sum(u["num_rows"] for u in first) == len(TEXTS)
        for block in (1, 2, 3, 61, 500, 4096, 1 << 20):
            monkeypatch.setattr(planner, "_SCAN_CHUNK", block)
            assert [u.to_json() for u in plan_units(files, **limits)] == first, (limits, block)
        monkeypatch.undo()


def test_text_format_one_document_per_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes("first line\r\n\nthird: 中文\n".encode())
    ids, texts, bad = _rows(plan_units(discover(str(path)), shard_rows=2))
    assert texts == ["first line", "", "third: 中文"]
    assert ids == ["docs.txt:1", "docs.txt:2", "docs.txt:3"]


def test_parquet_row_ranges_across_row_groups(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": TEXTS, "key": list(range(len(TEXTS)))}), path, row_group_size=40)
    files = discover(str(path))
    check_columns(files, "body", "key")
    units = plan_units(files, shard_rows=64)
    assert [u.num_rows for u in units] == [64, 64, 64, 64, 1]
    ids, texts, bad = _rows(units, "body", "key")
    assert texts == TEXTS and ids == [str(i) for i in range(len(TEXTS))]


def test_datasets_directory_and_arrow_files(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"), num_shards=3)
    files = discover(str(tmp_path / "saved"))
    assert [f.name for f in files] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    assert _rows(plan_units(files, shard_rows=30))[1] == TEXTS
    # The Arrow IPC *file* format is read too.
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": TEXTS}), max_chunksize=100)
    assert _rows(plan_units(discover(str(tmp_path / "f.arrow")), shard_rows=60))[1] == TEXTS


def test_glob_and_directory_discovery_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "sub" / "b.jsonl", TEXTS[:3])
    _write_jsonl(tmp_path / "a.jsonl", TEXTS[3:5])
    (tmp_path / "README.md").write_text("not input")
    assert [f.name for f in discover(str(tmp_path))] == ["a.jsonl", "sub/b.jsonl"]
    assert [f.name for f in discover(str(tmp_path / "**" / "*.jsonl"))] == ["a.jsonl", "sub/b.jsonl"]


def test_fsspec_uri(tmp_path):
    import fsspec

    with fsspec.open("memory://corpus/c.jsonl", "wb") as fh:
        fh.write(b'{"text": "in memory"}\n{"text": "second"}\n')
    files = discover("memory://corpus/c.jsonl")
    assert _rows(plan_units(files, shard_rows=10))[1] == ["in memory", "second"]


def test_missing_paths_and_columns_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="input.path"):
        discover(str(tmp_path / "nope.jsonl"))
    path = _write_jsonl(tmp_path / "c.jsonl", TEXTS[:2])
    with pytest.raises(ConfigError, match="input.text_column: column 'body' not found in c.jsonl"):
        check_columns(discover(str(path)), "body", None)
    with pytest.raises(ConfigError, match="input.id_column: column 'uid'"):
        check_columns(discover(str(path)), "text", "uid")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(ConfigError, match="not a string"):
        check_columns(discover(str(tmp_path / "n.parquet")), "text", None)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ConfigError, match="input.format"):
        discover(str(tmp_path / "x.csv"))


def test_bad_rows_are_reported_with_position_and_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"text": "good"}\n'
        b'{"text": null}\n'
        b'{"text": 5}\n'
        b'not json\n'
        b'{"text": "bad utf8 \xff"}\n'
        b'[1, 2]\n'
        b'\n'
        b'{"other": "x"}\n'
        b'{"text": ""}\n'
    )
    ids, texts, bad = _rows(plan_units(discover(str(path)), shard_rows=4))
    assert texts == ["good", ""]
    # line 7 is blank: not a row, skipped and counted (tests/test_hostile_inputs.py), not quarantined
    assert [b.position for b in bad] == [f"line {n}" for n in (2, 3, 4, 5, 6, 8)]
    reasons = [b.reason for b in bad]
    assert "null" in reasons[0] and "int" in reasons[1] and "malformed JSON" in reasons[2]
    assert "UTF-8" in reasons[3] and "not a JSON object" in reasons[4]
    assert "no 'text' field" in reasons[5]
    assert bad[3].raw == '{"text": "bad utf8 \\xff"}'
