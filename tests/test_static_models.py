"""Static embedding models (a token table and a mean): a model2vec directory and a sentence-transformers
StaticEmbedding model, each built here from a tiny tokenizer and random vectors with the library's own save,
embedded by embedpipe and compared row by row with ``StaticModel.encode`` / ``SentenceTransformer.encode``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_tokenizers
from tokenizers import Tokenizer

from pipeline.config import validate_config
from pipeline.encode.stage import ShardEncoder, plan_embed
from pipeline.errors import ConfigError
from pipeline.tokenize.core import to_table, tokenize_texts
from pipeline.tokenize.loading import load_tokenize_spec
from pipeline.tokenize.static_models import static_model_files

# Short and long texts (past model2vec's max_length in tokens and in characters), an empty one, and
# characters the tiny vocabulary does not know ([UNK], which model2vec drops).
TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "", "☃ ☄ ♞ unknown glyphs ♜",
    "Padding, truncation and attention masks decide what a model sees. " * 12,
    "机器学习模型需要大量的训练数据。自然语言处理很有趣。" * 4, "a", "Привет, мир! Это текст на русском языке.",
    "Emoji 😀🎉 and flags 🇫🇷 appear in chat logs.", "Numbers 12345 67890 and symbols #@$%^&*()",
]


def _tokenizer(out_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_tokenizers.train_wordpiece(out_dir) / "tokenizer.json"))


def _vectors(rows: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def build_model2vec(model_dir: Path, dim: int = 24, normalize: bool = True, max_length: int | None = 24,
                    seed: int = 0, clusters: int | None = None) -> Path:
    """A model2vec StaticModel over the tiny WordPiece tokenizer, saved with its own save_pretrained.

    ``clusters``: a vocabulary-quantized model: that many vectors, a token -> vector mapping and per-token weights.
    """
    from model2vec import StaticModel

    tok = _tokenizer(model_dir.parent / f"{model_dir.name}-tok")
    vocab = tok.get_vocab_size()
    extra = {}
    if clusters:
        rng = np.random.default_rng(seed + 100)
        extra = {"token_mapping": rng.integers(0, clusters, vocab), "weights": rng.uniform(0.2, 2.0, vocab)}
    model = StaticModel(_vectors(clusters or vocab, dim, seed), tok, normalize=normalize, max_length=max_length,
                        **extra)
    model.save_pretrained(str(model_dir))
    return model_dir


def build_st_static(model_dir: Path, dim: int = 24, normalize: bool = True, seed: int = 1) -> Path:
    """A SentenceTransformer of a StaticEmbedding (and Normalize), saved with SentenceTransformer.save."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding

    tok = _tokenizer(model_dir.parent / f"{model_dir.name}-tok")
    modules = [StaticEmbedding(tok, embedding_weights=_vectors(tok.get_vocab_size(), dim, seed))]
    SentenceTransformer(modules=modules + ([Normalize()] if normalize else []), device="cpu").save(str(model_dir))
    return model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("static")
    return {
        "model2vec": build_model2vec(root / "m2v"),
        "model2vec-raw": build_model2vec(root / "m2v-raw", normalize=False, max_length=8),
        "model2vec-nomax": build_model2vec(root / "m2v-nomax", normalize=False, max_length=None),
        "model2vec-vq": build_model2vec(root / "m2v-vq", normalize=False, clusters=50),
        "st": build_st_static(root / "st"),
        "st-raw": build_st_static(root / "st-raw", normalize=False),
    }


def _reference(kind: str, model_dir: Path, texts: list[str]) -> np.ndarray:
    if kind.startswith("model2vec"):
        from model2vec import StaticModel

        return StaticModel.from_pretrained(str(model_dir)).encode(texts)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(texts)


def _assert_rows_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    zero = np.linalg.norm(ref, axis=1) == 0
    assert np.array_equal(zero, np.linalg.norm(ours, axis=1) == 0)  # rows with no known token: zeros in both
    cos = (ours * ref).sum(1)[~zero] / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))[~zero]
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)  # norms too (normalized or not)


def _config(model_dir: Path, out: Path | str = "out", **sections):
    return validate_config({"input": {"path": "unused.jsonl"}, "output": {"path": str(out), "shard_rows": 4},
                            "encoder": {"model": str(model_dir), **sections.pop("encoder", {})}, **sections})


