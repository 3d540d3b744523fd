"""An unpadded ("packed") forward pass: a batch's real tokens as one (T, d) sequence, attention kept per row.

A batch of B rows holding T real tokens in all is run as one sequence of T tokens with cumulative sequence
lengths ``cu_seqlens`` (B + 1, int32: row i is tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``), as TEI's
FlashBert and vLLM's encoder path do. Every linear layer, LayerNorm and MLP then runs on real tokens only;
only attention needs to know where rows begin and end:

- on CUDA in half precision, torch's variable-length flash kernel (``torch.nn.attention.varlen.varlen_attn``,
  causal for CLIP and GPT-2 through ``window_size=(-1, 0)``);
- elsewhere, one ``scaled_dot_product_attention`` call per row over its slice of the packed q, k, v: the
  fastest exact choice measured on the CPU. At MiniLM's shapes (15 rows of 20-256 tokens, 2,203 tokens,
  12 heads x 32, one thread) a layer's attention took 25 ms row by row, 62 ms padded to the longest row
  with a key mask, and 350 ms with a block-diagonal boolean mask over all T x T scores; nested (jagged)
  tensors have no CPU SDPA kernel under inference mode nor a causal one.

The layers are the loaded Hugging Face modules themselves (called, never their weights read), so a model
whose linear layers :func:`pipeline.encode.cpu_linear.pack_linear_layers` replaced runs the same way.
What a layer index and the final norm mean is :mod:`pipeline.encode.forward`'s (layer 0 the embeddings).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from pipeline.encode.models import FAMILIES, final_norm


class Segments(NamedTuple):
    """Where each row lies in the packed sequence."""

    cu_seqlens: torch.Tensor  # (B + 1,) int32, on the tokens' device
    bounds: tuple[int, ...]  # the same offsets as Python ints (per-row slicing needs them on the host)
    max_seqlen: int


# (q, k, v as (T, heads, head_dim), segments, causal, scale) -> (T, heads, head_dim)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Segments, bool, float], torch.Tensor]

_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")  # both compute softmax(q k^T * scale) v exactly


def packed_family(model: torch.nn.Module) -> tuple[str | None, str]:
    """The family whose packed forward fits ``model`` ("bert", "clip" or "gpt2"), or None, and why.

    Only the transformers classes embedpipe loads are packed, in configurations whose attention this
    module reproduces; anything else (another architecture, a class from remote code, a decoder or
    cross-attending BERT, another attention implementation, float32 on CUDA, where the flash kernel
    does not run) is left to the padded forward.
    """
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        return None, f"model type {getattr(config, 'model_type', None)!r} has no packed forward"
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # the module attributes read here are transformers 5's
        return None, f"written against transformers 5's modules, not {transformers.__version__}"
    cls = type(model)
    if cls.__name__ != family.class_name or not cls.__module__.startswith("transformers.models."):
        return None, f"{cls.__module__}.{cls.__name__} is not transformers' {family.class_name}"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _ATTENTION_IMPLEMENTATIONS:
        return None, f"attention implementation {implementation!r} is not one of {', '.join(_ATTENTION_IMPLEMENTATIONS)}"
    if family.name == "bert" and (config.is_decoder or config.add_cross_attention):
        return None, "a BERT configured as a decoder or with cross-attention"
    if family.name == "gpt2" and config.reorder_and_upcast_attn and implementation == "eager":
        return None, "GPT-2 with reorder_and_upcast_attn under eager attention"
    param = next(model.parameters())
    if param.device.type == "cuda":
        if param.dtype not in (torch.float16, torch.bfloat16):
            return None, f"the CUDA variable-length kernel runs float16/bfloat16, not {param.dtype}"
        if not varlen_available():
            return None, f"torch {torch.__version__} has no usable variable-length flash attention on this GPU"
        head_dim = config.hidden_size // config.num_attention_heads
        if head_dim % 8 or head_dim > 256:  # what the flash kernel takes
            return None, f"the flash kernel takes head sizes of multiples of 8 up to 256, not {head_dim}"
    elif param.device.type != "cpu":
        return None, f"no packed attention for device {param.device.type!r}"
    return family.name, ""


def segments(lengths: torch.Tensor) -> Segments:
    """The segments of rows of ``lengths`` (B,) tokens each (zero-length rows allowed)."""
    host = lengths.detach().to("cpu", torch.int64)
    bounds = [0, *torch.cumsum(host, 0).tolist()]
    cu = torch.tensor(bounds, dtype=torch.int32).to(lengths.device)
    return Segments(cu, tuple(bounds), int(host.max()) if len(host) else 0)


def segments_of(cu_seqlens: torch.Tensor) -> Segments:
    """The segments given by cumulative lengths (B + 1,)."""
    bounds = tuple(cu_seqlens.detach().to("cpu", torch.int64).tolist())
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    return Segments(cu_seqlens.to(torch.int32), bounds, max(lengths, default=0))


# -- attention -------------------------------------------------------------------------------------------------


def rowwise_attention(q, k, v, seqs: Segments, causal: bool, scale: float) -> torch.Tensor:
    """Exact attention restricted to each row: one SDPA call per row, over the row's slice."""
    out = torch.empty_like(q)
    for start, end in itertools.pairwise(seqs.bounds):
        if end == start:
            continue
        # (n, heads, head_dim) -> (1, heads, n, head_dim): given 3-D inputs, the CPU SDPA took a math path
        # 20-60x slower than its flash kernel for 4-D ones (measured: 32 ms against 0.5 ms at 150 x 12 x 32).
        rq, rk, rv = (t[None, start:end].transpose(1, 2) for t in (q, k, v))
        row = F.scaled_dot_product_attention(rq, rk, rv, is_causal=causal, scale=scale)
        out[start:end] = row[0].transpose(0, 1)
    return out


