"""Every check ``embedpipe verify`` makes, shown to catch its damage (pipeline/ops/verify.py).

One small finished two-stage job is built per module (tiny BERT, 29 good rows and one quarantined
row, three shards, long documents cut into windows); each case copies it, plants exactly one damage
in the copy and asserts verify's own finding for it. A shard that is rewritten is restamped in the
manifest (size, sha256, and the embeddings' ``tokens_sha256`` for a token shard) so that only the
planted damage is left to find: every problem verify reports must be one the case expects, and each
expected one must be there.

The checks, as verify.py makes them (case ids in brackets):

- manifest: unreadable [manifest_garbage], missing [manifest_missing], records no stage [no_stage]
- per stage: not complete [stage_not_complete]; planned shards not committed [planned_not_committed,
  planned_not_committed_in_a_complete_stage]; listed but missing on disk [shard_missing]; size
  [size_mismatch]; sha256 [sha256_mismatch]; not an Arrow IPC stream [not_arrow]; rows against the
  manifest [row_count_mismatch, row_count_in_manifest]; one shard's schema differs [schema_differs,
  schema_metadata_differs]; dataset_info.json wrong or missing [dataset_info_wrong,
  dataset_info_garbage, dataset_info_missing]; state.json wrong or missing [state_json_wrong,
  state_json_order, state_json_garbage, state_json_missing]; stray shard files [stray_shard];
  staging leftovers, a warning only [test_staging_leftovers_are_a_warning_not_a_problem]
- tokens: rows in = tokenized + quarantined per shard [rows_in_per_shard]; the mask counts ``length``
  [mask_disagrees_with_length]; unique ids, ``(id, chunk)`` when chunking [duplicate_id_across_shards,
  duplicate_id_in_shard, duplicate_id_and_chunk; plain ids without chunks: test_integrity.py's
  duplicate test]; quarantine file missing or with another count [quarantine_file_missing,
  quarantine_count_mismatch]; the plan's rows [plan_rows_mismatch]; the manifest's counts
  [manifest_counts_mismatch]
- embeddings: a token shard to align with [no_token_shard]; made from the token shard on disk
  [older_token_shard]; rows against the token shard [row_count_mismatch]; ids and chunks row for row
  [ids_misaligned, chunk_misaligned]; no nulls [null_embedding]; the recorded NaN/Inf count
  [nan_not_recorded], which needs an embedpipe embedding column [embedding_field_not_embedpipe]

Each check was shown to be needed: with any one ``result.problems.append`` in verify.py made a no-op,
at least one case here goes red.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tiny_models import build_tiny_bert

from pipeline.config import validate_config
from pipeline.ops.verify import verify_output
from pipeline.output.embedding_format import embeddings_to_arrow
from pipeline.output.shards import read_shard, write_shard
from pipeline.run.driver import run_job

GOOD = [{"id": f"r{i}", "text": f"row {i} " + "words " * (i % 9) + ("long words here " * 6 if i % 4 == 0 else "")}
        for i in range(29)]
BAD_LINE = '{"id": "bad", "text": null}'
S0, S1, S2 = (f"data-0000{i}-of-00003.arrow" for i in range(3))


def _job(root: Path, bert: Path, texts: list[dict], **tokenizer) -> Path:
    lines = [json.dumps(r) for r in texts]
    lines.insert(5, BAD_LINE)
    corpus = root / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    run_job(validate_config({
        "input": {"path": str(corpus), "id_column": "id", "max_quarantined": 1},
        "output": {"path": str(root / "out"), "shard_rows": 10},
        "tokenizer": {"name": str(bert), "max_length": 16, **tokenizer},
        "encoder": {"model": str(bert)},
    }))
    return root / "out"


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture(scope="module")
def good(ray_cluster, bert, tmp_path_factory) -> Path:
    """The finished job. Long documents are cut into windows (``tokenizer.stride``), so ids repeat across a
    document's windows and verify keys rows by (id, chunk); test_integrity's duplicate test covers plain ids."""
    out = _job(tmp_path_factory.mktemp("good"), bert, GOOD, stride=4)
    result = verify_output(out)
    assert result.ok and not result.warnings, (result.problems, result.warnings)
    assert sorted(p.name for p in (out / "tokens").glob("*.arrow")) == [S0, S1, S2]
    ids = [i for name in (S0, S1, S2) for i in read_shard(out / "tokens" / name).column("id").to_pylist()]
    assert len(set(ids)) == len(GOOD) < len(ids)  # windows of one document share its id: not duplicates
    return out


# ------------------------------------------------------------------------------------------ helpers


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _save_manifest(out: Path, record: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(record))


def _edit_manifest(out: Path, edit: Callable[[dict], None]) -> None:
    record = _manifest(out)
    edit(record)
    _save_manifest(out, record)


def _rewrite(out: Path, stage: str, name: str, table: pa.Table, restamp_embeddings: bool = True) -> None:
    """Commit ``table`` as ``stage/name`` and make the manifest's size and sha256 agree with it (not its rows)."""
    committed = write_shard(table, out / stage / name)
    record = _manifest(out)
    record["stages"][stage]["shards"][name].update(bytes=committed.bytes, sha256=committed.sha256)
    if stage == "tokens" and restamp_embeddings:
        record["stages"]["embeddings"]["shards"][name]["tokens_sha256"] = committed.sha256
    _save_manifest(out, record)