def _embed_in_process(config, texts: list[str], tmp_path: Path) -> np.ndarray:
    """The stage functions without Ray: tokenize with the resolved spec, commit a token shard, embed it."""
    from pipeline.encode.pieces import assemble_shard  # noqa: F401  (the commit ShardEncoder.embed_shard runs)
    from pipeline.encode.stage import embedding_schema
    from pipeline.output.contract import TOKENS
    from pipeline.output.shards import read_shard, write_shard

    spec = load_tokenize_spec(config)
    table = to_table(spec, tokenize_texts(spec, [str(i) for i in range(len(texts))], texts))
    out = tmp_path / "job"
    write_shard(table, out / TOKENS / "data-00000-of-00001.arrow")
    embed = plan_embed(config, spec, "cpu", 1)
    ShardEncoder(embed).embed_shard(str(out), "data-00000-of-00001.arrow")
    shard = read_shard(out / "embeddings" / "data-00000-of-00001.arrow")
    assert shard.schema.equals(embedding_schema(embed, False), check_metadata=True)
    return np.stack(shard.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


@pytest.mark.parametrize("kind", ["model2vec", "model2vec-raw", "model2vec-nomax", "model2vec-vq", "st", "st-raw"])
def test_rows_equal_the_library_encode(kind, models, tmp_path):
    ours = _embed_in_process(_config(models[kind]), TEXTS, tmp_path)
    _assert_rows_equal(ours, _reference(kind, models[kind], TEXTS))


def test_tokenizer_defaults_are_the_library_s(models):
    m2v = load_tokenize_spec(_config(models["model2vec"]))
    assert (m2v.add_special_tokens, m2v.padding, m2v.truncation, m2v.max_length) == (False, "none", True, 24)
    from model2vec import StaticModel

    assert m2v.max_chars == 24 * StaticModel.from_pretrained(str(models["model2vec"])).median_token_length
    st = load_tokenize_spec(_config(models["st"]))
    assert (st.add_special_tokens, st.padding, st.truncation, st.max_chars) == (False, "none", False, None)
    # An explicit setting wins over the model's.
    explicit = load_tokenize_spec(_config(models["st"], tokenizer={"add_special_tokens": True}))
    assert explicit.add_special_tokens is True
    assert static_model_files(models["model2vec"]).kind == "model2vec"
    assert static_model_files(models["st"]).kind == "sentence_transformers"


def test_static_model_actors_book_cpus_on_a_gpu_cluster(models):
    from pipeline.run.encoder_pool import plan_encoders

    config = _config(models["model2vec"])
    plan = plan_encoders(config, load_tokenize_spec(config), {"CPU": 4, "GPU": 2})
    assert plan.spec.static and plan.spec.device == "cpu"
    assert "num_gpus" not in plan.resources and plan.count == 4  # one per CPU, no GPU left idle and booked


def test_a_transformers_model_is_not_static(tmp_path):
    from tiny_models import build_tiny_bert

    assert static_model_files(build_tiny_bert(tmp_path / "bert")) is None


def test_pooling_other_than_mean_is_refused(models):
    config = _config(models["st"], encoder={"pooling": "cls"})
    with pytest.raises(ConfigError, match="static embedding model"):
        plan_embed(config, load_tokenize_spec(config), "cpu", 1)


def test_unsupported_modules_after_static_embedding_are_refused(models, tmp_path):
    import shutil

    model_dir = tmp_path / "st-dense"
    shutil.copytree(models["st"], model_dir)
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.insert(1, {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"})
    (model_dir / "modules.json").write_text(json.dumps(modules))
    config = _config(model_dir)
    with pytest.raises(ConfigError, match="Dense"):
        plan_embed(config, load_tokenize_spec(config), "cpu", 1)


def test_a_whole_job_equals_model2vec_and_verifies_and_plots(models, tmp_path):
    from pipeline.ops.plot import plot_embeddings
    from pipeline.ops.verify import verify_output
    from pipeline.output.shards import read_shard
    from pipeline.run.driver import run_job

    corpus = tmp_path / "corpus.jsonl"
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(30)]
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out"
    run_job(validate_config({"input": {"path": str(corpus)}, "output": {"path": str(out), "shard_rows": 8},
                             "encoder": {"model": str(models["model2vec"])}}))
    tables = [read_shard(p) for p in sorted((out / "embeddings").glob("*.arrow"))]
    ours = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
    _assert_rows_equal(ours.astype(np.float32), _reference("model2vec", models["model2vec"], texts))
    assert verify_output(out).problems == []
    result = plot_embeddings(out, tmp_path / "pca.png", labels=3)
    assert (tmp_path / "pca.png").stat().st_size > 0 and len(result.rows) == 30


def test_an_explicit_normalize_wins_over_the_model_s(models, tmp_path):
    from model2vec import StaticModel

    ours = _embed_in_process(_config(models["model2vec"], encoder={"normalize": False}), TEXTS, tmp_path / "a")
    _assert_rows_equal(ours, StaticModel.from_pretrained(str(models["model2vec"])).encode(TEXTS, normalize=False))
    ours = _embed_in_process(_config(models["st-raw"], encoder={"normalize": True}), TEXTS, tmp_path / "b")
    ref = _reference("st", models["st-raw"], TEXTS)
    norms = np.linalg.norm(ref, axis=1, keepdims=True)
    _assert_rows_equal(ours, np.divide(ref, norms, out=np.zeros_like(ref), where=norms > 0))


def test_truncate_dim_equals_sentence_transformers(models, tmp_path):
    from sentence_transformers import SentenceTransformer

    ours = _embed_in_process(_config(models["st"], encoder={"truncate_dim": 8}), TEXTS, tmp_path)
    ref = SentenceTransformer(str(models["st"]), device="cpu", truncate_dim=8).encode(TEXTS, normalize_embeddings=True)
    _assert_rows_equal(ours, ref)


def test_the_hash_tells_an_explicit_special_tokens_setting_from_the_model_s_default(models):
    from pipeline.tokenize.st_config import resolve_job_config

    unset = resolve_job_config(_config(models["model2vec"]))
    explicit_true = resolve_job_config(_config(models["model2vec"], tokenizer={"add_special_tokens": True}))
    explicit_false = resolve_job_config(_config(models["model2vec"], tokenizer={"add_special_tokens": False}))
    assert load_tokenize_spec(unset).add_special_tokens is False
    assert load_tokenize_spec(explicit_true).add_special_tokens is True
    assert unset.stage_hashes()["tokens"] != explicit_true.stage_hashes()["tokens"]
    assert unset.stage_hashes()["tokens"] == explicit_false.stage_hashes()["tokens"]  # the same tokens
