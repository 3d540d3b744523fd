"""The packed (unpadded) forward equals a plain transformers forward pass of each row alone.

Tiny random-weight models (tests/tiny_models.py) of each family, with and without oneDNN packed linear layers,
and the real MiniLM (slow). Tolerances (DESIGN.md): cosine >= 0.99999 per row in float32, >= 0.999 in bfloat16.
"""

from __future__ import annotations

import copy
import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import tiny_models
import torch
import transformers
from transformers import AutoTokenizer, BertConfig, BertModel

from pipeline.encode import forward as forward_module
from pipeline.encode import packed
from pipeline.encode.cpu_linear import onednn_linear_available, pack_linear_layers
from pipeline.encode.forward import EncodeOptions, encode_rows, pool
from pipeline.encode.models import final_norm, load_encoder, num_layers, resolve_model_dir

TEXTS = [
    "",
    "x",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; models read the pieces as integers. " * 6,  # truncated
    "机器学习模型需要大量的训练数据。",
    "Emoji 😀🎉👩\u200d👩\u200d👧 and flags 🇫🇷🇯🇵",
    "Padding, truncation and attention masks decide what a model sees.",
    "a b c d e f g h i j k l m n o p",
]
POOLINGS = ["mean", "cls", "last", "none"]
LAYERS = [-1, -2, 0]
FP32_COS = 0.99999
HALF_COS = 0.999
BUILDERS = {"bert": (tiny_models.build_tiny_bert, 48), "clip": (tiny_models.build_tiny_clip_text, 77),
            "gpt2": (tiny_models.build_tiny_gpt2, 40)}
CASES = [("bert", "right"), ("bert", "left"), ("clip", "right"), ("clip", "left"), ("gpt2", "left"),
         ("gpt2", "right")]
LINEARS = ["torch", "onednn"]
needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN linear operators in this torch")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("packed-models")
    return {name: str(build(root / name)) for name, (build, _) in BUILDERS.items()}


@pytest.fixture(scope="module")
def models(model_dirs) -> dict[tuple[str, str], torch.nn.Module]:
    """(family, linears) -> model; "onednn": every linear layer replaced by a PackedLinear."""
    out = {}
    for name, path in model_dirs.items():
        out[name, "torch"] = load_encoder(path)
        if onednn_linear_available():
            out[name, "onednn"] = load_encoder(path)
            assert pack_linear_layers(out[name, "onednn"]) > 0
    return out


