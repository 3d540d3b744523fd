"""Inputs as an adversary or a careless user leaves them (issue 20, readers): byte order marks, file names
holding glob characters, missing decompressors, dictionary / large / view string columns, files a
directory input passes over, blank JSONL lines, a column missing from the first rows, and the job's
own output directory inside its input directory. Real files in tmp_path, real readers."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runs import REPO, cli_env, manifest

from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.inputs.columns import check_columns
from pipeline.inputs.discovery import discover, find_inputs
from pipeline.inputs.plan import plan_units
from pipeline.tokenize.stage import ReadSpec, read_unit

BOM = b"\xef\xbb\xbf"
TEXTS = [f"row {i} " + "word " * (i % 7) for i in range(40)]


def _read(units, text_column="text", id_column=None):
    ids, texts, bad, blank = [], [], [], 0
    for unit in units:
        for batch in read_unit(unit, ReadSpec(text_column, id_column)):
            ids += batch.ids
            texts += batch.texts
            bad += batch.bad
            blank += batch.blank
    return ids, texts, bad, blank


def _jsonl_bytes(texts, key="text") -> bytes:
    return b"".join(json.dumps({key: t}).encode() + b"\n" for t in texts)


# ---------------------------------------------------------------- 1. byte order mark


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.jsonl.gz", "bom.txt"])
def test_a_utf8_bom_is_stripped_and_later_offsets_stay_right(tmp_path, name):
    body = "".join(t + "\n" for t in TEXTS).encode() if name.endswith(".txt") else _jsonl_bytes(TEXTS)
    path = tmp_path / name
    path.write_bytes(gzip.compress(BOM + body, mtime=0) if name.endswith(".gz") else BOM + body)
    files = discover(str(path))
    check_columns(files, "text", None)
    units = plan_units(files, shard_rows=7)
    ids, texts, bad, _ = _read(units)
    assert not bad, bad[:1]
    assert texts == TEXTS  # row 1 is the text itself, without U+FEFF
    assert ids[0] == f"{name}:1"
    # The plan's offsets count the BOM: each later unit starts right after a newline of the raw stream.
    raw = BOM + body
    assert units[0].byte_start == 0 and units[-1].byte_stop == len(raw)
    for unit in units[1:]:
        assert raw[unit.byte_start - 1:unit.byte_start] == b"\n"


# ---------------------------------------------------------------- 2. an existing path is itself


def test_an_existing_file_whose_name_holds_glob_characters_is_that_file(tmp_path):
    (tmp_path / "data[1].jsonl").write_bytes(_jsonl_bytes(["the bracketed file"]))
    (tmp_path / "data1.jsonl").write_bytes(_jsonl_bytes(["what the pattern matches"]))
    files = discover(str(tmp_path / "data[1].jsonl"))
    assert [f.name for f in files] == ["data[1].jsonl"]
    assert _read(plan_units(files, 10))[1] == ["the bracketed file"]
    # A directory with such a name is that directory too.
    folder = tmp_path / "part[ab]"
    folder.mkdir()
    (folder / "x.jsonl").write_bytes(_jsonl_bytes(["in the folder"]))
    assert [f.name for f in discover(str(folder))] == ["x.jsonl"]
    # A pattern is a pattern when no such path exists.
    assert [f.name for f in discover(str(tmp_path / "data?.jsonl"))] == ["data1.jsonl"]


# ---------------------------------------------------------------- 3. missing decompressors

# A valid zstd frame holding one JSONL row (one raw block), so no zstd library is needed to make it.
_ROW = b'{"text": "zstd row"}\n'
ZSTD_FRAME = b"\x28\xb5\x2f\xfd" + bytes([0x20, len(_ROW)]) + (1 | (len(_ROW) << 3)).to_bytes(3, "little") + _ROW

_BLOCKED = {"zstandard": ("c.jsonl.zst", "zstandard"), "bz2": ("c.jsonl.bz2", "bz2"), "lzma": ("c.jsonl.xz", "lzma")}


@pytest.mark.parametrize("module", list(_BLOCKED))
def test_a_compressed_input_without_its_decompressor_is_a_config_error(tmp_path, module):
    """The module is made unimportable in a fresh interpreter, before anything imports it."""
    name, named = _BLOCKED[module]
    path = tmp_path / name
    path.write_bytes({"zstandard": ZSTD_FRAME, "bz2": b"BZh9" + _ROW, "lzma": b"\xfd7zXZ\x00" + _ROW}[module])
    blocked = [module] + (["backports.zstd", "compression.zstd"] if module == "zstandard" else [])
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "from pipeline.errors import ConfigError\n"
        "from pipeline.inputs.discovery import discover\n"
        "try:\n"
        f"    discover({str(path)!r})\n"
        "except ConfigError as exc:\n"
        "    print('ConfigError:', exc)\n"
        "else:\n"
        "    print('read as raw bytes')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ConfigError: input.path: ") and str(path) in done.stdout, done.stdout
    assert named in done.stdout and Path(name).suffix in done.stdout, done.stdout


def test_zst_without_zstandard_exits_2_in_the_cli(tmp_path):
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(ZSTD_FRAME)
    code = ("import sys\n"
            "for m in ('zstandard', 'backports.zstd', 'compression.zstd'): sys.modules[m] = None\n"
            "from jobs.cli import main\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code, "tokenize", "conf/default.yaml", "--set",
                           f"input.path={path}", "-o", str(tmp_path / "out")],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "c.jsonl.zst" in done.stderr and "zstandard" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "tokens").exists()


# ---------------------------------------------------------------- 4. dictionary, large and view strings


def test_dictionary_large_and_view_string_columns_are_read(tmp_path):
    n = len(TEXTS)
    keys = [f"k{i}" for i in range(n)]
    pq.write_table(pa.table({"text": pa.array(TEXTS).dictionary_encode(), "id": pa.array(keys, pa.large_string())}),
                   tmp_path / "dict.parquet", row_group_size=15)
    pq.write_table(pa.table({"text": pa.array(TEXTS, pa.string_view()), "id": pa.array(keys).dictionary_encode()}),
                   tmp_path / "view.parquet")
    arrow_table = pa.table({"text": pa.array(TEXTS, pa.large_string()), "id": pa.array(keys, pa.string_view())})
    with pa.OSFile(str(tmp_path / "large.arrow"), "wb") as sink, pa.ipc.new_stream(sink, arrow_table.schema) as w:
        w.write_table(arrow_table, max_chunksize=9)
    dict_table = pa.table({"text": pa.array(TEXTS).dictionary_encode(), "id": pa.array(range(n)).dictionary_encode()})
    with pa.OSFile(str(tmp_path / "dict.arrow"), "wb") as sink, pa.ipc.new_file(sink, dict_table.schema) as w:
        w.write_table(dict_table, max_chunksize=n)
    for name, want_ids in (("dict.parquet", keys), ("view.parquet", keys), ("large.arrow", keys),
                           ("dict.arrow", [str(i) for i in range(n)])):
        files = discover(str(tmp_path / name))
        check_columns(files, "text", "id")  # not refused
        ids, texts, bad, _ = _read(plan_units(files, shard_rows=11), "text", "id")
        assert not bad and texts == TEXTS and ids == want_ids, name


# ---------------------------------------------------------------- 5 + 8. skipped files, the output directory


def _messy_directory(root: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.jsonl").write_bytes(_jsonl_bytes(TEXTS[:5]))
    (corpus / "sub" / "b.jsonl").write_bytes(_jsonl_bytes(TEXTS[5:9]))
    (corpus / "notes.csv").write_text("a,b\n")
    (corpus / "_meta.jsonl").write_bytes(_jsonl_bytes(["underscore"]))
    (corpus / ".cache.jsonl").write_bytes(_jsonl_bytes(["dot"]))
    (corpus / ".git" / "objects").mkdir(parents=True)
    (corpus / ".git" / "objects" / "x.json").write_text("{}")
    (corpus / ".git" / "HEAD").write_text("ref")
    # What a previous run left in an output directory inside the input directory.
    out = corpus / "out"
    (out / "quarantine").mkdir(parents=True)
    (out / "quarantine" / "tokens-data-00000-of-00001.jsonl").write_bytes(_jsonl_bytes(["quarantined"]))
    (out / "tokens").mkdir()
    (out / "tokens" / "state.json").write_text('{"text": "looks like a row"}')
    return corpus


def test_skipped_files_are_logged_with_the_reason_and_the_output_directory_is_excluded(tmp_path, caplog,
                                                                                         monkeypatch):
    corpus = _messy_directory(tmp_path)
    with caplog.at_level(logging.INFO, logger="embedpipe"):
        found = find_inputs(str(corpus), exclude=str(corpus / "out"))
    assert [f.name for f in found.files] == ["a.jsonl", "sub/b.jsonl"]
    reasons = {s.path: s.reason for s in found.skipped}
    assert set(reasons) == {".cache.jsonl", ".git/", "_meta.jsonl", "notes.csv", "out/"}
    assert "'.'" in reasons[".cache.jsonl"] and "'_'" in reasons["_meta.jsonl"]
    assert "2 files" in reasons[".git/"] and "suffix" in reasons["notes.csv"] and "input.format" in reasons["notes.csv"]
    assert "output directory" in reasons["out/"] and "2 files" in reasons["out/"]
    logged = [r for r in caplog.records if r.name == "embedpipe"]
    for path, reason in reasons.items():
        assert any(path in r.getMessage() and reason in r.getMessage() for r in logged), path
    assert any(r.levelno == logging.WARNING and "notes.csv" in r.getMessage() for r in logged)
    # A relative output path names the same directory; a glob input leaves it out as well.
    monkeypatch.chdir(tmp_path)
    assert [f.name for f in discover(str(corpus), exclude="corpus/out")] == ["a.jsonl", "sub/b.jsonl"]
    globbed = find_inputs(str(corpus / "**" / "*.jsonl"), exclude="corpus/out/")
    assert {"a.jsonl", "sub/b.jsonl"} <= {f.name for f in globbed.files}
    assert not [f.name for f in globbed.files if f.name.startswith("out/")]
    assert [s.path for s in globbed.skipped] == ["out/"]
    # Without exclude the old output is read back as input (what the driver must stop passing).
    assert "out/quarantine/tokens-data-00000-of-00001.jsonl" in [f.name for f in discover(str(corpus))]


def test_plan_lists_the_skipped_files_and_leaves_out_the_output_directory(tmp_path):
    from pipeline.ops.preview import format_preview, preview_job

    corpus = _messy_directory(tmp_path)
    config = validate_config({"input": {"path": str(corpus), "format": "auto"},
                              "output": {"path": str(corpus / "out"), "shard_rows": 100},
                              "tokenizer": {"name": "minilm", "max_length": 16}})
    preview = preview_job(config, ("tokens",))
    assert preview.files == 2 and preview.rows == 9
    assert {s["path"] for s in preview.skipped} == {".cache.jsonl", ".git/", "_meta.jsonl", "notes.csv", "out/"}
    text = format_preview(preview)
    assert "not read: 5" in text and "notes.csv: no reader takes its suffix" in text and "out/: the job's output" in text
    assert json.loads(json.dumps(preview.to_json()))["skipped"][0]["reason"]


# ---------------------------------------------------------------- 6. blank JSONL lines


def test_blank_jsonl_lines_are_skipped_and_counted_not_quarantined(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(b'{"text": "one"}\n\n   \n{"text": "two"}\n\t\r\n{"text": "three"}\n\n')
    ids, texts, bad, blank = _read(plan_units(discover(str(path)), shard_rows=2))
    assert texts == ["one", "two", "three"] and not bad and blank == 4
    assert ids == ["gaps.jsonl:1", "gaps.jsonl:4", "gaps.jsonl:6"]  # positions are still line numbers
    # A text file's empty line is an empty document, a row.
    txt = tmp_path / "gaps.txt"
    txt.write_bytes(b"one\n\ntwo\n")
    assert _read(plan_units(discover(str(txt)), shard_rows=2))[1:] == (["one", "", "two"], [], 0)


def test_blank_lines_do_not_count_against_max_quarantined_and_verify_adds_them_up(ray_cluster, tmp_path):
    from pipeline.ops.verify import verify_output
    from pipeline.run.driver import run_tokenize

    corpus = tmp_path / "gaps.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in TEXTS]
    for at in (0, 7, 8, 30):
        lines.insert(at, b"  " if at == 7 else b"")
    corpus.write_bytes(b"\n".join(lines) + b"\n\n")
    out = tmp_path / "out"
    config = validate_config({"input": {"path": str(corpus), "max_quarantined": 0},
                              "output": {"path": str(out), "shard_rows": 10},
                              "tokenizer": {"name": "minilm", "max_length": 16}})
    result = run_tokenize(config)
    assert result.totals["rows"] == len(TEXTS) and result.totals["quarantined"] == 0
    record = manifest(out)
    assert record["stages"]["tokens"]["totals"]["blank_lines"] == 5
    assert record["counts"] == {"rows_in": len(TEXTS), "rows_out": len(TEXTS), "quarantined": 0}
    assert not (out / "quarantine").exists() or not any((out / "quarantine").iterdir())
    assert verify_output(out).ok, verify_output(out).problems
    # The accounting is checked: blank lines that do not add up to the plan's lines are a problem.
    first = next(iter(record["stages"]["tokens"]["shards"].values()))
    first["blank_lines"] += 1
    (out / "manifest.json").write_text(json.dumps(record))
    problems = verify_output(out).problems
    assert any("blank lines" in p for p in problems), problems


# ---------------------------------------------------------------- 7. a column missing from the first rows


def test_a_text_key_missing_from_the_first_row_is_decided_per_row(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_bytes(b'{"title": "no text here"}\n' + _jsonl_bytes(TEXTS[:3]))
    files = discover(str(path))
    check_columns(files, "text", None)  # not refused: rows 2-4 have it
    _, texts, bad, _ = _read(plan_units(files, 10))
    assert texts == TEXTS[:3]
    assert [(b.source, b.position) for b in bad] == [("late.jsonl", "line 1")]
    assert "'text'" in bad[0].reason and "input.text_column" in bad[0].reason


def test_a_column_no_sampled_row_has_refuses_the_job_naming_the_sample(tmp_path):
    path = tmp_path / "body.jsonl"
    path.write_bytes(_jsonl_bytes([f"t{i}" for i in range(150)], key="body") + _jsonl_bytes(["late"]))
    with pytest.raises(ConfigError) as caught:
        check_columns(discover(str(path)), "text", None)
    message = str(caught.value)
    assert message.startswith("input.text_column: column 'text' not found in body.jsonl")
    assert "100 rows sampled" in message and "lines 1-100" in message and "body" in message
    with pytest.raises(ConfigError, match=r"input.id_column: column 'uid' not found in body.jsonl: none of the 100"):
        check_columns(discover(str(path)), "body", "uid")


def test_duplicate_ids_fail_the_job_naming_both_positions_never_complete(tmp_path):
    from cli_runs import embedpipe

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"a {i}"}) + "\n"
                                                     for i in range(30)))
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"b {i}"}) + "\n"
                                                     for i in (40, 41, 7, 42)))
    out = tmp_path / "out"
    done = embedpipe("tokenize", "conf/default.yaml", "--set", f"input.path={tmp_path / 'in'}",
                     "--set", "output.shard_rows=20", "--set", "tokenizer.max_length=16", "-o", str(out),
                     "--no-progress")
    assert done.returncode == 1, done.stderr
    assert "id 'r7'" in done.stderr and "data-00000-of-00003.arrow row 7" in done.stderr
    assert "data-00002-of-00003.arrow row 2" in done.stderr
    assert manifest(out)["stages"]["tokens"]["status"] == "failed"
    verified = embedpipe("verify", str(out))
    assert verified.returncode == 1 and "duplicate row ids" in verified.stdout and "r7" in verified.stdout