def _varlen_kernel() -> Callable[..., torch.Tensor]:
    # Looked up at call time, so that tests can put a recorder in its place.
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def varlen_available() -> bool:
    """Whether torch's variable-length flash attention can run here (torch >= 2.11, a CUDA GPU of sm80 or newer)."""
    # The first varlen_attn (torch 2.9) took is_causal and no scale; the keyword-only scale and window_size used
    # here are in 2.12's documentation and 2.13's source. 2.11 is the oldest release this was written against.
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 11):
        return False
    return (torch.cuda.is_available() and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability() >= (8, 0))


def varlen_attention(q, k, v, seqs: Segments, causal: bool, scale: float) -> torch.Tensor:
    """Attention restricted to each row by the variable-length flash kernel (CUDA, float16/bfloat16)."""
    window = (-1, 0) if causal else (-1, -1)  # varlen_attn's spelling of causal / full attention
    return _varlen_kernel()(q.contiguous(), k.contiguous(), v.contiguous(), seqs.cu_seqlens, seqs.cu_seqlens,
                            seqs.max_seqlen, seqs.max_seqlen, scale=scale, window_size=window)


def default_attention(device: torch.device) -> Attention:
    """The attention a packed forward uses on ``device``."""
    return varlen_attention if device.type == "cuda" else rowwise_attention


# -- the families' layers ----------------------------------------------------------------------------------------


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1] // head_dim, head_dim)  # not -1: a batch may hold no tokens at all


def _bert_embeddings(model, ids, positions, type_ids):
    # BertEmbeddings itself: word + token type + position embeddings, then its LayerNorm. It takes (batch, seq).
    return model.embeddings(input_ids=ids[None], token_type_ids=None if type_ids is None else type_ids[None],
                            position_ids=positions[None])[0]


def _bert_layer(layer, x, seqs: Segments, attend: Attention) -> torch.Tensor:
    self_attn = layer.attention.self
    head_dim = self_attn.attention_head_size
    q, k, v = (_heads(proj(x), head_dim) for proj in (self_attn.query, self_attn.key, self_attn.value))
    context = attend(q, k, v, seqs, False, self_attn.scaling).flatten(1)
    x = layer.attention.output(context, x)  # dense, residual, LayerNorm
    return layer.output(layer.intermediate(x), x)  # MLP, residual, LayerNorm


def _clip_modules(model):
    return getattr(model, "text_model", model)  # transformers 4.x nests CLIP's modules under .text_model


def _clip_embeddings(model, ids, positions, _type_ids):
    # Not CLIPTextEmbeddings.forward, which refuses a sequence (here: the whole packed batch) over 77 tokens.
    emb = _clip_modules(model).embeddings
    return emb.token_embedding(ids) + emb.position_embedding(positions)