def _tokenize(model_dir: str, side: str, max_length: int, texts=TEXTS) -> dict[str, np.ndarray]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = side
    return dict(tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"))


@pytest.fixture(scope="module")
def stored(model_dirs) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """TEXTS as a token shard stores them; BERT rows get random token types (a pair's second segment)."""
    out = {}
    for name, side in CASES:
        enc = _tokenize(model_dirs[name], side, BUILDERS[name][1])
        if name == "bert":
            rng = np.random.default_rng(0)
            enc["token_type_ids"] = (rng.integers(0, 2, enc["input_ids"].shape) * enc["attention_mask"])
        out[name, side] = enc
    return out


# -- the reference: a plain transformers forward pass of one row alone -------------------------------------------


def _row_alone(model, ids: np.ndarray, type_ids: np.ndarray | None, layer: int, apply_norm: bool) -> torch.Tensor:
    """(n, D) hidden states of one row's tokens alone (batch of one, no padding, no mask), the layer picked by hand."""
    norm = final_norm(model)
    before_norm: list[torch.Tensor] = []
    hook = norm.register_forward_pre_hook(lambda _m, args: before_norm.append(args[0])) if norm is not None else None
    inputs = {"input_ids": torch.from_numpy(ids.astype(np.int64))[None]}
    if type_ids is not None:
        inputs["token_type_ids"] = torch.from_numpy(type_ids.astype(np.int64))[None]
    try:
        with torch.inference_mode():
            out = model(**inputs, output_hidden_states=True)
    finally:
        if hook is not None:
            hook.remove()
    depth = layer if layer >= 0 else num_layers(model) + 1 + layer
    last = depth == num_layers(model)
    hidden = (before_norm[0] if norm is not None else out.last_hidden_state) if last else out.hidden_states[depth]
    if apply_norm:
        with torch.inference_mode():
            hidden = norm(hidden)
    return hidden[0].float()


_ROWS_ALONE: dict[tuple, list[np.ndarray | None]] = {}


def _rows_alone(model, enc, layer: int, apply_norm: bool) -> list[np.ndarray | None]:
    """Per stored row, its real tokens' reference hidden states (None for a row without any); cached."""
    key = (id(model), id(enc), layer, apply_norm)
    if key not in _ROWS_ALONE:
        types = enc.get("token_type_ids")
        _ROWS_ALONE[key] = [
            _row_alone(model, ids[mask], None if types is None else types[i][mask], layer, apply_norm).numpy()
            if mask.any() else None
            for i, (ids, mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"].astype(bool)))
        ]
    return _ROWS_ALONE[key]


def _expected(model, enc, pooling: str, layer: int, apply_norm: bool) -> np.ndarray:
    """Every row's reference hidden states, pooled by hand (pooling none: at the stored positions, zeros elsewhere)."""
    out = []
    dim = model.config.hidden_size
    for ids, mask, row in zip(enc["input_ids"], enc["attention_mask"].astype(bool),
                              _rows_alone(model, enc, layer, apply_norm)):
        if row is None:
            out.append(np.zeros((len(ids), dim) if pooling == "none" else dim, np.float32))
            continue
        if pooling == "none":
            full = np.zeros((len(ids), dim), np.float32)
            full[mask] = row
            out.append(full)
        else:
            out.append({"mean": row.mean(axis=0), "cls": row[0], "last": row[-1]}[pooling])
    return np.stack(out)


def _assert_rows_close(ours: np.ndarray, ref: np.ndarray, min_cos: float = FP32_COS) -> None:
    """Per vector: cosine >= min_cos, and the reference's zero vectors (padding, empty rows) exactly zero."""
    ours = np.asarray(ours, np.float32).reshape(-1, ours.shape[-1])
    ref = ref.reshape(-1, ref.shape[-1])
    zero = np.linalg.norm(ref, axis=1) == 0
    assert not ours[zero].any(), "positions that must be zeros are not"
    a, b = ours[~zero], ref[~zero]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= min_cos, f"min cosine {cos.min():.7f} < {min_cos} (row vector {np.argmin(cos)})"


def _norm_options(name: str) -> list[bool | None]:
    return [None, True, False] if name in ("clip", "gpt2") else [None]


def _apply_norm(model, layer: int, final_layer_norm: bool | None) -> bool:
    if final_layer_norm is not None:
        return final_layer_norm
    return (layer if layer >= 0 else num_layers(model) + 1 + layer) > 0 and final_norm(model) is not None


@pytest.fixture
def packed_calls(monkeypatch) -> list[int]:
    """Counts the batches encode_rows runs through the packed forward (so a test cannot pass on the padded one)."""
    calls: list[int] = []
    real = forward_module.packed_hidden_states

    def counting(model, input_ids, *args, **kwargs):
        calls.append(len(input_ids))
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(forward_module, "packed_hidden_states", counting)
    return calls


# -- encode_rows with packed on: every pooling x layer x final norm x padding side x linear layers ---------------


@pytest.mark.parametrize("linears", LINEARS)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name,side", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_packed_rows_equal_each_row_alone(name, side, layer, linears, models, stored, packed_calls):
    if (name, linears) not in models:
        pytest.skip("no oneDNN linear operators in this torch")
    model, enc = models[name, linears], stored[name, side]
    for final_layer_norm in _norm_options(name):
        apply_norm = _apply_norm(model, layer, final_layer_norm)
        for pooling in POOLINGS:
            options = EncodeOptions(pooling=pooling, layer=layer, final_layer_norm=final_layer_norm, packed=True,
                                    max_tokens_per_batch=96)
            ours = encode_rows(model, enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), options,
                               padding_side=side)
            width = enc["input_ids"].shape[1]
            assert ours.shape == ((len(TEXTS), width, 32) if pooling == "none" else (len(TEXTS), 32))
            # the reference is always the unpacked-linear model's plain forward of the row alone
            ref = _expected(models[name, "torch"], enc, pooling, layer, apply_norm)
            _assert_rows_close(ours, ref)
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert packed_calls, "the packed forward never ran"


def test_packed_equals_padded_up_to_rounding(models, stored, packed_calls):
    for name, side in CASES:
        enc = stored[name, side]
        args = (models[name, "torch"], enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        for pooling in ("mean", "none"):
            ours = encode_rows(*args, EncodeOptions(pooling=pooling, packed=True), padding_side=side)
            padded = encode_rows(*args, EncodeOptions(pooling=pooling), padding_side=side)
            np.testing.assert_allclose(ours, padded, rtol=0, atol=2e-6 * float(np.abs(padded).max()))


def test_unpadded_rows_and_normalize(models, stored, packed_calls):
    enc = stored["bert", "right"]
    mask = enc["attention_mask"].astype(bool)
    rows = [ids[m] for ids, m in zip(enc["input_ids"], mask)]
    types = [t[m] for t, m in zip(enc["token_type_ids"], mask)]
    ours = encode_rows(models["bert", "torch"], rows, None, types, EncodeOptions(normalize=True, packed=True))
    ref = _expected(models["bert", "torch"], enc, "mean", -1, False)
    _assert_rows_close(ours, ref)
    real = np.linalg.norm(ref, axis=1) > 0
    np.testing.assert_allclose(np.linalg.norm(ours[real], axis=1), 1.0, atol=1e-6)


def test_a_batch_without_any_token_embeds_as_zeros(models, packed_calls):
    ids = np.zeros((3, 8), np.int64)  # GPT-2 rows of empty texts: no token at all
    for pooling in POOLINGS:
        out = encode_rows(models["gpt2", "torch"], ids, np.zeros_like(ids), None,
                          EncodeOptions(pooling=pooling, packed=True))
        assert out.shape == ((3, 8, 32) if pooling == "none" else (3, 32)) and not out.any()
    assert packed_calls == [0] * 4


def test_bfloat16_within_half_tolerance(model_dirs, stored, packed_calls):
    for name, side in [("bert", "right"), ("clip", "right"), ("gpt2", "left")]:
        half, enc = load_encoder(model_dirs[name], dtype=torch.bfloat16), stored[name, side]
        reference_model = load_encoder(model_dirs[name])
        for pooling, layer in [("mean", -1), ("last", -2), ("none", -1)]:
            ours = encode_rows(half, enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"),
                               EncodeOptions(pooling=pooling, layer=layer, dtype=torch.bfloat16, packed=True),
                               padding_side=side)
            ref = _expected(reference_model, enc, pooling, layer, _apply_norm(reference_model, layer, None))
            _assert_rows_close(ours, ref, HALF_COS)


# -- the API directly ------------------------------------------------------------------------------------------------


def _pack(enc, rows=None):
    """(ids, positions, type ids, lengths) of stored rows' real tokens, concatenated."""
    mask = enc["attention_mask"].astype(bool)
    rows = range(len(mask)) if rows is None else rows
    ids = np.concatenate([enc["input_ids"][i][mask[i]] for i in rows])
    positions = np.concatenate([np.arange(mask[i].sum()) for i in rows])
    types = None if "token_type_ids" not in enc else np.concatenate([enc["token_type_ids"][i][mask[i]] for i in rows])
    lengths = torch.tensor([int(mask[i].sum()) for i in rows])
    as_t = lambda a: None if a is None else torch.from_numpy(a.astype(np.int64))
    return as_t(ids), as_t(positions), as_t(types), lengths


def test_pool_packed_matches_pool_on_the_padded_layout():
    torch.manual_seed(0)
    lengths = torch.tensor([3, 0, 5, 1])
    seqs = packed.segments(lengths)
    assert seqs.cu_seqlens.dtype == torch.int32 and seqs.cu_seqlens.tolist() == [0, 3, 3, 8, 9]
    assert seqs.max_seqlen == 5
    hidden = torch.randn(int(lengths.sum()), 4)
    keep = torch.arange(5)[None] < lengths[:, None]
    padded = torch.full((4, 5, 4), float("nan"))  # padding must never be read
    padded[keep] = hidden
    for pooling in ("mean", "cls", "last"):
        got = packed.pool_packed(hidden, seqs.cu_seqlens, pooling)
        torch.testing.assert_close(got, pool(padded, keep, pooling))
        assert not got[1].any()


def test_packed_family_names_what_it_cannot_run(models, monkeypatch):
    assert [packed.packed_family(models[n, "torch"])[0] for n in ("bert", "clip", "gpt2")] == ["bert", "clip", "gpt2"]
    bert = models["bert", "torch"]

    class RemoteBert(BertModel):  # what trust_remote_code would load: a class from the model's own code
        pass

    remote = copy.deepcopy(bert)
    remote.__class__ = RemoteBert
    assert packed.packed_family(remote)[0] is None and "not transformers' BertModel" in packed.packed_family(remote)[1]
    flash = copy.deepcopy(bert)
    flash.config._attn_implementation = "flex_attention"
    assert "flex_attention" in packed.packed_family(flash)[1]
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    assert "transformers 5" in packed.packed_family(bert)[1]
    monkeypatch.undo()
    decoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   is_decoder=True))
    assert "decoder" in packed.packed_family(decoder)[1]
    with pytest.raises(ValueError, match="no packed forward"):
        packed.packed_hidden_states(decoder, torch.tensor([1, 2]), torch.tensor([0, 2], dtype=torch.int32),
                                    torch.tensor([0, 1]), None, -1, False)


