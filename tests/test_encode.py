"""Embeddings equal a plain transformers forward pass of each row alone, whatever its batch.

Tiny random-weight models (tests/tiny_models.py) of each family: BERT, CLIP's text encoder, GPT-2.
Tolerances (DESIGN.md): cosine >= 0.99999 per row in float32, >= 0.999 in half precision.
"""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass, replace

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
import tiny_models  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from pipeline.data.reader import arrow_to_tensor  # noqa: E402
from pipeline.encode.cpu_linear import (  # noqa: E402
    PackedLinear,
    fusable_activation,
    onednn_linear_available,
    pack_linear_layers,
)
from pipeline.encode.device import resolve_device  # noqa: E402
from pipeline.encode.forward import EncodeOptions, encode_rows, plan_batches  # noqa: E402
from pipeline.encode.models import load_encoder, resolve_model_dir  # noqa: E402
from pipeline.encode.stage import EmbedSpec, ShardEncoder  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.output.embedding_format import count_nonfinite, embedding_arrow_field, embeddings_to_arrow  # noqa: E402

TEXTS = [
    "",
    "x",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; models read the pieces as integers. " * 6,  # truncated
    "机器学习模型需要大量的训练数据。",
    "Emoji 😀🎉👩\u200d👩\u200d👧 and flags 🇫🇷🇯🇵",
    "Padding, truncation and attention masks decide what a model sees.",
    "Combining marks: e\u0301 a\u0300 o\u0308 — café naïve",
    "مرحبا بالعالم، שלום עולם",
    "Numbers 12345 67890 <html>",
    "Tabs\tand  double  spaces\nand newlines.",
    "a b c d e f g h i j k l m n o p",
]
POOLINGS = ["mean", "cls", "last", "none"]
LAYERS = [-1, -2, 0]
FP32_COS = 0.99999
HALF_COS = 0.999


@dataclass
class Case:
    """A tiny model and TEXTS tokenized as a stored shard would hold them."""

    name: str
    model: torch.nn.Module
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    padding_side: str
    model_dir: str

    def encode(self, **options) -> np.ndarray:
        return encode_rows(self.model, self.input_ids, self.attention_mask, self.token_type_ids,
                           EncodeOptions(**options), padding_side=self.padding_side)


def _tokenize(model_dir, side: str, max_length: int, texts=TEXTS) -> dict[str, np.ndarray]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2 style: pad with end-of-text
    tok.padding_side = side
    return dict(tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"))


BUILDERS = {"bert": (tiny_models.build_tiny_bert, 48), "clip": (tiny_models.build_tiny_clip_text, 77),
            "gpt2": (tiny_models.build_tiny_gpt2, 40)}
CASES = [("bert", "right"), ("bert", "left"), ("clip", "right"), ("gpt2", "left"), ("gpt2", "right")]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encode-models")
    return {name: str(build(root / name)) for name, (build, _) in BUILDERS.items()}


@pytest.fixture(scope="session")
def models(model_dirs) -> dict[str, torch.nn.Module]:
    return {name: load_encoder(path) for name, path in model_dirs.items()}


def _case(name: str, side: str, model_dirs, models) -> Case:
    enc = _tokenize(model_dirs[name], side, BUILDERS[name][1])
    return Case(name, models[name], enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), side,
                model_dirs[name])


@pytest.fixture(scope="session")
def cases(model_dirs, models) -> dict[tuple[str, str], Case]:
    return {(name, side): _case(name, side, model_dirs, models) for name, side in CASES}


@pytest.fixture(scope="session", params=CASES, ids=[f"{n}-{s}" for n, s in CASES])
def case(request, cases) -> Case:
    return cases[request.param]


# -- the reference: a plain forward pass of one row ------------------------------------------------------------


