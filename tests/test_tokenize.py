"""Token rows equal the transformers fast tokenizer's output, option by option, row by row."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.tokenize.core import TokenRows, length_histogram, to_table, tokenize_texts
from pipeline.tokenize.loading import load_tokenize_spec

EDGE_TEXTS = [
    "",
    "   ",
    "\t\n  \n",
    "The quick brown fox jumps over the lazy dog.",
    "机器学习模型需要大量的训练数据。自然语言处理很有趣。",
    "日本語のテキスト、한국어 문장, and English in one line.",
    "Emoji 😀🎉 and a family 👩\u200d👩\u200d👧 and flags 🇫🇷🇯🇵",
    "Combining marks: e\u0301 a\u0300 o\u0308 n\u0303 — cafe\u0301",
    "مرحبا بالعالم، هذا نص باللغة العربية. שלום עולם",
    "x",
    "A far longer document than max_length. " * 120,
    "长文档" * 400,
]

# Every combination of the options DESIGN.md names (stride only with truncation).
OPTION_GRID = [
    dict(padding=padding, padding_side=side, truncation=trunc, truncation_side=tside,
         add_special_tokens=special, stride=stride)
    for padding, side, trunc, tside, special, stride in itertools.product(
        ["max_length", "longest", "none"], ["right", "left"], [True, False], ["right", "left"], [True, False],
        [None, 5],
    )
    if trunc or stride is None
]


def _spec(tokenizer: str, max_length: int, pad_token: str | None = None, **options):
    cfg = validate_config({"input": {"path": "unused"},
                           "tokenizer": {"name": tokenizer, "max_length": max_length, "pad_token": pad_token, **options}})
    return load_tokenize_spec(cfg)


def _reference(hf, texts, max_length, options, pad_token=None):
    hf.padding_side = options["padding_side"]
    hf.truncation_side = options["truncation_side"]
    if pad_token:
        hf.pad_token = pad_token
    kwargs = dict(
        padding=False if options["padding"] == "none" else options["padding"],
        truncation=options["truncation"],
        add_special_tokens=options["add_special_tokens"],
    )
    if options["truncation"] or options["padding"] == "max_length":
        kwargs["max_length"] = max_length
    if options["stride"] is not None:
        kwargs.update(stride=options["stride"], return_overflowing_tokens=True)
    return hf(texts, **kwargs)


def _check_against_reference(tokenizer_dir, max_length, options, pad_token=None):
    spec = _spec(tokenizer_dir, max_length, pad_token, **options)
    # Without chunking, rows are cut here from whole encodings; with it, the backend truncates: both are checked.
    assert spec.cuts_rows_itself == (options["truncation"] and options["stride"] is None)
    ids = [f"row-{i}" for i in range(len(EDGE_TEXTS))]
    rows = tokenize_texts(spec, ids, EDGE_TEXTS)
    table = to_table(spec, rows)
    ref = _reference(AutoTokenizer.from_pretrained(tokenizer_dir), EDGE_TEXTS, max_length, options, pad_token)

    assert table.column("input_ids").to_pylist() == ref["input_ids"]
    assert table.column("attention_mask").to_pylist() == ref["attention_mask"]
    if "token_type_ids" in ref:
        assert table.column("token_type_ids").to_pylist() == ref["token_type_ids"]
    else:
        assert "token_type_ids" not in table.column_names
    assert table.column("length").to_pylist() == [sum(m) for m in ref["attention_mask"]]
    if options["stride"] is not None:
        sample = ref["overflow_to_sample_mapping"]
        assert table.column("id").to_pylist() == [ids[i] for i in sample]
        chunks = [sum(1 for j in sample[:k] if j == sample[k]) for k in range(len(sample))]
        assert table.column("chunk").to_pylist() == chunks
    else:
        assert table.column("id").to_pylist() == ids
    # Untruncated lengths (the manifest's histogram) equal the tokenizer's length with no truncation.
    full = AutoTokenizer.from_pretrained(tokenizer_dir)(EDGE_TEXTS, add_special_tokens=options["add_special_tokens"])
    assert rows.untruncated.tolist() == [len(x) for x in full["input_ids"]]
    fixed = options["padding"] == "max_length" and options["truncation"]
    assert pa.types.is_fixed_size_list(table.schema.field("input_ids").type) == fixed


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_minilm_matches_transformers(minilm_dir, options):
    _check_against_reference(minilm_dir, 32, options)


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_gpt2_style_bpe_matches_transformers(bpe_dir, options):
    """No pad token of its own: padded with the end-of-text token, as decoder pipelines do."""
    _check_against_reference(bpe_dir, 24, options, pad_token="<|endoftext|>")


def test_wordpiece_and_clip_style_defaults_match(wordpiece_dir, clip_tok_dir):
    base = dict(padding="max_length", padding_side="right", truncation=True, truncation_side="right",
                add_special_tokens=True, stride=None)
    _check_against_reference(wordpiece_dir, 20, base)
    _check_against_reference(clip_tok_dir, 77, base)


def test_dtypes_and_fixed_width_are_zero_copy(minilm_dir):
    spec = _spec(minilm_dir, 16, padding="max_length")
    table = to_table(spec, tokenize_texts(spec, ["a", "b"], ["hello", "world wide"]))
    assert table.schema.field("input_ids").type == pa.list_(pa.uint16(), 16)
    assert table.schema.field("attention_mask").type == pa.list_(pa.int8(), 16)
    matrix = table.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=True).reshape(-1, 16)
    assert matrix.shape == (2, 16) and matrix.dtype == np.uint16


def test_large_vocabulary_uses_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "[PAD]": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                            model_max_length=8).save_pretrained(str(tmp_path))
    spec = _spec(str(tmp_path), 8)
    table = to_table(spec, tokenize_texts(spec, ["a"], ["w69999 w1 zzz"]))
    assert spec.id_dtype == "int32"
    assert table.column("input_ids").to_pylist() == [[69999, 1, 70000, 70001, 70001, 70001, 70001, 70001]]


def test_no_pad_token_is_a_config_error(bpe_dir):
    with pytest.raises(ConfigError, match="tokenizer.pad_token.*no pad token.*<\\|endoftext\\|>"):
        _spec(bpe_dir, 16, padding="max_length")
    assert _spec(bpe_dir, 16, padding="none").pad_id is None


def test_placeholder_model_max_length_is_a_config_error(bpe_no_max_dir):
    with pytest.raises(ConfigError, match="tokenizer.max_length is not set.*model_max_length"):
        _spec(bpe_no_max_dir, None, pad_token="<|endoftext|>")
    assert _spec(bpe_no_max_dir, 12, pad_token="<|endoftext|>").max_length == 12


def test_default_max_length_is_the_tokenizers(minilm_dir):
    assert _spec(minilm_dir, None).max_length == 512


def test_bad_stride_and_unknown_pad_token(minilm_dir):
    with pytest.raises(ConfigError, match="tokenizer.stride"):
        _spec(minilm_dir, 16, stride=14)
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        _spec(minilm_dir, 16, pad_token="<no such token>")


def test_unknown_tokenizer_name():
    with pytest.raises(ConfigError, match="tokenizer.name"):
        _spec("/no/such/tokenizer", 16)


def test_tokenizer_json_file(minilm_dir):
    spec = _spec(f"{minilm_dir}/tokenizer.json", 16, pad_token="[PAD]")
    hf = AutoTokenizer.from_pretrained(minilm_dir)
    table = to_table(spec, tokenize_texts(spec, ["a"], ["Hello there"]))
    assert table.column("input_ids").to_pylist() == hf(["Hello there"], padding="max_length", max_length=16)["input_ids"]


def test_special_tokens_around_a_sequence(minilm_dir, bpe_dir, clip_tok_dir):
    assert _spec(minilm_dir, 16).special_tokens_around == (1, 1)  # [CLS] ... [SEP]
    assert _spec(minilm_dir, 16, add_special_tokens=False).special_tokens_around == (0, 0)
    assert _spec(bpe_dir, 16, pad_token="<|endoftext|>").special_tokens_around == (0, 0)  # GPT-2 adds none
    assert _spec(clip_tok_dir, 16).special_tokens_around == (1, 1)  # <|startoftext|> ... <|endoftext|>


@pytest.mark.parametrize("side", ["right", "left"])
def test_rows_cut_here_equal_the_backends_truncation(minilm_dir, side):
    """The same rows and untruncated lengths whether the backend truncates or rows are cut from whole encodings."""
    spec = _spec(minilm_dir, 16, truncation_side=side)
    backend = dataclasses.replace(spec, special_tokens_around=None)
    assert spec.cuts_rows_itself and not backend.cuts_rows_itself
    ids = [str(i) for i in range(len(EDGE_TEXTS))]
    ours, theirs = tokenize_texts(spec, ids, EDGE_TEXTS), tokenize_texts(backend, ids, EDGE_TEXTS)
    assert to_table(spec, ours).equals(to_table(backend, theirs))
    assert ours.untruncated.tolist() == theirs.untruncated.tolist()
    assert max(ours.untruncated) > 16


def test_histogram_counts_every_text(minilm_dir):
    spec = _spec(minilm_dir, 16)
    rows: TokenRows = tokenize_texts(spec, ["a", "b", "c"], ["", "short one", "long " * 50])
    counts = length_histogram(spec, rows.untruncated)
    assert sum(counts) == 3
    edges = spec.histogram_edges()
    over = sum(c for e, c in zip(edges, counts) if e > 16)
    assert over == 1


def test_type_ids_read_back_when_a_template_sets_them(tmp_path, wordpiece_dir):
    """A template giving the single sequence type id 1 takes the slow path and still matches."""
    import json as _json

    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(f"{wordpiece_dir}/tokenizer.json")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:1 [SEP]:1", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16,
                            model_input_names=["input_ids", "token_type_ids", "attention_mask"]).save_pretrained(str(tmp_path))
    spec = _spec(str(tmp_path), 16)
    assert not spec.single_type_ids_zero and _spec(wordpiece_dir, 16).single_type_ids_zero
    texts = ["hello world", "hello world " * 20]  # the second is cut: its type ids are cut with its ids
    table = to_table(spec, tokenize_texts(spec, ["a", "b"], texts))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))(texts, padding="max_length", max_length=16, truncation=True)
    assert table.column("input_ids").to_pylist() == ref["input_ids"]
    assert table.column("token_type_ids").to_pylist() == ref["token_type_ids"]
    assert 1 in ref["token_type_ids"][0]
    assert _json.loads(spec.tokenizer_json)["post_processor"]["type"] == "TemplateProcessing"