def test_unsupported_or_unmasked_runs_padded_and_logs_once(models, stored, caplog, monkeypatch):
    enc = stored["clip", "right"]
    model = models["clip", "torch"]
    args = (model, enc["input_ids"], enc["attention_mask"], None)
    ran = []
    monkeypatch.setattr(forward_module, "packed_hidden_states", lambda *a, **k: ran.append(1))
    forward_module._log_padded.cache_clear()
    with caplog.at_level(logging.INFO, logger="embedpipe"):
        for _ in range(2):  # SD 1.x: no mask, so the stored padding is seen; the padded path is the only one
            ours = encode_rows(*args, EncodeOptions(pooling="none", use_attention_mask=False, packed=True))
            np.testing.assert_array_equal(ours, encode_rows(*args, EncodeOptions(pooling="none",
                                                                                 use_attention_mask=False)))
        unsupported = copy.deepcopy(model)
        unsupported.__class__ = type("RemoteCLIPTextModel", (type(model),), {})  # as from a model's own code
        for _ in range(2):
            encode_rows(unsupported, *args[1:], EncodeOptions(packed=True))
    assert not ran
    messages = [r.getMessage() for r in caplog.records if "encoder.packed" in r.getMessage()]
    assert len(messages) == 2, messages
    assert "use_attention_mask is off" in messages[0] and "RemoteCLIPTextModel" in messages[1]


