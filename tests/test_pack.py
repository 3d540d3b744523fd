"""tokenizer.pack: the real tokens of the blocks are every document's tokens + the separator, in input order.

The reference stream is made with the ``transformers`` tokenizer directly (the demo GPT-2 style byte-level
BPE the repo ships, and MiniLM's WordPiece, which has no EOS: "[SEP]" separates there), over the sample
corpus cut into units as a job cuts it. Position ids, doc_lengths and documents are checked against the
document boundaries of that stream; the remainder counts, pad and drop; and the refused combinations
through the real CLI (exit 2, naming the key).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from cli_runs import REPO, embedpipe
from transformers import AutoTokenizer

from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.tokenize.core import tokenize_texts
from pipeline.tokenize.loading import load_tokenize_spec
from pipeline.tokenize.pack import pack_documents
from pipeline.tokenize.stage import pack_unit

CORPUS = REPO / "pipeline" / "sample_data" / "corpus.jsonl"
DEMO_BPE = str(REPO / "conf" / "tokenizers" / "decoder-bpe")
UNIT_ROWS = 1000


@functools.cache
def _all_rows() -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in CORPUS.open(encoding="utf-8"))


def _corpus() -> list[dict]:
    return list(_all_rows())


def _spec(name: str, **tokenizer):
    return load_tokenize_spec(validate_config({"input": {"path": "unused"},
                                               "tokenizer": {"name": name, "pack": True, **tokenizer}}))


def _pack_corpus(spec, rows):
    """The corpus in units of UNIT_ROWS, each tokenized and packed as the tokenize stage does it."""
    tables = []
    for unit, start in enumerate(range(0, len(rows), UNIT_ROWS)):
        part = rows[start:start + UNIT_ROWS]
        token_rows = tokenize_texts(spec, [r["id"] for r in part], [r["text"] for r in part])
        tables.append(pack_unit(spec, unit, token_rows)[0])
    return tables


def _reference(tokenizer_dir, rows, separator, add_special_tokens=True):
    return _cached_reference(tokenizer_dir, len(rows), separator, add_special_tokens)


@functools.cache
def _cached_reference(tokenizer_dir, n, separator, add_special_tokens):
    """The first ``n`` corpus documents' ids + separator, by the transformers tokenizer (made once per case)."""
    rows = _all_rows()[:n]
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    sep = [] if separator is None else [hf.convert_tokens_to_ids(separator)]
    ids = hf([r["text"] for r in rows], add_special_tokens=add_special_tokens)["input_ids"]
    return [doc + sep for doc in ids]


def _check_blocks(tables, reference, rows, block, remainder):
    """Blocks' real tokens in shard order = the reference documents end to end (per unit), and the piece
    columns say where each document lies."""
    for unit, table in enumerate(tables):
        docs = reference[unit * UNIT_ROWS:(unit + 1) * UNIT_ROWS]
        doc_ids = [r["id"] for r in rows[unit * UNIT_ROWS:(unit + 1) * UNIT_ROWS]]
        stream = [t for doc in docs for t in doc]
        kept = len(stream) if remainder == "pad" else len(stream) // block * block
        got = table.select(["id", "doc_lengths", "documents"]).to_pydict()
        assert got["id"] == [f"{unit}:{b}" for b in range(table.num_rows)]
        assert table.schema.field("input_ids").type.list_size == block
        ids, mask, positions = (table.column(c).combine_chunks().flatten().to_numpy().reshape(-1, block)
                                for c in ("input_ids", "attention_mask", "position_ids"))
        assert ids[mask == 1].tolist() == stream[:kept]
        # Pieces: each (document, length) run; joined across block edges they are the documents in order.
        pieces = [(d, n) for names, lens in zip(got["documents"], got["doc_lengths"]) for d, n in zip(names, lens)]
        joined: list[list] = []
        for doc, n in pieces:
            if joined and joined[-1][0] == doc:
                joined[-1][1] += n
            else:
                joined.append([doc, n])
        lengths = [len(d) for d in docs]
        expect, left = [], kept
        for doc, n in zip(doc_ids, lengths):
            if n == 0:
                continue
            if left <= 0:
                break
            expect.append([doc, min(n, left)])
            left -= n
        assert joined == expect
        want = np.zeros_like(positions)
        for row, lens in zip(want, got["doc_lengths"]):
            n = sum(lens)
            row[:n] = np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)
        assert np.array_equal(positions, want)
        assert mask.sum(axis=1).tolist() == [sum(lens) for lens in got["doc_lengths"]]


@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_gpt2_style_blocks_are_the_documents_and_eos_in_input_order(remainder):
    rows = _corpus()
    spec = _spec(DEMO_BPE, max_length=512, pack_remainder=remainder)
    assert spec.pack_separator_id == AutoTokenizer.from_pretrained(DEMO_BPE).eos_token_id
    assert spec.id_dtype == "uint16"
    tables = _pack_corpus(spec, rows)
    _check_blocks(tables, _reference(DEMO_BPE, rows, "<|endoftext|>"), rows, 512, remainder)


def test_minilm_blocks_with_sep_as_the_separator(minilm_dir):
    rows = _corpus()[:1500]
    spec = _spec(minilm_dir, max_length=256, pack_separator="[SEP]")
    tables = _pack_corpus(spec, rows)
    # [CLS] text [SEP] from the tokenizer's own post-processor, then the separator.
    _check_blocks(tables, _reference(minilm_dir, rows, "[SEP]"), rows, 256, "pad")


