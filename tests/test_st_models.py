"""sentence-transformers model directories run as SentenceTransformer.encode runs them (issue 18).

Tiny BERT and GPT-2 models are wrapped in real sentence-transformers modules (Transformer, Pooling, Dense,
Normalize, prompts) and saved as ST model directories; embedpipe's vectors, through the stage functions
(resolve the config, tokenize spec, tokenize, plan the embed stage, encode), are compared row by row with
``SentenceTransformer(dir).encode``. Pooling and normalization are left to the model unless a test says.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from transformers import AutoTokenizer

from pipeline.config import validate_config
from pipeline.encode.forward import encode_rows
from pipeline.encode.models import load_encoder
from pipeline.tokenize.st_config import read_st_config, resolve_job_config
from pipeline.encode.stage import plan_embed, token_arrays
from pipeline.errors import ConfigError
from pipeline.tokenize.core import to_table, tokenize_texts
from pipeline.tokenize.loading import load_tokenize_spec

COS = 0.9999  # float32, the bar
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Padding, truncation and attention masks decide what a model sees.",
    "a",
    "Tokenizers split text into pieces; models read the pieces as integers. " * 3,
    "Привет, мир! Это текст на русском языке.",
    "Numbers 12345 67890 and symbols #@$%^&*()",
    "日本語のテキストも含まれています。",
    "Emoji 😀🎉 and flags appear in chat logs.",
]
PROMPTS = {"query": "query: ", "passage": "passage: the document "}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_bert(tmp_path_factory.mktemp("base") / "bert")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    model_dir = tiny_models.build_tiny_gpt2(tmp_path_factory.mktemp("base") / "gpt2")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.pad_token = tok.eos_token  # sentence-transformers pads its batches: it needs a pad token
    tok.save_pretrained(str(model_dir))
    return model_dir


def build_st(out: Path, base: Path, pooling: str, *, include_prompt: bool = True, dense: int | None = None,
             activation: torch.nn.Module | None = None, normalize: bool = False, prompts: dict | None = None,
             default_prompt_name: str | None = None) -> Path:
    """An ST model directory: Transformer(base) -> Pooling -> [Dense] -> [Normalize], saved by ST itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(base))
    dim = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(dim, pooling_mode=pooling, include_prompt=include_prompt)]
    if dense:
        torch.manual_seed(1)
        layer = Dense(dim, dense, activation_function=activation or torch.nn.Tanh())
        torch.nn.init.normal_(layer.linear.weight, std=0.5)  # far from zero: a skipped layer shows
        modules.append(layer)
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt_name,
                                device="cpu")
    model.save(str(out))
    return out


def ours(model_dir: Path, texts=TEXTS, encoder: dict | None = None, tokenizer: dict | None = None):
    """embedpipe's vectors for ``texts``, through the stage functions; and the resolved config, specs."""
    config = validate_config({"input": {"path": "unused.jsonl"},
                              "encoder": {"model": str(model_dir), **(encoder or {})},
                              "tokenizer": tokenizer or {}})
    config = resolve_job_config(config)
    spec = load_tokenize_spec(config)
    table = to_table(spec, tokenize_texts(spec, [str(i) for i in range(len(texts))], list(texts)))
    embed = plan_embed(config, spec, "cpu", None)
    model = load_encoder(embed.model_dir)
    vectors = encode_rows(model, *token_arrays(table), embed.options, padding_side=spec.padding_side)
    assert vectors.shape == (len(texts), embed.hidden_size)
    return vectors, config, spec, embed


def reference(model_dir: Path, texts=TEXTS, truncate_dim: int | None = None, **kwargs) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", truncate_dim=truncate_dim)
    return model.encode(list(texts), batch_size=4, convert_to_numpy=True, **kwargs)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    cos = cosines(a, b)
    assert cos.min() >= COS, cos


def test_cls_normalize_and_default_prompt(tmp_path, bert_dir):
    model_dir = build_st(tmp_path / "st", bert_dir, "cls", normalize=True, prompts=PROMPTS,
                         default_prompt_name="query")
    vectors, config, spec, _ = ours(model_dir)
    enc = config.model_dump(mode="json")["encoder"]  # what the manifest records
    assert (enc["pooling"], enc["normalize"], enc["prompt"], enc["prompt_name"]) == ("cls", True, "query: ", "query")
    assert spec.prompt == "query: "
    assert_same(vectors, reference(model_dir))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The prompt matters: without it the vectors are others (so the comparison above can fail).
    assert cosines(vectors, reference(model_dir, prompt="")).min() < COS


def test_explicit_prompt_name_and_literal_prompt(tmp_path, bert_dir):
    model_dir = build_st(tmp_path / "st", bert_dir, "mean", prompts=PROMPTS, default_prompt_name="query")
    vectors, config, _, _ = ours(model_dir, encoder={"prompt_name": "passage"})
    assert config.encoder.prompt == PROMPTS["passage"]
    assert_same(vectors, reference(model_dir, prompt_name="passage"))
    literal, config, _, _ = ours(model_dir, encoder={"prompt": "search_query: "})
    assert config.encoder.prompt_name is None
    assert_same(literal, reference(model_dir, prompt="search_query: "))
    with pytest.raises(ConfigError, match="prompt_name: 'nope' is not one of the model's prompts"):
        ours(model_dir, encoder={"prompt_name": "nope"})


