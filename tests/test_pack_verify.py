"""A packed job end to end (run_job on Ray), and every packed-shard check of ``verify`` shown to catch its damage.

One small finished packed job per module (the demo GPT-2 style BPE, 44 documents of the sample corpus and
one quarantined row, three units, 32-token blocks); each case copies it, plants one damage and asserts
verify's findings for it, restamping the rewritten shard's size and sha256 so only the planted damage is
left (as tests/test_verify_checks.py does for the other checks).

Each check was shown to be needed: with any one ``problems.append`` of pipeline/ops/verify_pack.py made a
no-op, at least one case here goes red.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_verify_checks import _assert_findings
from transformers import AutoTokenizer

from pipeline.config import validate_config
from pipeline.ops.verify import verify_output
from pipeline.output.shards import read_shard, write_shard
from pipeline.run.driver import run_job

REPO = Path(__file__).resolve().parent.parent
DEMO_BPE = str(REPO / "conf" / "tokenizers" / "decoder-bpe")
ROWS = [json.loads(line) for line in (REPO / "pipeline/sample_data/corpus.jsonl").open(encoding="utf-8")][:44]
S0, S1, S2 = (f"data-0000{i}-of-00003.arrow" for i in range(3))
BLOCK = 32


def packed_job(root: Path, **tokenizer) -> Path:
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(5, '{"id": "bad", "text": null}')
    corpus = root / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    run_job(validate_config({
        "input": {"path": str(corpus), "id_column": "id", "max_quarantined": 1},
        "output": {"path": str(root / "out"), "shard_rows": 15},
        "tokenizer": {"name": DEMO_BPE, "max_length": BLOCK, "pack": True, **tokenizer},
    }), stages=("tokens",))
    return root / "out"


@pytest.fixture(scope="module")
def good(packed_output) -> Path:
    out = packed_output
    result = verify_output(out)
    assert result.ok and not result.warnings, (result.problems, result.warnings)
    return out


def test_the_job_packs_every_document_and_counts_every_token(good):
    hf = AutoTokenizer.from_pretrained(DEMO_BPE)
    docs = [ids + [hf.eos_token_id] for ids in hf([r["text"] for r in ROWS])["input_ids"]]
    manifest = json.loads((good / "manifest.json").read_text())
    shards = manifest["stages"]["tokens"]["shards"]
    # Units of 15 lines: the bad line (the 6th) is quarantined from the first unit.
    per_unit = [docs[:14], docs[14:29], docs[29:]]
    for unit, (name, want) in enumerate(zip((S0, S1, S2), per_unit)):
        table = read_shard(good / "tokens" / name)
        ids = np.asarray(table.column("input_ids").to_pylist())
        mask = np.asarray(table.column("attention_mask").to_pylist())
        assert ids[mask == 1].tolist() == [t for d in want for t in d]
        record = shards[name]
        assert record["rows"] == table.num_rows == -(-sum(map(len, want)) // BLOCK)
        assert record["texts"] == len(want) and record["separator_tokens"] == len(want)
        assert record["tokens"] == record["document_tokens"] + record["separator_tokens"] == sum(map(len, want))
    assert manifest["counts"] == {"rows_in": 45, "rows_out": 44, "quarantined": 1}
    assert table.schema.field("input_ids").type == pa.list_(pa.uint16(), BLOCK)


def test_drop_remainder_counts_the_dropped_tokens(ray_cluster, tmp_path):
    out = packed_job(tmp_path, pack_remainder="drop")
    assert verify_output(out).ok
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["stages"]["tokens"]["totals"]
    assert 0 < totals["dropped_tokens"] < 3 * BLOCK
    assert totals["document_tokens"] + totals["separator_tokens"] == totals["tokens"] + totals["dropped_tokens"]
    for name in (S0, S1, S2):
        mask = read_shard(out / "tokens" / name).column("attention_mask").to_pylist()
        assert all(all(row) for row in mask)  # no padded block


# ------------------------------------------------------------------------------------------ damages


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _edit_manifest(out: Path, edit: Callable[[dict], None]) -> None:
    record = _manifest(out)
    edit(record)
    (out / "manifest.json").write_text(json.dumps(record))


def _edit_column(out: Path, name: str, column: str, edit: Callable[[list], None]) -> None:
    table = read_shard(out / "tokens" / name)
    values = table.column(column).to_pylist()
    edit(values)
    i = table.column_names.index(column)
    table = table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))
    committed = write_shard(table, out / "tokens" / name)
    _edit_manifest(out, lambda m: m["stages"]["tokens"]["shards"][name].update(bytes=committed.bytes,
                                                                               sha256=committed.sha256))


def doc_lengths_wrong(out):
    def edit(rows):
        rows[1][0] += 1
    _edit_column(out, S1, "doc_lengths", edit)
    return [rf"^tokens/{S1}: block 1: doc_lengths do not sum to its real tokens"]


def positions_wrong(out):
    def edit(rows):
        rows[2][5] += 1
    _edit_column(out, S0, "position_ids", edit)
    return [rf"^tokens/{S0}: block 2: position_ids do not restart at 0 at each piece$"]


def documents_mislabelled(out):
    # Every piece of the shard named after its first document: one document seen where there were 15.
    def edit(rows):
        first = rows[0][0]
        for row in rows:
            row[:] = [first] * len(row)
    _edit_column(out, S1, "documents", edit)
    return [rf"^tokens/{S1}: the blocks hold 1 documents, the manifest says 15 "]


def piece_count_differs(out):
    def edit(rows):
        rows[0].append("extra")
    _edit_column(out, S2, "documents", edit)
    return [rf"^tokens/{S2}: documents and doc_lengths hold different numbers of pieces$"]


def separator_replaced(out):
    def edit(rows):
        row = rows[0]
        row[row.index(0)] = 1  # the first <|endoftext|> (id 0 in the demo tokenizer)
    _edit_column(out, S0, "input_ids", edit)
    return [rf"^tokens/{S0}: a document's last piece does not end with the separator 0$"]


def mask_hole(out):
    def edit(rows):
        rows[0][BLOCK - 1] = 0
    _edit_column(out, S2, "attention_mask", edit)
    return [rf"^tokens/{S2}: blocks \[0(, \d+)?\] are padded; only a unit's last block may be",
            rf"^tokens/{S2}: block 0: doc_lengths do not sum"]


def mask_not_a_prefix(out):
    def edit(rows):
        rows[1][0] = 0
    _edit_column(out, S2, "attention_mask", edit)
    return [rf"^tokens/{S2}: an attention mask is not its block's real tokens followed by padding$",
            rf"^tokens/{S2}: blocks \[1(, \d+)?\] are padded", rf"^tokens/{S2}: block 1: doc_lengths do not sum"]


def block_ids_renamed(out):
    def edit(ids):
        ids[0] = "1:999"
    _edit_column(out, S1, "id", edit)
    return [rf"^tokens/{S1}: block ids are not 1:0 .. 1:\d+ in order$"]


def token_count_wrong(out):
    _edit_manifest(out, lambda m: m["stages"]["tokens"]["shards"][S0].update(tokens=5))
    return [rf"^tokens/{S0}: \d+ real tokens in the blocks, the manifest recorded 5$"]


def dropped_tokens_invented(out):
    def edit(m):
        m["stages"]["tokens"]["shards"][S0]["dropped_tokens"] = 3
        m["stages"]["tokens"]["totals"]["dropped_tokens"] = 3
    _edit_manifest(out, edit)
    return [rf"^tokens/{S0}: \d+ document \+ \d+ separator tokens, but \d+ in blocks \+ 3 dropped$",
            rf"^tokens/{S0}: 3 dropped tokens with pack_remainder: pad$"]


def more_than_a_block_dropped(out):
    def edit(m):
        for record in (m["stages"]["tokens"]["shards"][S1], m["stages"]["tokens"]["totals"]):
            record["dropped_tokens"] = BLOCK
            record["document_tokens"] += BLOCK
    _edit_manifest(out, edit)
    return [rf"^tokens/{S1}: {BLOCK} dropped tokens with pack_remainder: pad$",
            rf"^tokens/{S1}: {BLOCK} dropped tokens, more than one partial block$"]


def separator_count_wrong(out):
    def edit(m):
        shard = m["stages"]["tokens"]["shards"][S2]
        shard["separator_tokens"] -= 1
        shard["document_tokens"] += 1
        m["stages"]["tokens"]["totals"]["separator_tokens"] -= 1
        m["stages"]["tokens"]["totals"]["document_tokens"] += 1
    _edit_manifest(out, edit)
    return [rf"^tokens/{S2}: 14 separator tokens for 15 documents$"]


def totals_wrong(out):
    _edit_manifest(out, lambda m: m["stages"]["tokens"]["totals"].update(document_tokens=1))
    return [r"^tokens: totals\.document_tokens is 1, the shards sum to \d+$"]


def block_width_differs_from_config(out):
    _edit_manifest(out, lambda m: m["config"]["tokenizer"].update(max_length=64))
    return [rf"^tokens/{name}: blocks of {BLOCK} tokens, tokenizer\.max_length is 64$" for name in (S0, S1, S2)]


DAMAGES = [doc_lengths_wrong, positions_wrong, documents_mislabelled, piece_count_differs, separator_replaced,
           mask_hole, mask_not_a_prefix, block_ids_renamed, token_count_wrong, dropped_tokens_invented,
           more_than_a_block_dropped, separator_count_wrong, totals_wrong, block_width_differs_from_config]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_verify_finds_the_planted_damage_in_packed_shards(good, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(good, out)
    _assert_findings(out, damage(out))
