"""The embed stage end to end on the session's Ray cluster: aligned shards, references, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from tiny_models import build_tiny_clip_text, build_tiny_gpt2

from pipeline.config import validate_config
from pipeline.data.reader import arrow_to_tensor
from pipeline.errors import ConfigError
from pipeline.output.shards import read_shard
from pipeline.run.driver import run_job

TEXTS = [
    "A cat sits on the mat.", "", "Tokenizers and encoders turn text into vectors.",
    "机器学习模型需要大量的训练数据。", "Emoji 😀 and accents: café, naïve.", "short",
    "A much longer paragraph about embeddings. " * 12, "مرحبا بالعالم", "The quick brown fox.",
] * 5


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(TEXTS)), encoding="utf-8")
    return path


def _config(corpus: Path, out: Path, tokenizer: dict | None = None, encoder: dict | None = None):
    return validate_config({
        "input": {"path": str(corpus), "id_column": "id"},
        "output": {"path": str(out), "shard_rows": 16},
        "tokenizer": {"name": "minilm", "max_length": 256, **(tokenizer or {})},
        "encoder": {"model": "minilm", "pooling": "mean", "normalize": True, **(encoder or {})},
    })


def _embeddings(out: Path) -> tuple[list[str], np.ndarray]:
    tables = [read_shard(p) for p in sorted((out / "embeddings").glob("*.arrow"))]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    field = tables[0].schema.field("embedding")
    return ids, torch.cat([arrow_to_tensor(t.column("embedding"), field) for t in tables]).float().numpy()


def test_run_matches_sentence_transformers_row_for_row(ray_cluster, tmp_path, minilm_dir):
    from sentence_transformers import SentenceTransformer

    out, corpus = tmp_path / "out", _corpus(tmp_path)
    results = run_job(_config(corpus, out))
    assert set(results) == {"tokens", "embeddings"}
    ids, got = _embeddings(out)
    assert ids == [f"doc-{i}" for i in range(len(TEXTS))]
    # Row j of embedding shard i belongs to row j of token shard i.
    for shard in sorted((out / "tokens").glob("*.arrow")):
        assert read_shard(shard).column("id") == read_shard(out / "embeddings" / shard.name).column("id")
    model = SentenceTransformer(minilm_dir, device="cpu")
    model.max_seq_length = 256
    want = model.encode(TEXTS, normalize_embeddings=True, batch_size=7)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.99999

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    tokens, embeddings = manifest["stages"]["tokens"], manifest["stages"]["embeddings"]
    assert sorted(embeddings["shards"]) == sorted(tokens["shards"])
    for name, record in embeddings["shards"].items():
        assert record["tokens_sha256"] == tokens["shards"][name]["sha256"]
        assert record["nonfinite_rows"] == 0 and abs(record["mean_norm"] - 1.0) < 1e-4
    ds = datasets.load_from_disk(str(out / "embeddings")).with_format("torch")
    assert ds[:3]["embedding"].shape == (3, 384)
    again = run_job(_config(corpus, out))
    assert all(r.nothing_to_do for r in again.values())


def test_embed_alone_after_tokenize_and_budget_does_not_change_rows(ray_cluster, tmp_path):
    corpus = _corpus(tmp_path)
    run_job(_config(corpus, tmp_path / "a"), stages=("tokens",))
    with pytest.raises(ConfigError, match="not complete"):
        run_job(_config(corpus, tmp_path / "b"), stages=("embeddings",))
    run_job(_config(corpus, tmp_path / "a"), stages=("embeddings",))
    run_job(_config(corpus, tmp_path / "c", encoder={"max_tokens_per_batch": 64}))
    ids_a, emb_a = _embeddings(tmp_path / "a")
    ids_c, emb_c = _embeddings(tmp_path / "c")
    assert ids_a == ids_c
    np.testing.assert_allclose(emb_a, emb_c, atol=1e-6)


def _per_token_rows(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids (N, L), lengths (N,), stored embeddings widened to float32 (N, L, D)) over every shard, in order."""
    ids, lengths, embeddings = [], [], []
    for shard in sorted((out / "tokens").glob("*.arrow")):
        tokens, table = read_shard(shard), read_shard(out / "embeddings" / shard.name)
        assert tokens.column("id") == table.column("id")
        ids.append(np.stack(tokens.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64))
        lengths.append(tokens.column("length").to_numpy())
        embeddings.append(arrow_to_tensor(table.column("embedding"), table.schema.field("embedding")).float().numpy())
    return np.concatenate(ids), np.concatenate(lengths), np.concatenate(embeddings)


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine of each position's vector (a zero vector against a non-zero one counts as 0)."""
    norms = np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1)
    return np.where(norms > 0, (got * want).sum(-1) / np.where(norms > 0, norms, 1), 0.0)