@pytest.mark.parametrize("pooling", ["mean", "cls", "weightedmean"])
@pytest.mark.parametrize("packed", [False, True])
def test_include_prompt_false_leaves_the_prompt_out_of_pooling(tmp_path, bert_dir, pooling, packed):
    model_dir = build_st(tmp_path / "st", bert_dir, pooling, include_prompt=False, prompts=PROMPTS,
                         default_prompt_name="passage")
    vectors, _, spec, embed = ours(model_dir, encoder={"packed": packed})
    # ST's count: [CLS] and the prompt's tokens (the prompt tokenized alone, less its trailing [SEP]).
    assert embed.options.prompt_tokens == spec.prompt_tokens > 2
    assert_same(vectors, reference(model_dir))


def test_dense_projection_with_activation(tmp_path, bert_dir):
    model_dir = build_st(tmp_path / "st", bert_dir, "mean", dense=16, activation=torch.nn.Tanh(), normalize=True)
    assert read_st_config(model_dir).dense[0].activation == "Tanh"
    vectors, _, _, embed = ours(model_dir)
    assert embed.hidden_size == 16
    assert_same(vectors, reference(model_dir))
    identity = build_st(tmp_path / "st-id", bert_dir, "max", dense=8, activation=torch.nn.Identity())
    assert_same(ours(identity)[0], reference(identity))


def test_truncate_dim_with_and_without_normalize(tmp_path, bert_dir):
    normed = build_st(tmp_path / "st", bert_dir, "cls", normalize=True)
    vectors, _, _, embed = ours(normed, encoder={"truncate_dim": 8})
    assert embed.hidden_size == 8
    # Normalize on: the truncated vector renormalized, as encode(normalize_embeddings=True) gives it.
    np.testing.assert_allclose(vectors, reference(normed, truncate_dim=8, normalize_embeddings=True), atol=1e-5)
    assert_same(vectors, reference(normed, truncate_dim=8))  # ST's plain output: same direction, norm < 1
    plain = build_st(tmp_path / "st-plain", bert_dir, "mean")
    vectors, _, _, _ = ours(plain, encoder={"truncate_dim": 8})
    np.testing.assert_allclose(vectors, reference(plain, truncate_dim=8), atol=1e-5)
    with pytest.raises(ConfigError, match="truncate_dim: 64 is more than the 32"):
        ours(plain, encoder={"truncate_dim": 64})


def test_last_token_pooling_on_a_decoder(tmp_path, gpt2_dir):
    model_dir = build_st(tmp_path / "st", gpt2_dir, "lasttoken", normalize=True)
    vectors, config, _, _ = ours(model_dir)
    assert config.encoder.pooling == "last"
    assert_same(vectors, reference(model_dir))