def _set_column(table: pa.Table, column: str, values: list | pa.Array) -> pa.Table:
    i = table.column_names.index(column)
    field = table.schema.field(i)
    array = values if isinstance(values, pa.Array) else pa.array(values, type=field.type)
    return table.set_column(i, field, array)


def _ids_edit(out: Path, name: str, edit: Callable[[list], None]) -> None:
    """Change the ids of ``name`` in both stages alike (the embedding rows still align with the token rows)."""
    for stage in ("tokens", "embeddings"):
        table = read_shard(out / stage / name)
        ids = table.column("id").to_pylist()
        edit(ids)
        _rewrite(out, stage, name, _set_column(table, "id", ids))


def _embedding_edit(out: Path, name: str, edit: Callable[[np.ndarray], None]) -> None:
    table = read_shard(out / "embeddings" / name)
    field = table.schema.field("embedding")
    values = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    edit(values)
    _rewrite(out, "embeddings", name, _set_column(table, "embedding", embeddings_to_arrow(values, field)))


def _write_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ the damages
# Each takes the copy and returns the findings it must produce (regexes, each matching one problem).


def manifest_garbage(out):
    (out / "manifest.json").write_text("{not json")
    return [r"manifest\.json: not an embedpipe manifest \(Expecting property name"]


def manifest_missing(out):
    (out / "manifest.json").unlink()
    return [r": no manifest\.json \(not an embedpipe output, or nothing committed yet\)$"]


def no_stage(out):
    _edit_manifest(out, lambda m: m["stages"].clear())
    return [r": the manifest records no stage$"]


def stage_not_complete(out):
    _edit_manifest(out, lambda m: m["stages"]["embeddings"].update(status="running"))
    return [r"^embeddings: the stage is 'running', not complete \(3 of 3 shards committed\)$"]


def planned_not_committed(out):
    # An embed stage stopped before its last shard: the shard is planned, neither listed nor on disk.
    (out / "embeddings" / S2).unlink()
    (out / "embeddings" / "state.json").unlink()
    (out / "embeddings" / "dataset_info.json").unlink()

    def edit(m):
        del m["stages"]["embeddings"]["shards"][S2]
        m["stages"]["embeddings"]["status"] = "running"
    _edit_manifest(out, edit)
    return [rf"^embeddings: 1 planned shards not committed: {S2}$",
            r"^embeddings: the stage is 'running', not complete \(2 of 3 shards committed\)$"]


def planned_not_committed_in_a_complete_stage(out):
    # The manifest says complete but a planned shard is not listed (and the datasets files agree with it).
    (out / "embeddings" / S2).unlink()
    _edit_manifest(out, lambda m: m["stages"]["embeddings"]["shards"].pop(S2))
    _write_json(out / "embeddings" / "state.json", lambda s: s["_data_files"].pop())
    return [rf"^embeddings: 1 planned shards not committed: {S2}$"]


def shard_missing(out):
    (out / "embeddings" / S1).unlink()
    return [rf"^embeddings/{S1}: listed in the manifest but missing on disk$"]


def size_mismatch(out):
    path = out / "embeddings" / S1
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    return [rf"^embeddings/{S1}: {size + 8} bytes on disk, the manifest recorded {size}$"]