def _reference_layer(model, name: str, ids: np.ndarray, layer: int, final_layer_norm: bool | None) -> torch.Tensor:
    """(T, D) hidden states of one unbatched, unmasked row, the layer chosen by hand."""
    with torch.inference_mode():
        out = model(torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
    hidden = out.hidden_states[layer] if layer != -1 else out.last_hidden_state
    norm = {"clip": getattr(model, "final_layer_norm", None), "gpt2": getattr(model, "ln_f", None)}.get(name)
    normed_by_model = layer == -1 and name in ("clip", "gpt2")
    want_norm = final_layer_norm if final_layer_norm is not None else (layer != 0 and norm is not None)
    if want_norm and not normed_by_model:
        hidden = norm(hidden)
    if not want_norm and layer == -1 and name == "clip":
        hidden = out.hidden_states[-1]
    return hidden[0].float()


_REFERENCE_CACHE: dict[tuple, list[np.ndarray]] = {}


def _reference_rows(case: Case, layer: int, use_mask: bool, norm: bool | None, model) -> list[np.ndarray]:
    """Per row, (L, D) hidden states of its plain forward pass placed at the row's stored positions.

    With the mask: the row's real tokens alone (zeros elsewhere). Without: the stored row as it is.
    """
    key = (case.name, case.padding_side, layer, use_mask, norm, id(model))
    if key not in _REFERENCE_CACHE:
        rows = []
        for ids, mask in zip(case.input_ids, case.attention_mask.astype(bool)):
            if not use_mask:
                rows.append(_reference_layer(model, case.name, ids, layer, norm).numpy())
                continue
            full = np.zeros((len(ids), model.config.hidden_size), np.float32)
            if mask.any():
                full[mask] = _reference_layer(model, case.name, ids[mask], layer, norm).numpy()
            rows.append(full)
        _REFERENCE_CACHE[key] = rows
    return _REFERENCE_CACHE[key]


def _reference(case: Case, pooling: str, layer: int, use_mask: bool, norm: bool | None = None,
               model=None) -> np.ndarray:
    """The expected output for every row: its reference hidden states pooled by hand."""
    out = []
    for full, mask in zip(_reference_rows(case, layer, use_mask, norm, model or case.model),
                          case.attention_mask.astype(bool)):
        real = np.flatnonzero(mask)
        if pooling == "none":
            out.append(np.where(mask[:, None], full, 0.0) if use_mask else full)
        elif not mask.any():  # an empty text without special tokens pools to zeros
            out.append(np.zeros(full.shape[1], np.float32))
        elif pooling == "mean":
            out.append(full[mask].mean(axis=0))
        else:
            out.append(full[real[0] if pooling == "cls" else real[-1]])
    return np.stack(out)


def _assert_rows_close(ours: np.ndarray, ref: np.ndarray, min_cos: float) -> None:
    """Per vector (row, or row position for per-token output): cosine >= min_cos; reference zeros stay zeros."""
    ours = ours.astype(np.float32).reshape(-1, ours.shape[-1])
    ref = ref.reshape(-1, ref.shape[-1])
    zero = np.linalg.norm(ref, axis=1) == 0
    assert not ours[zero].any(), "positions that must be zeros are not"
    a, b = ours[~zero], ref[~zero]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= min_cos, f"min cosine {cos.min():.7f} < {min_cos}"


def _assert_same_up_to_rounding(ours: np.ndarray, expect: np.ndarray) -> None:
    """Equal up to float32 rounding: |difference| <= 1e-6 x the largest magnitude."""
    np.testing.assert_allclose(ours, expect, rtol=0, atol=1e-6 * float(np.abs(expect).max()))


# -- every pooling x layer x mask x padding side on the three families -----------------------------------------


@pytest.mark.parametrize("use_mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_rows_equal_plain_forward_of_the_row_alone(case, pooling, layer, use_mask):
    ours = case.encode(pooling=pooling, layer=layer, use_attention_mask=use_mask, max_tokens_per_batch=96)
    width = case.input_ids.shape[1]
    assert ours.shape == ((len(TEXTS), width, 32) if pooling == "none" else (len(TEXTS), 32))
    assert ours.dtype == np.float32
    ref = _reference(case, pooling, layer, use_mask)
    _assert_rows_close(ours, ref, FP32_COS)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_per_token_output_equals_the_row_padded_to_the_stored_width_with_its_mask(case):
    # The other reading of "a plain forward pass": the stored row, mask and all (position ids from the
    # mask when left-padded). On the real positions it agrees; the padded positions are zeros.
    ours = case.encode(pooling="none")
    assert ours.shape == (len(TEXTS), case.input_ids.shape[1], 32)
    for ids, mask, row in zip(case.input_ids, case.attention_mask, ours):
        inputs = {"input_ids": torch.from_numpy(ids[None].astype(np.int64)),
                  "attention_mask": torch.from_numpy(mask[None].astype(np.int64))}
        if case.padding_side == "left":
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if case.token_type_ids is not None:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        with torch.inference_mode():
            ref = case.model(**inputs).last_hidden_state[0].numpy()
        real = mask == 1
        assert not row[~real].any()
        if real.any():
            _assert_rows_close(row[real], ref[real], FP32_COS)


@pytest.mark.parametrize("name,layer", [("clip", -1), ("clip", -2), ("gpt2", -1), ("gpt2", -2)])
def test_final_layer_norm_off_gives_the_raw_layer(name, layer, cases, models):
    case = cases[(name, "right")]
    ours = case.encode(pooling="none", layer=layer, final_layer_norm=False)
    if name == "gpt2" and layer == -1:
        # transformers exposes GPT-2's last layer only after ln_f: check that ln_f of ours gives it.
        ours = models[name].ln_f(torch.from_numpy(ours)).numpy()
        ours[case.attention_mask == 0] = 0
        ref = _reference(case, "none", -1, True)
    else:
        ref = _reference(case, "none", layer, True, norm=False)
    _assert_rows_close(ours, ref, FP32_COS)


def test_clip_layer_0_is_token_plus_position_embeddings(cases, models):
    case = cases[("clip", "right")]
    weights = {k: v.detach().numpy() for k, v in models["clip"].state_dict().items()}
    token = next(v for k, v in weights.items() if k.endswith("token_embedding.weight"))
    position = next(v for k, v in weights.items() if k.endswith("position_embedding.weight"))
    by_hand = token[case.input_ids] + position[None, : case.input_ids.shape[1]]
    unmasked = case.encode(pooling="none", layer=0, use_attention_mask=False)
    np.testing.assert_allclose(unmasked, by_hand, rtol=0, atol=1e-6)
    masked = case.encode(pooling="none", layer=0)
    np.testing.assert_allclose(masked, np.where(case.attention_mask[..., None] == 1, by_hand, 0), rtol=0, atol=1e-6)


def test_final_layer_norm_on_a_model_without_one_is_refused(cases):
    case = cases[("bert", "right")]
    with pytest.raises(ConfigError, match="final_layer_norm"):
        case.encode(final_layer_norm=True)
    with pytest.raises(ConfigError, match="encoder.layer"):
        case.encode(layer=-4)


# -- half precision ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,side", [("bert", "right"), ("clip", "right"), ("gpt2", "left")])
def test_half_precision_compute_within_tolerance(name, side, dtype, cases, model_dirs):
    case = cases[(name, side)]
    half = load_encoder(model_dirs[name], dtype=dtype)
    for pooling, layer in [("mean", -1), ("last", -2), ("none", -1)]:
        ours = encode_rows(half, case.input_ids, case.attention_mask, case.token_type_ids,
                           EncodeOptions(pooling=pooling, layer=layer, dtype=dtype, output_dtype="float32"),
                           padding_side=side)
        ref = _reference(case, pooling, layer, True)
        _assert_rows_close(ours, ref, HALF_COS)


def test_model_dtype_must_match_options(cases):
    case = cases[("bert", "right")]
    with pytest.raises(ConfigError, match="encoder.dtype"):
        case.encode(dtype=torch.float16)


# -- a row does not depend on its batch ------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_shuffling_rows_or_changing_the_budget_changes_no_row(case, pooling):
    # Not bit-identical: a batch padded to another width sums attention over another number of (masked)
    # keys, and CPU kernels tile and vectorize by shape, so the float32 rounding differs. Measured: at
    # most ~5 ulps (1.25e-6 on values up to 3.7); the bound is 1e-6 of the largest magnitude, the scale
    # rounding errors follow. Repeating the same batching is bit-identical.
    base = case.encode(pooling=pooling, max_tokens_per_batch=16_384)
    np.testing.assert_array_equal(base, case.encode(pooling=pooling, max_tokens_per_batch=16_384))
    order = np.random.default_rng(0).permutation(len(TEXTS))
    tt = None if case.token_type_ids is None else case.token_type_ids[order]
    for budget in (1, 40, 96, 16_384):
        shuffled = encode_rows(case.model, case.input_ids[order], case.attention_mask[order], tt,
                               EncodeOptions(pooling=pooling, max_tokens_per_batch=budget),
                               padding_side=case.padding_side)
        _assert_same_up_to_rounding(shuffled, base[order])


def test_unpadded_rows_equal_stored_rows(cases):
    case = cases[("bert", "right")]
    lists = [ids[mask == 1] for ids, mask in zip(case.input_ids, case.attention_mask)]
    types = [t[mask == 1] for t, mask in zip(case.token_type_ids, case.attention_mask)]
    for pooling, use_mask in itertools.product(("mean", "none"), (True, False)):
        stored = case.encode(pooling=pooling)
        unpadded = encode_rows(case.model, lists, None, types,
                               EncodeOptions(pooling=pooling, use_attention_mask=use_mask, max_tokens_per_batch=64))
        longest = max(len(r) for r in lists)
        expect = stored[:, :longest] if pooling == "none" else stored
        _assert_same_up_to_rounding(unpadded, expect)


def test_wrong_padding_side_is_caught(cases):
    case = cases[("gpt2", "left")]
    with pytest.raises(ValueError, match="not right-padded"):
        encode_rows(case.model, case.input_ids, case.attention_mask, padding_side="right")


def test_normalize_gives_unit_rows(cases):
    case = cases[("bert", "right")]
    out = case.encode(normalize=True)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


# -- batch planning ---------------------------------------------------------------------------------------------


def test_plan_batches_sorts_stably_and_keeps_the_budget():
    lengths = np.array([5, 3, 9, 3, 120, 17, 3, 64, 0])
    batches = plan_batches(lengths, max_tokens_per_batch=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert flat.tolist() == np.argsort(lengths, kind="stable").tolist()
    # widths 8, 8, 8, 8, 8 | 16, 24 | 64 | 120 (longer than the budget: alone)
    assert [b.tolist() for b in batches] == [[8, 1, 3, 6, 0], [2, 5], [7], [4]]
    assert plan_batches(np.array([], dtype=np.int64), 64) == []


def test_plan_batches_caps_the_width():
    # CLIP rows of 75 tokens are computed at the stored 77, not at 80.
    batches = plan_batches(np.array([75, 75, 75]), max_tokens_per_batch=154, max_width=77)
    assert [len(b) for b in batches] == [2, 1]


# -- out of memory ----------------------------------------------------------------------------------------------


def test_out_of_memory_halves_the_batch(cases, model_dirs):
    model = load_encoder(model_dirs["bert"])  # its own copy: forward is patched below
    case = replace(cases[("bert", "right")], model=model)
    base = case.encode(pooling="mean")
    original, seen = model.forward, []

    def forward(*args, **kwargs):
        rows = len(kwargs["input_ids"])
        seen.append(rows)
        if rows > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    model.forward = forward
    out = case.encode(pooling="mean")
    assert seen == [12, 6, 3, 3, 6, 3, 3]  # one batch of 12 rows, halved until the halves fit
    _assert_same_up_to_rounding(out, base)

    model.forward = lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    with pytest.raises(torch.OutOfMemoryError):
        case.encode(pooling="mean")


def test_cuda_without_a_gpu_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="cuda"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="encoder.device"):
        resolve_device("tpu")


# -- output dtypes and Arrow ------------------------------------------------------------------------------------


def _ipc_round_trip(array: pa.Array, field: pa.Field) -> tuple[pa.ChunkedArray, pa.Field]:
    sink = io.BytesIO()
    schema = pa.schema([field])
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.record_batch([array], schema=schema))
    table = pa.ipc.open_stream(sink.getvalue()).read_all()
    return table.column(field.name), table.schema.field(field.name)


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_bfloat16_output_round_trips_bit_exactly_through_arrow(pooling, cases):
    case = cases[("clip", "right")]
    out = case.encode(pooling=pooling, output_dtype="bfloat16")
    assert out.dtype == np.uint16
    expect = torch.from_numpy(case.encode(pooling=pooling)).to(torch.bfloat16)
    assert np.array_equal(out, expect.view(torch.int16).numpy().view(np.uint16))

    seq_len = out.shape[1] if pooling == "none" else None
    field = embedding_arrow_field("embedding", 32, seq_len, "bfloat16")
    assert field.metadata == {b"embedpipe.dtype": b"bfloat16"}
    array = embeddings_to_arrow(out, field)
    leaf = array.flatten().flatten() if seq_len else array.flatten()
    assert leaf.buffers()[1].address == out.ctypes.data  # zero-copy from the numpy buffer
    column, read_field = _ipc_round_trip(array, field)
    tensor = arrow_to_tensor(column, read_field)
    assert tensor.dtype == torch.bfloat16 and tensor.shape == out.shape
    assert torch.equal(tensor.view(torch.int16), torch.from_numpy(out.view(np.int16)))


@pytest.mark.parametrize("output_dtype", ["float32", "float16"])
def test_float_outputs_round_trip_through_arrow(output_dtype, cases):
    case = cases[("bert", "right")]
    out = case.encode(pooling="none", output_dtype=output_dtype)
    assert out.dtype == np.dtype(output_dtype) and out.shape == (len(TEXTS), 48, 32)
    field = embedding_arrow_field("embedding", 32, 48, output_dtype)
    array = embeddings_to_arrow(out, field)
    assert array.type == pa.list_(pa.list_(getattr(pa, output_dtype)(), 32), 48)
    column, read_field = _ipc_round_trip(array, field)
    np.testing.assert_array_equal(arrow_to_tensor(column, read_field).numpy(), out)
    sliced = arrow_to_tensor(array.slice(3, 4), field)  # offsets of a sliced column are honoured
    np.testing.assert_array_equal(sliced.numpy(), out[3:7])


def test_arrow_shape_mismatch_is_refused():
    field = embedding_arrow_field("embedding", 32, None, "float32")
    with pytest.raises(ValueError, match="do not fit"):
        embeddings_to_arrow(np.zeros((2, 16), np.float32), field)
    with pytest.raises(ValueError, match="do not fit"):
        embeddings_to_arrow(np.zeros((2, 32), np.float16), field)


def test_count_nonfinite_per_row():
    out = np.zeros((3, 4), np.float32)
    out[1, 2], out[2, :2] = np.nan, np.inf
    assert count_nonfinite(out, "float32").tolist() == [0, 1, 2]
    bits = torch.from_numpy(out).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert count_nonfinite(bits, "bfloat16").tolist() == [0, 1, 2]
    with np.errstate(over="ignore"):
        big = np.array([[1e5, 1.0]], np.float32).astype(np.float16)  # float16 overflows past 65504
    assert count_nonfinite(big, "float16").tolist() == [1]


# -- the real MiniLM against sentence-transformers ---------------------------------------------------------------


MINILM_TEXTS = [
    *TEXTS[1:],
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "How do I reset my password?",
    "Quarterly revenue grew 12% year over year, driven by cloud services.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT id, name FROM users WHERE created_at > '2024-01-01';",
    "The mitochondria is the powerhouse of the cell.", "Paris is the capital of France.",
    "Il pleut des cordes ce matin à Lyon.", "Der schnelle braune Fuchs springt über den faulen Hund.",
    "¿Dónde está la biblioteca?", "東京タワーは高い。", "Москва — столица России.",
    "I absolutely loved this movie!!! 10/10 would watch again :)", "Terrible service. Never coming back.",
    "lorem ipsum dolor sit amet " * 80,  # truncated at 256 tokens
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The stock market crashed in 1929.", "Neural networks are universal function approximators.",
    "Please find the attached invoice for March.", "Breaking: heavy snow closes mountain passes.",
    "a", "?", "!!!", "123", "e = mc^2", "https://example.com/path?query=1&x=2",
    "   leading and trailing spaces   ", "UPPER CASE TEXT SHOUTING", "mixed CaSe WoRdS",
    "hyphen-ated words and under_scores", "email me at someone@example.org",
]


def test_minilm_mean_normalize_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    model_dir = resolve_model_dir("minilm")
    texts = MINILM_TEXTS[:50]
    assert len(texts) >= 48
    enc = _tokenize(str(model_dir), "right", 256, texts)
    model = load_encoder(model_dir)
    ours = encode_rows(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                       EncodeOptions(pooling="mean", normalize=True, max_tokens_per_batch=4096))
    reference = SentenceTransformer(str(model_dir), device="cpu").encode(texts, normalize_embeddings=True)
    cos = (ours * reference).sum(axis=1)
    assert cos.min() >= FP32_COS, cos.min()


# -- oneDNN packed linear layers (the CPU default of the embed stage) ------------------------------------------


@pytest.fixture(scope="session")
def packed_models(model_dirs) -> dict[str, torch.nn.Module]:
    packed = {}
    for name, path in model_dirs.items():
        packed[name] = load_encoder(path)
        assert pack_linear_layers(packed[name]) == {"bert": 13, "clip": 12, "gpt2": 8}[name]  # GPT-2: Conv1D too
    return packed


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear operators")
def test_mlp_activations_are_fused_where_onednn_computes_them_exactly(packed_models):
    """BERT's exact GELU and GPT-2's tanh GELU run as the first MLP layer's post-op (their activation module
    becomes an identity); CLIP's quick_gelu, which oneDNN has no post-op for, stays a module of its own.
    That the outputs are unchanged is test_packed_linear_layers_give_the_plain_forward_pass's to show."""
    fused = {name: [m.activation for m in model.modules() if isinstance(m, PackedLinear) and m.activation]
             for name, model in packed_models.items()}
    layers = {name: model.config.num_hidden_layers if name != "gpt2" else model.config.n_layer
              for name, model in packed_models.items()}
    assert fused == {"bert": ["gelu"] * layers["bert"], "gpt2": ["gelu_tanh"] * layers["gpt2"], "clip": []}
    assert all(isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity)
               for layer in packed_models["bert"].encoder.layer)
    assert all(type(layer.mlp.activation_fn).__name__ == "QuickGELUActivation"
               for layer in packed_models["clip"].encoder.layers)