def _clip_layer(layer, x, seqs: Segments, attend: Attention) -> torch.Tensor:
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    q, k, v = (_heads(proj(h), attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    x = x + attn.out_proj(attend(q, k, v, seqs, True, attn.scale).flatten(1))
    return x + layer.mlp(layer.layer_norm2(x))


def _gpt2_embeddings(model, ids, positions, _type_ids):
    return model.drop(model.wte(ids) + model.wpe(positions))


def _gpt2_layer(block, x, seqs: Segments, attend: Attention) -> torch.Tensor:
    attn = block.attn
    q, k, v = (_heads(t, attn.head_dim) for t in attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=-1))
    x = x + attn.resid_dropout(attn.c_proj(attend(q, k, v, seqs, True, attn.scaling).flatten(1)))
    return x + block.mlp(block.ln_2(x))


class _Family(NamedTuple):
    embeddings: Callable
    layers: Callable[[torch.nn.Module], torch.nn.ModuleList]
    layer: Callable


_FAMILIES = {
    "bert": _Family(_bert_embeddings, lambda m: m.encoder.layer, _bert_layer),
    "clip": _Family(_clip_embeddings, lambda m: _clip_modules(m).encoder.layers, _clip_layer),
    "gpt2": _Family(_gpt2_embeddings, lambda m: m.h, _gpt2_layer),
}


def packed_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | Segments,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    layer: int,
    apply_norm: bool,
    *,
    attention: Attention | None = None,
) -> torch.Tensor:
    """(T, D) hidden states of the packed rows at ``layer`` (0 the embeddings, -1 the last layer).

    Args:
        model: a model :func:`packed_family` accepts.
        input_ids: (T,) the rows' real tokens, concatenated.
        cu_seqlens: (B + 1,) int32 cumulative row lengths (or their :class:`Segments`).
        position_ids: (T,) positions, restarting at 0 for every row.
        token_type_ids: (T,) for BERT; None for zeros.
        layer: as ``encoder.layer``: -1 the last, -2 the penultimate, 0 the embedding output.
        apply_norm: apply the final norm (CLIP ``final_layer_norm``, GPT-2 ``ln_f``) to the chosen layer.
        attention: the per-row attention; by default the one for the tokens' device.

    Raises:
        ValueError: the model has no packed forward (see :func:`packed_family`), or a layer out of range.
    """
    name, why = packed_family(model)
    if name is None:
        raise ValueError(f"no packed forward: {why}")
    family = _FAMILIES[name]
    layers = family.layers(model)
    depth = layer if layer >= 0 else len(layers) + 1 + layer
    if not 0 <= depth <= len(layers):
        raise ValueError(f"layer {layer} is out of range for a model with {len(layers)} layers")
    seqs = cu_seqlens if isinstance(cu_seqlens, Segments) else segments_of(cu_seqlens)
    attend = attention or default_attention(input_ids.device)
    x = family.embeddings(model, input_ids, position_ids, token_type_ids)
    for block in layers[:depth]:
        x = family.layer(block, x, seqs, attend)
    if apply_norm:
        norm = final_norm(model)
        if norm is None:
            raise ValueError(f"a {model.config.model_type} model has no final layer norm")
        x = norm(x)
    return x


def pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: Literal["mean", "cls", "last"]
                ) -> torch.Tensor:
    """Pool (T, D) packed hidden states over each row's segment to (B, D); a row with no tokens pools to zeros."""
    cu = cu_seqlens.to(hidden.device, torch.int64)
    lengths = cu[1:] - cu[:-1]
    empty = (lengths == 0)[:, None]
    if pooling == "mean":
        row_of = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        summed = hidden.new_zeros(len(lengths), hidden.shape[1]).index_add_(0, row_of, hidden)
        return summed / lengths.clamp(min=1)[:, None].to(hidden.dtype)
    if pooling == "cls":
        position = cu[:-1]
    elif pooling == "last":
        position = cu[1:] - 1
    else:
        raise ValueError(f"pooling {pooling!r} does not reduce over positions")
    picked = hidden[position.clamp(0, max(len(hidden) - 1, 0))] if len(hidden) else hidden.new_zeros(
        len(lengths), hidden.shape[1])
    return picked.masked_fill(empty, 0.0)