def sha256_mismatch(out):
    path = out / "embeddings" / S1
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    return [rf"^embeddings/{S1}: sha256 differs from the manifest's \(the file was altered\)$"]


def not_arrow(out):
    # Garbage the manifest agrees with: only opening it as an IPC stream can tell.
    from pipeline.output.commit import commit_bytes

    committed = commit_bytes(b"\x00" * 64 + b"not an arrow stream", out / "embeddings" / S1)
    _edit_manifest(out, lambda m: m["stages"]["embeddings"]["shards"][S1].update(
        bytes=committed.bytes, sha256=committed.sha256))
    return [rf"^embeddings/{S1}: not a readable Arrow IPC stream: "]


def row_count_mismatch(out):
    table = read_shard(out / "embeddings" / S1)
    n = table.num_rows
    _rewrite(out, "embeddings", S1, table.slice(0, n - 1))
    return [rf"^embeddings/{S1}: {n - 1} rows, the manifest recorded {n}$",
            rf"^embeddings/{S1}: {n - 1} rows, tokens/{S1} has {n}$"]


def row_count_in_manifest(out):
    n = read_shard(out / "tokens" / S2).num_rows
    _edit_manifest(out, lambda m: m["stages"]["tokens"]["shards"][S2].update(rows=n + 1))
    return [rf"^tokens/{S2}: {n} rows, the manifest recorded {n + 1}$"]


def schema_differs(out):
    table = read_shard(out / "tokens" / S1)
    field = pa.field("length", pa.int64())
    _rewrite(out, "tokens", S1, table.set_column(table.column_names.index("length"), field,
                                                 table.column("length").cast(pa.int64())))
    return [rf"^tokens/{S1}: schema differs from {S0}'s$"]


def schema_metadata_differs(out):
    table = read_shard(out / "embeddings" / S2)
    _rewrite(out, "embeddings", S2, table.replace_schema_metadata({"written_by": "someone else"}))
    return [rf"^embeddings/{S2}: schema differs from {S0}'s$"]


def dataset_info_wrong(out):
    _write_json(out / "tokens" / "dataset_info.json",
                lambda info: info["features"]["length"].update(dtype="int64"))
    return [r"^tokens: dataset_info\.json declares \{.*length: int64.*\}, the shards hold \{.*length: int32.*\}$"]


def dataset_info_garbage(out):
    (out / "embeddings" / "dataset_info.json").write_text("[]")
    return [r"^embeddings: dataset_info\.json is not a datasets info file \(TypeError: "]


def dataset_info_missing(out):
    (out / "tokens" / "dataset_info.json").unlink()
    return [r"^tokens: dataset_info\.json missing \(datasets\.load_from_disk cannot read the stage\)$"]


def state_json_wrong(out):
    _write_json(out / "embeddings" / "state.json", lambda s: s["_data_files"].pop(1))
    return [r"^embeddings: state\.json lists 2 shards, the manifest 3 \(or in another order\)$"]


def state_json_order(out):
    _write_json(out / "tokens" / "state.json", lambda s: s["_data_files"].reverse())
    return [r"^tokens: state\.json lists 3 shards, the manifest 3 \(or in another order\)$"]


def state_json_garbage(out):
    (out / "tokens" / "state.json").write_text('{"_data_files": "nope"}')
    return [r"^tokens: state\.json is not a datasets state file \(TypeError: "]


def state_json_missing(out):
    (out / "embeddings" / "state.json").unlink()
    return [r"^embeddings: state\.json missing \(datasets\.load_from_disk cannot read the stage\)$"]


def stray_shard(out):
    shutil.copy(out / "tokens" / S0, out / "tokens" / "data-00009-of-00009.arrow")
    return [r"^tokens: 1 shard files not in the manifest: data-00009-of-00009\.arrow$"]


def rows_in_per_shard(out):
    # One row moved from one shard's account to another's: the totals still add up, the shards do not.
    def edit(m):
        m["stages"]["tokens"]["shards"][S1]["rows_in"] += 1
        m["stages"]["tokens"]["shards"][S2]["rows_in"] -= 1
    _edit_manifest(out, edit)
    return [rf"^tokens/{S1}: 11 rows in but 10 tokenized \+ 0 quarantined$",
            rf"^tokens/{S2}: 9 rows in but 10 tokenized \+ 0 quarantined$"]