# -- the CUDA kernel's call, checked on the CPU ----------------------------------------------------------------------


def _cpu_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):
    """torch's varlen_attn as documented (window (-1, 0) causal, (-1, -1) full), by one SDPA per segment."""
    assert window_size in ((-1, -1), (-1, 0))
    bounds = cu_q.tolist()
    seqs = packed.Segments(cu_q, tuple(bounds), max_q)
    return packed.rowwise_attention(q, k, v, seqs, window_size == (-1, 0), scale)


@pytest.mark.parametrize("name,side", [("bert", "right"), ("clip", "right"), ("gpt2", "left")])
def test_varlen_kernel_gets_int32_offsets_max_length_causality_and_scale(name, side, models, stored, monkeypatch):
    model, enc = models[name, "torch"], stored[name, side]
    calls = []

    def recorder(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append(dict(shape=tuple(q.shape), contiguous=all(t.is_contiguous() for t in (q, k, v)),
                          cu=cu_q.tolist(), same_cu=cu_k is cu_q, dtype=cu_q.dtype, max=(max_q, max_k), **kwargs))
        return _cpu_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    monkeypatch.setattr(packed, "_varlen_kernel", lambda: recorder)
    ids, positions, types, lengths = _pack(enc)
    seqs = packed.segments(lengths)
    with torch.inference_mode():
        hidden = packed.packed_hidden_states(model, ids, seqs.cu_seqlens, positions, types, -1, False,
                                             attention=packed.varlen_attention)
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    assert len(calls) == num_layers(model)
    for call in calls:
        assert call["shape"] == (int(lengths.sum()), heads, head_dim) and call["contiguous"]
        assert call["dtype"] == torch.int32 and call["same_cu"]
        assert call["cu"] == [0, *np.cumsum(lengths.numpy()).tolist()]
        assert call["max"] == (int(lengths.max()), int(lengths.max()))
        assert call["window_size"] == ((-1, -1) if name == "bert" else (-1, 0))
        assert call["scale"] == pytest.approx(head_dim ** -0.5)
    # and what the kernel computed is each row's plain forward pass
    for i, (start, end) in enumerate(zip(seqs.bounds, seqs.bounds[1:])):
        if end > start:
            ref = _row_alone(model, ids[start:end].numpy(), None if types is None else types[start:end].numpy(),
                             -1, False)
            torch.testing.assert_close(hidden[start:end], ref, rtol=1e-4, atol=1e-4)


def test_varlen_needs_torch_2_11(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.10.0")  # varlen_attn then took is_causal, not window_size
    assert not packed.varlen_available()


@pytest.mark.skipif(not packed.varlen_available(), reason="needs a CUDA GPU with flash attention (sm80+)")
@pytest.mark.parametrize("name,side", [("bert", "right"), ("clip", "right"), ("gpt2", "left")])
def test_the_varlen_kernel_on_a_gpu_equals_rows_alone(name, side, model_dirs, models, stored, packed_calls):
    enc = stored[name, side]
    model = load_encoder(model_dirs[name], dtype=torch.bfloat16, device="cuda")
    assert packed.packed_family(model)[0] == name
    for pooling, layer in [("mean", -1), ("last", -2), ("none", -1), ("cls", 0)]:
        ours = encode_rows(model, enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"),
                           EncodeOptions(pooling=pooling, layer=layer, dtype=torch.bfloat16, packed=True),
                           padding_side=side)
        reference = models[name, "torch"]
        _assert_rows_close(ours, _expected(reference, enc, pooling, layer, _apply_norm(reference, layer, None)),
                           HALF_COS)
    assert packed_calls


def test_attention_is_chosen_by_device():
    assert packed.default_attention(torch.device("cuda")) is packed.varlen_attention
    assert packed.default_attention(torch.device("cpu")) is packed.rowwise_attention


# -- the real MiniLM -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("linears", LINEARS)
def test_minilm_packed_equals_rows_alone_and_sentence_transformers(linears):
    if linears == "onednn" and not onednn_linear_available():
        pytest.skip("no oneDNN linear operators in this torch")
    from sentence_transformers import SentenceTransformer

    model_dir = str(resolve_model_dir("minilm"))
    texts = [*TEXTS, "lorem ipsum dolor sit amet " * 80, "A man is eating food.",
             "Quarterly revenue grew 12% year over year, driven by cloud services.",
             "SELECT id, name FROM users WHERE created_at > '2024-01-01';"]
    enc = _tokenize(model_dir, "right", 256, texts)
    model = load_encoder(model_dir)
    if linears == "onednn":
        pack_linear_layers(model)
    args = (model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    ours = encode_rows(*args, EncodeOptions(pooling="mean", normalize=True, packed=True, max_tokens_per_batch=2048))
    st = SentenceTransformer(model_dir, device="cpu").encode(texts, normalize_embeddings=True)
    assert (ours * st).sum(axis=1).min() >= FP32_COS
    reference = load_encoder(model_dir)
    for pooling in ("cls", "none"):
        ours = encode_rows(*args, EncodeOptions(pooling=pooling, packed=True, max_tokens_per_batch=2048))
        _assert_rows_close(ours, _expected(reference, enc, pooling, -1, False))