def test_per_token_clip_output_and_bfloat16(ray_cluster, tmp_path):
    """SD 1.x: CLIP's text encoder run without the attention mask, every one of the 77 positions kept.

    Each row must equal an unmasked ``CLIPTextModel`` forward of the stored row, padding included: its
    ``last_hidden_state``. CLIP is causal, so with right padding the real positions do not see the pads
    either way; the pad positions are what the mask changes (computed states unmasked, zeros masked).
    Computed in float32, stored as bfloat16: cosine >= 0.999 per row per position (half precision).
    """
    from transformers import CLIPTextModel

    clip = build_tiny_clip_text(tmp_path / "clip")
    out = tmp_path / "out"
    config = _config(_corpus(tmp_path), out,
                     tokenizer={"name": str(clip), "max_length": 77, "padding": "max_length"},
                     encoder={"model": str(clip), "pooling": "none", "normalize": False,
                              "use_attention_mask": False, "output_dtype": "bfloat16"})
    run_job(config)
    table = read_shard(next((out / "embeddings").glob("*.arrow")))
    field = table.schema.field("embedding")
    assert field.metadata[b"embedpipe.dtype"] == b"bfloat16"
    tensor = arrow_to_tensor(table.column("embedding"), field)
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (len(table), 77, 32)
    # Bit patterns round-trip: the stored uint16 values are the tensor's bits.
    stored = table.column("embedding").combine_chunks().flatten().flatten().to_numpy()
    assert np.array_equal(tensor.view(torch.int16).numpy().reshape(-1).view(np.uint16), stored)
    assert pa.types.is_fixed_size_list(field.type.value_type)

    input_ids, lengths, got = _per_token_rows(out)
    assert len(got) == len(TEXTS) and (lengths < 77).any()  # some rows are padded: the mask would matter
    model = CLIPTextModel.from_pretrained(str(clip)).eval()
    with torch.inference_mode():
        want = np.stack([model(input_ids=torch.from_numpy(row[None])).last_hidden_state[0].numpy() for row in input_ids])
    cosine = _cosines(got, want)
    assert cosine.min() >= 0.999, np.unravel_index(cosine.argmin(), cosine.shape)
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2e-3)  # bfloat16 keeps 8 significant bits