def mask_disagrees_with_length(out):
    table = read_shard(out / "tokens" / S1)
    lengths = table.column("length").to_pylist()
    real = lengths[3]
    lengths[3] += 1
    _rewrite(out, "tokens", S1, _set_column(table, "length", lengths))
    return [rf"^tokens/{S1}: row 3: attention mask counts {real} real tokens, length says {real + 1} \(1 rows so\)$"]


def _first_windows(out: Path, name: str) -> list[int]:
    """The rows of a token shard that are their document's first window (chunk 0): one per document."""
    return [i for i, c in enumerate(read_shard(out / "tokens" / name).column("chunk").to_pylist()) if c == 0]


def _duplicate(key: str, first: tuple[str, int], second: tuple[str, int]) -> str:
    """verify's finding for one duplicated row key (the bare key, or the key with where its first two rows are)."""
    where = rf"id {re.escape(repr(key))} \(2 rows\): {first[0]} row {first[1]} and {second[0]} row {second[1]}"
    return rf"^tokens: 1 duplicate row ids, e\.g\. (?:{re.escape(key)}|{where})$"


def duplicate_id_across_shards(out):
    row = _first_windows(out, S2)[2]
    _ids_edit(out, S2, lambda ids: ids.__setitem__(row, "r0"))  # r0's first window is row 0 of S0
    return [_duplicate("r0\x1f0", (S0, 0), (S2, row))]


def duplicate_id_in_shard(out):
    first, second = _first_windows(out, S1)[1:3]
    doc = read_shard(out / "tokens" / S1).column("id")[first].as_py()
    _ids_edit(out, S1, lambda ids: ids.__setitem__(second, doc))
    return [_duplicate(f"{doc}\x1f0", (S1, first), (S1, second))]


def quarantine_file_missing(out):
    (out / "quarantine" / "tokens-data-00000-of-00003.jsonl").unlink()
    return [rf"^tokens/{S0}: 1 rows quarantined but no quarantine file$"]


def quarantine_count_mismatch(out):
    path = out / "quarantine" / "tokens-data-00000-of-00003.jsonl"
    path.write_bytes(path.read_bytes() * 2)
    return [r"^quarantine/tokens-data-00000-of-00003\.jsonl: 2 records, the manifest recorded 1$"]


def plan_rows_mismatch(out):
    _edit_manifest(out, lambda m: m["plan"]["units"][2].update(num_rows=11))
    return [r"^tokens: the plan holds 31 input rows, the shards read 30$"]


def manifest_counts_mismatch(out):
    _edit_manifest(out, lambda m: m["counts"].update(quarantined=0))
    return [(r"^manifest counts \{.*'quarantined': 0.*\} do not add up to the shards' "
             r"\{'rows_in': 30, 'rows_out': 29, 'quarantined': 1\}$")]


def no_token_shard(out):
    (out / "tokens" / S1).unlink()
    return [rf"^tokens/{S1}: listed in the manifest but missing on disk$",
            rf"^embeddings/{S1}: no readable token shard of that name to align with$"]


def older_token_shard(out):
    # The token shard was made again (other token ids, same rows and ids) after its embeddings were.
    table = read_shard(out / "tokens" / S1)
    ids = table.column("input_ids").to_pylist()
    ids[0][1] += 1
    _rewrite(out, "tokens", S1, _set_column(table, "input_ids", ids), restamp_embeddings=False)
    return [rf"^embeddings/{S1}: made from another version of tokens/{S1}$"]


def ids_misaligned(out):
    # Two documents' first windows swapped: the chunks still agree row for row, the ids do not.
    a, b = _first_windows(out, S2)[1:3]
    table = read_shard(out / "embeddings" / S2)
    order = list(range(table.num_rows))
    order[a], order[b] = b, a
    _rewrite(out, "embeddings", S2, table.take(order))
    return [rf"^embeddings/{S2}: row {a}: id differs from tokens/{S2}'s row$"]


def _second_window(out: Path) -> tuple[str, int, str]:
    """A token shard, a row in it that is a document's second window, and the document's id."""
    for name in (S0, S1, S2):
        table = read_shard(out / "tokens" / name)
        chunks = table.column("chunk").to_pylist()
        if 1 in chunks:
            return name, chunks.index(1), table.column("id")[chunks.index(1)].as_py()
    raise AssertionError("the job cut no document into windows")