@pytest.mark.parametrize("activation", [torch.nn.GELU(), torch.nn.GELU(approximate="tanh"), torch.nn.ReLU(),
                                        torch.nn.SiLU()], ids=["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear operators")
def test_a_fused_activation_equals_the_activation_after_the_layer(activation):
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 96)
    x = torch.randn(40, 48, generator=generator) * 3
    fused = PackedLinear(linear.weight, linear.bias, activation=fusable_activation(activation))
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), activation(linear(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear operators")
@pytest.mark.parametrize("pooling", POOLINGS)
def test_packed_linear_layers_give_the_plain_forward_pass(case, pooling, packed_models):
    model = packed_models[case.name]
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    for layer, use_mask in [(-1, True), (-2, True), (-1, False)]:
        ours = encode_rows(model, case.input_ids, case.attention_mask, case.token_type_ids,
                           EncodeOptions(pooling=pooling, layer=layer, use_attention_mask=use_mask,
                                         max_tokens_per_batch=96), padding_side=case.padding_side)
        # the reference is the unpacked model's forward pass of each row alone
        _assert_rows_close(ours, _reference(case, pooling, layer, use_mask), FP32_COS)
        _assert_same_up_to_rounding(ours, case.encode(pooling=pooling, layer=layer, use_attention_mask=use_mask,
                                                      max_tokens_per_batch=96))


@pytest.mark.parametrize("cpu_linear,packed", [("onednn", True), ("torch", False)])
def test_the_encoder_actor_packs_on_cpu_as_configured(model_dirs, cpu_linear, packed):
    spec = EmbedSpec(model_dir=model_dirs["bert"], options=EncodeOptions(), device="cpu", allow_pickle=False,
                     trust_remote_code=False, padding_side="right", seq_len=None, hidden_size=32, cpu_linear=cpu_linear)
    model = ShardEncoder(spec).model
    assert any(isinstance(m, PackedLinear) for m in model.modules()) == (packed and onednn_linear_available())
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules()) == (not packed or not onednn_linear_available())


def test_float16_linear_layers_are_not_packed(model_dirs):
    half = load_encoder(model_dirs["bert"], dtype=torch.float16)
    assert pack_linear_layers(half) == 0
    assert sum(isinstance(m, torch.nn.Linear) for m in half.modules()) == 13


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("pooling", ["mean", "cls", "none"])
def test_bfloat16_on_a_cpu_runs_packed_and_stays_close_to_float32(case, pooling, model_dirs):
    """``encoder.dtype: bfloat16`` on a CPU with AVX512-BF16: every linear layer on oneDNN's bfloat16 kernels,
    every row's cosine to the float32 forward of the row alone >= 0.999."""
    model = load_encoder(model_dirs[case.name], dtype=torch.bfloat16)
    assert pack_linear_layers(model) == {"bert": 13, "clip": 12, "gpt2": 8}[case.name]
    assert all(m.packed_weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, PackedLinear))
    ours = encode_rows(model, case.input_ids, case.attention_mask, case.token_type_ids,
                       EncodeOptions(pooling=pooling, dtype=torch.bfloat16, max_tokens_per_batch=96),
                       padding_side=case.padding_side)
    _assert_rows_close(ours, _reference(case, pooling, -1, True), 0.999)