def test_per_token_clip_with_mask_layer_norm_and_compute_dtype_from_the_config(ray_cluster, tmp_path):
    """SDXL-style settings, all from the config: the mask on, the penultimate layer without the final layer
    norm, computed in bfloat16, stored as float32. Each row equals a masked forward of its real tokens alone
    (``hidden_states[-2]``, no ``final_layer_norm``); pad positions are zeros. Tolerance of a bfloat16 compute:
    cosine >= 0.999 per row per position."""
    from transformers import CLIPTextModel

    clip = build_tiny_clip_text(tmp_path / "clip")
    out = tmp_path / "out"
    config = _config(_corpus(tmp_path), out,
                     tokenizer={"name": str(clip), "max_length": 77, "padding": "max_length"},
                     encoder={"model": str(clip), "pooling": "none", "normalize": False, "use_attention_mask": True,
                              "layer": -2, "final_layer_norm": False, "dtype": "bfloat16",
                              "output_dtype": "float32"})
    run_job(config)
    input_ids, lengths, got = _per_token_rows(out)
    model = CLIPTextModel.from_pretrained(str(clip)).eval()
    want = np.zeros_like(got)
    with torch.inference_mode():
        for row, (ids, length) in enumerate(zip(input_ids, lengths)):
            states = model(input_ids=torch.from_numpy(ids[None, :length]), output_hidden_states=True).hidden_states
            want[row, :length] = states[-2][0].numpy()
    real = np.arange(77)[None, :] < lengths[:, None]
    assert not got[~real].any()  # pad positions: zeros
    cosine = _cosines(got, want)[real]
    assert cosine.min() >= 0.999, cosine.min()
    # ... and computed in bfloat16: a float32 forward agrees with the reference to ~1e-6, this one does not.
    assert np.abs(got[real] - want[real]).max() > 1e-4
    # The settings took effect: the raw penultimate layer is far from the last layer and from the normed one.
    with torch.inference_mode():
        ids = torch.from_numpy(input_ids[:1, :lengths[0]])
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
        norm = getattr(model, "text_model", model).final_layer_norm  # nested in transformers 4.x
        last, normed = states[-1][0].numpy(), norm(states[-2])[0].numpy()
    assert _cosines(got[0, :lengths[0]], last).min() < 0.99
    assert _cosines(got[0, :lengths[0]], normed).min() < 0.99


def test_encoder_config_errors_before_work(ray_cluster, tmp_path):
    corpus = _corpus(tmp_path)
    gpt2 = build_tiny_gpt2(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="encoder.layer"):
        run_job(_config(corpus, tmp_path / "o1", encoder={"layer": 9}))
    with pytest.raises(ConfigError, match="tokenizer has .* tokens but encoder.model"):
        run_job(_config(corpus, tmp_path / "o2", encoder={"model": str(gpt2)}))
    with pytest.raises(ConfigError, match="per-token output"):
        run_job(_config(corpus, tmp_path / "o3", tokenizer={"padding": "longest"}, encoder={"pooling": "none"}))
    with pytest.raises(ConfigError, match="encoder.device: 'cuda'"):
        run_job(_config(corpus, tmp_path / "o4", encoder={"device": "cuda"}))
    assert not (tmp_path / "o1" / "tokens").exists()


def test_left_padded_decoder_last_token_pooling(ray_cluster, tmp_path):
    """GPT-2 style: pad with end-of-text on the left, pool the last real token; equals a lone forward pass."""
    from transformers import AutoTokenizer, GPT2Model

    gpt2 = build_tiny_gpt2(tmp_path / "gpt2")
    out = tmp_path / "out"
    texts = TEXTS[:9]
    corpus = tmp_path / "g.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}, ensure_ascii=False) + "\n"
                              for i, t in enumerate(texts)), encoding="utf-8")
    config = _config(corpus, out, tokenizer={"name": str(gpt2), "max_length": 32, "padding_side": "left",
                                             "pad_token": "<|endoftext|>"},
                     encoder={"model": str(gpt2), "pooling": "last", "normalize": False})
    run_job(config)
    _, got = _embeddings(out)
    model = GPT2Model.from_pretrained(str(gpt2)).eval()
    tok = AutoTokenizer.from_pretrained(str(gpt2))
    for row, text in enumerate(texts):
        ids = tok(text, truncation=True, max_length=32)["input_ids"]
        if not ids:
            assert not got[row].any()
            continue
        with torch.inference_mode():
            want = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].numpy()
        cosine = float(got[row] @ want / np.linalg.norm(got[row]) / np.linalg.norm(want))
        assert cosine >= 0.99999, (row, cosine)