@pytest.mark.parametrize("pooling", ["max", "weightedmean"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_max_and_weightedmean(tmp_path, bert_dir, pooling, padding_side):
    model_dir = build_st(tmp_path / "st", bert_dir, pooling)
    vectors, config, _, _ = ours(model_dir, tokenizer={"padding_side": padding_side})
    assert config.encoder.pooling == pooling
    assert_same(vectors, reference(model_dir))


def test_max_seq_length_from_sentence_bert_config(tmp_path, bert_dir):
    model_dir = build_st(tmp_path / "st", bert_dir, "mean")
    path = model_dir / "sentence_bert_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"max_seq_length": 12}))  # the old format's key
    vectors, config, spec, _ = ours(model_dir)
    assert spec.max_length == config.tokenizer.max_length == 12  # not the tokenizer's model_max_length 64
    assert_same(vectors, reference(model_dir))
    _, _, spec, _ = ours(model_dir, tokenizer={"max_length": 20})  # set, tokenizer.max_length wins
    assert spec.max_length == 20


def test_do_lower_case_from_sentence_bert_config(tmp_path, gpt2_dir):
    """A cased (byte-level) tokenizer lowercased first, as ST's do_lower_case does: prompt and text."""
    model_dir = build_st(tmp_path / "st", gpt2_dir, "mean", prompts={"q": "Query: "}, default_prompt_name="q")
    path = model_dir / "sentence_bert_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"do_lower_case": True}))
    texts = ["HELLO World, THE Quick Brown FOX", "Mixed CaSe WoRdS", "lower case text"]
    vectors, _, spec, _ = ours(model_dir, texts, tokenizer={"pad_token": "<|endoftext|>"})
    assert '"Lowercase"' in spec.tokenizer_json
    assert_same(vectors, reference(model_dir, texts))


def test_explicit_pooling_overrides_the_model_and_is_logged(tmp_path, bert_dir, caplog):
    model_dir = build_st(tmp_path / "st", bert_dir, "cls", normalize=True)
    with caplog.at_level(logging.WARNING, logger="embedpipe"):
        vectors, config, _, _ = ours(model_dir, encoder={"pooling": "mean"})
    assert "encoder.pooling: 'mean' overrides the model's 'cls'" in caplog.text
    assert (config.encoder.pooling, config.encoder.normalize) == ("mean", True)  # normalize left to the model
    same_weights_mean = build_st(tmp_path / "st-mean", bert_dir, "mean", normalize=True)
    assert_same(vectors, reference(same_weights_mean))
    assert cosines(vectors, reference(model_dir)).min() < COS


def test_a_model_without_st_config_keeps_the_old_defaults_and_hash(bert_dir):
    """pooling/normalize auto on a plain HF directory: mean / false, and the config hash of a job that set
    them so (the old defaults), so existing outputs keep theirs."""
    raw = validate_config({"input": {"path": "x.jsonl"}, "encoder": {"model": str(bert_dir)}})
    old = validate_config({"input": {"path": "x.jsonl"},
                           "encoder": {"model": str(bert_dir), "pooling": "mean", "normalize": False}})
    resolved = resolve_job_config(raw)
    assert (resolved.encoder.pooling, resolved.encoder.normalize) == ("mean", False)
    assert resolved.output_hash() == old.output_hash()
    assert resolved.stage_hashes() == old.stage_hashes()
    assert "prompt" not in resolved.model_dump(mode="json")["encoder"]


def test_minilm_default_job_is_unchanged(minilm_dir):
    """The embedded default job (conf/default.yaml: mean + normalize, what MiniLM's ST config says too)."""
    from pipeline.config import load_config

    config = load_config(Path(__file__).parent.parent / "conf" / "default.yaml")
    resolved = resolve_job_config(config)
    assert resolved.output_hash() == config.output_hash()
    st = read_st_config(minilm_dir)
    assert (st.pooling, st.normalize, st.max_seq_length) == ("mean", True, 256)


def test_run_job_records_the_resolved_settings_and_matches_sentence_transformers(ray_cluster, tmp_path, bert_dir):
    """The driver path: the config resolved against the model on the driver, the prompt applied by the
    tokenize tasks, Dense + truncate_dim + Normalize on the encoder actors; the manifest says what ran."""
    from pipeline.output.shards import read_shard
    from pipeline.run.driver import run_job

    model_dir = build_st(tmp_path / "st", bert_dir, "cls", dense=24, normalize=True, prompts=PROMPTS,
                         default_prompt_name="query")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}, ensure_ascii=False) + "\n"
                              for i, t in enumerate(TEXTS)), encoding="utf-8")
    config = validate_config({"input": {"path": str(corpus), "id_column": "id"},
                              "output": {"path": str(tmp_path / "out"), "shard_rows": 8},
                              "encoder": {"model": str(model_dir), "truncate_dim": 16}})
    run_job(config)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    enc = manifest["config"]["encoder"]
    assert (enc["pooling"], enc["normalize"], enc["prompt"], enc["prompt_name"], enc["truncate_dim"]) == (
        "cls", True, "query: ", "query", 16)
    assert manifest["config_hash"] == resolve_job_config(config).output_hash()
    tables = [read_shard(p) for p in sorted((tmp_path / "out" / "embeddings").glob("*.arrow"))]
    got = np.concatenate([np.asarray(t.column("embedding").to_pylist(), dtype=np.float32) for t in tables])
    np.testing.assert_allclose(got, reference(model_dir, truncate_dim=16, normalize_embeddings=True), atol=1e-5)
    assert all(r.nothing_to_do for r in run_job(config).values())  # the same resolved job: nothing to redo


def test_module_chains_embedpipe_cannot_run_are_refused_naming_the_file(tmp_path, bert_dir):
    model_dir = build_st(tmp_path / "st", bert_dir, "mean", normalize=True)
    modules = json.loads((model_dir / "modules.json").read_text())
    (model_dir / "modules.json").write_text(json.dumps(
        [*modules, {"idx": 9, "name": "9", "path": "9_LSTM", "type": "sentence_transformers.models.LSTM"}]))
    with pytest.raises(ConfigError, match="module 'sentence_transformers.models.LSTM' is not one embedpipe runs"):
        read_st_config(model_dir)
    (model_dir / "modules.json").write_text(json.dumps(modules))
    pooling = model_dir / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": True,
                                   "pooling_mode_mean_tokens": True}))  # the legacy format, two modes at once
    with pytest.raises(ConfigError, match="concatenates pooling modes"):
        read_st_config(model_dir)
    pooling.write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_max_tokens": True}))
    assert read_st_config(model_dir).pooling == "max"


def test_the_prompt_is_part_of_the_tokens_hash(tmp_path, bert_dir):
    model_dir = build_st(tmp_path / "st", bert_dir, "mean", prompts=PROMPTS, default_prompt_name="query")

    def hashes(**encoder):
        config = validate_config({"input": {"path": "x.jsonl"}, "encoder": {"model": str(model_dir), **encoder}})
        return resolve_job_config(config).stage_hashes()

    default, off, passage = hashes(), hashes(prompt=""), hashes(prompt_name="passage")
    assert len({default["tokens"], off["tokens"], passage["tokens"]}) == 3
    assert hashes(prompt="query: ")["tokens"] == default["tokens"]  # the same prefix, however it was named