def duplicate_id_and_chunk(out):
    # Two rows claim window 0 of one document (in both stages alike): only the (id, chunk) key tells.
    name, row, doc = _second_window(out)
    for stage in ("tokens", "embeddings"):
        table = read_shard(out / stage / name)
        chunks = table.column("chunk").to_pylist()
        chunks[row] = 0
        _rewrite(out, stage, name, _set_column(table, "chunk", chunks))
    window0 = read_shard(out / "tokens" / name).column("id").to_pylist().index(doc)
    return [_duplicate(f"{doc}\x1f0", (name, window0), (name, row))]


def chunk_misaligned(out):
    name, row, _ = _second_window(out)
    table = read_shard(out / "embeddings" / name)
    chunks = table.column("chunk").to_pylist()
    chunks[row] = 7
    _rewrite(out, "embeddings", name, _set_column(table, "chunk", chunks))
    return [rf"^embeddings/{name}: row {row}: chunk differs from tokens/{name}'s row$"]


def null_embedding(out):
    table = read_shard(out / "embeddings" / S1)
    column = table.column("embedding").combine_chunks()
    validity = pa.array([i != 4 for i in range(len(column))]).buffers()[1]
    nulled = pa.FixedSizeListArray.from_buffers(column.type, len(column), [validity], children=[column.values],
                                                null_count=1)
    _rewrite(out, "embeddings", S1, _set_column(table, "embedding", nulled))
    return [rf"^embeddings/{S1}: 1 null embeddings$"]


def nan_not_recorded(out):
    def edit(values):
        values[3, 7] = np.nan
        values[6, 0] = np.inf
    _embedding_edit(out, S2, edit)
    return [rf"^embeddings/{S2}: 2 rows hold NaN or Inf, the manifest recorded 0$"]


def embedding_field_not_embedpipe(out):
    # The stored-dtype metadata is gone: the values can no longer be told apart (bfloat16 bits from uint16).
    table = read_shard(out / "embeddings" / S1)
    field = table.schema.field("embedding").remove_metadata()
    _rewrite(out, "embeddings", S1, table.set_column(table.column_names.index("embedding"), field,
                                                     table.column("embedding")))
    return [rf"^embeddings/{S1}: schema differs from {S0}'s$",
            rf"^embeddings/{S1}: field 'embedding': float values with embedpipe\.dtype '' are not embedpipe embeddings$"]


DAMAGES = [manifest_garbage, manifest_missing, no_stage, stage_not_complete, planned_not_committed,
           planned_not_committed_in_a_complete_stage, shard_missing, size_mismatch, sha256_mismatch, not_arrow,
           row_count_mismatch, row_count_in_manifest, schema_differs, schema_metadata_differs, dataset_info_wrong,
           dataset_info_garbage, dataset_info_missing, state_json_wrong, state_json_order, state_json_garbage,
           state_json_missing, stray_shard, rows_in_per_shard, mask_disagrees_with_length,
           duplicate_id_across_shards, duplicate_id_in_shard, quarantine_file_missing, quarantine_count_mismatch,
           plan_rows_mismatch, manifest_counts_mismatch, no_token_shard, older_token_shard, ids_misaligned,
           duplicate_id_and_chunk, chunk_misaligned, null_embedding, nan_not_recorded, embedding_field_not_embedpipe]


def _assert_findings(out: Path, expected: list[str]) -> None:
    problems = verify_output(out).problems
    for pattern in expected:
        hits = [p for p in problems if re.search(pattern, p)]
        assert len(hits) == 1, (pattern, problems)
    unexpected = [p for p in problems if not any(re.search(pattern, p) for pattern in expected)]
    assert not unexpected, (unexpected, expected)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_verify_finds_the_planted_damage(good, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(good, out)
    _assert_findings(out, damage(out))


def test_staging_leftovers_are_a_warning_not_a_problem(good, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(good, out)
    (out / "tokens" / ".staging" / f"{S1}.deadbeef.tmp").write_bytes(b"half a shard")
    result = verify_output(out)
    assert result.ok, result.problems
    assert result.warnings == [(f"tokens: leftovers of an interrupted write in {out / 'tokens' / '.staging'} "
                                "(the next run removes them)")]