def test_no_separator_and_no_special_tokens_join_documents_with_nothing_between(minilm_dir):
    rows = _corpus()[:600]
    spec = _spec(minilm_dir, max_length=128, pack_separator=None, add_special_tokens=False)
    _check_blocks(_pack_corpus(spec, rows), _reference(minilm_dir, rows, None, add_special_tokens=False),
                  rows, 128, "pad")


def test_minilm_has_no_eos_so_the_default_separator_is_a_config_error(minilm_dir):
    with pytest.raises(ConfigError, match=r"tokenizer\.pack_separator: .* no EOS token"):
        _spec(minilm_dir, max_length=128)
    with pytest.raises(ConfigError, match=r"tokenizer\.pack_separator: '<nope>' is not in the vocabulary"):
        _spec(minilm_dir, max_length=128, pack_separator="<nope>")


def test_remainder_pad_and_drop_counts():
    flat = np.arange(1, 11, dtype=np.uint16)  # documents of 3, 0, 5 and 2 tokens
    lengths = np.array([3, 0, 5, 2])
    pad = pack_documents(flat, lengths, 4, 99, "pad", 0)
    assert pad.blocks == 4 and pad.tokens == 14 and pad.dropped_tokens == 0
    assert pad.ids.reshape(4, 4).tolist() == [[1, 2, 3, 99], [99, 4, 5, 6], [7, 8, 99, 9], [10, 99, 0, 0]]
    assert pad.mask[-2:].tolist() == [0, 0] and pad.separator_tokens == 4 and pad.document_tokens == 10
    drop = pack_documents(flat, lengths, 4, 99, "drop", 0)
    assert drop.blocks == 3 and drop.tokens == 12 and drop.dropped_tokens == 2 and drop.dropped_documents == 0
    # Without a separator the last document lies wholly in the dropped remainder: counted as dropped.
    none = pack_documents(flat, lengths, 4, None, "drop", 0)
    assert none.blocks == 2 and none.dropped_tokens == 2 and none.dropped_documents == 1
    assert none.piece_lengths.tolist() == [3, 1, 4] and none.piece_docs.tolist() == [0, 2, 2]
    assert none.positions.reshape(2, 4).tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    exact = pack_documents(np.arange(8, dtype=np.uint16), np.array([8]), 4, None, "pad", 0)
    assert exact.blocks == 2 and exact.mask.all() and exact.pieces_per_block.tolist() == [1, 1]
    empty = pack_documents(np.zeros(0, np.uint16), np.zeros(0, np.int64), 4, 99, "pad", 0)
    assert empty.blocks == 0 and empty.tokens == 0


def _write_config(tmp_path, **tokenizer) -> str:
    config = {"input": {"path": str(CORPUS), "id_column": "id"}, "output": {"path": str(tmp_path / "out")},
              "tokenizer": {"name": DEMO_BPE, "max_length": 64, "pack": True, **tokenizer}}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


@pytest.mark.parametrize("key, value", [("stride", 8), ("padding", "none"), ("truncation", True)])
def test_cli_refuses_per_row_options_with_pack(tmp_path, key, value):
    done = embedpipe("tokenize", _write_config(tmp_path, **{key: value}))
    assert done.returncode == 2, done.stderr
    assert f"tokenizer.{key} cannot be set with tokenizer.pack" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_the_embed_stage_on_packed_tokens(tmp_path):
    done = embedpipe("run", _write_config(tmp_path))
    assert done.returncode == 2, done.stderr
    assert "tokenizer.pack: packed blocks" in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("separator", ["eos", None])
def test_empty_documents_are_packed_and_accounted_for(separator):
    """An empty document still gets its separator (a piece of one token); with no separator and no special
    tokens it has no token at all, is in no block, and is counted as empty; verify's checks agree either way."""
    from pipeline.ops.verify_pack import check_packed_shard
    from pipeline.tokenize.stage import _packed_report

    texts = ["", "The quick brown fox.", "", "", "Tokens of a second document here."]
    ids = [f"d{i}" for i in range(len(texts))]
    spec = _spec(DEMO_BPE, max_length=8, pack_separator=separator)
    rows = tokenize_texts(spec, ids, texts)
    table, packed = pack_unit(spec, 0, rows)
    names = [d for row in table.column("documents").to_pylist() for d in row]
    assert ("d0" in names) == (separator is not None)
    report = {"unit": 0, "texts": len(texts), "tokens": packed.tokens, **_packed_report(spec, rows, packed)}
    assert report["empty_documents"] == (0 if separator else 3)
    problems: list[str] = []
    check_packed_shard(problems, "s", table, report, {"max_length": 8, "pack_separator": separator,
                                                      "pack_remainder": "pad"})
    assert problems == []


def test_plan_estimates_blocks_and_refuses_the_embed_stage(tmp_path):
    from pipeline.config import load_config
    from pipeline.ops.preview import preview_job

    config = load_config(_write_config(tmp_path))
    assert preview_job(config, ("tokens", "embeddings")).rerun.startswith(
        "refused (exit 2): tokenizer.pack: packed blocks")
    tokenize = preview_job(config, ("tokens",))
    assert tokenize.rerun == "fresh output: every shard would be written"
    # ~420k tokens (documents + EOS) in 64-token blocks of uint16 ids, int8 masks and int32 positions.
    assert 350_000 < tokenize.estimated_tokens < 500_000
    assert 3_000_000 < tokenize.estimated_bytes["tokens"] < 4_500_000
