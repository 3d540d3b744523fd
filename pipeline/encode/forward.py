"""Token rows in, embeddings out: batching by token budget, the forward pass, pooling and output dtypes.

What a row's embedding is (DESIGN.md "Encoding semantics"):

- With ``use_attention_mask`` (the default) a row's embedding is that of a plain forward pass of the
  row's real tokens alone. Rows are sorted by length and cut into batches of at most
  ``max_tokens_per_batch`` padded tokens; each batch is computed at its own longest row rounded up to
  a multiple of 8, never over the stored padding. Left-padded rows get position ids counted from
  their first real token (as Hugging Face generation does), so neither the padding side nor the
  batch's width moves a row's positions.
- Without the mask (Stable Diffusion 1.x runs CLIP this way) the model sees the stored row as it is,
  padding included, with default positions; every batch is then computed at the full stored width.
- Pooling always reads the stored mask to know which tokens are real: ``mean`` averages them,
  ``cls`` takes the first, ``last`` the last (right or left padding). ``none`` keeps every position:
  padded positions hold zeros when the mask is used (a batch is not computed out to the stored width,
  and a left pad has nothing to attend to), and the computed hidden states of the pad tokens when it
  is not. ``max`` and ``weightedmean`` are sentence-transformers' (see :func:`pool`).
- A sentence-transformers model's head runs after pooling (:func:`_head`; settings from
  :mod:`pipeline.tokenize.st_config`): its Dense layers, then ``truncate_dim``, then the L2 normalization;
  with ``include_prompt: false`` the prompt's first tokens are left out of pooling.
- ``layer``: -1 the last layer, -2 the penultimate ("clip skip"), 0 the embedding layer's output
  (for CLIP and GPT-2 token plus position embeddings). ``final_layer_norm`` applies the norm that
  CLIP (``final_layer_norm``) and GPT-2 (``ln_f``) run after their last layer. Default (``None``):
  applied to the output of any transformer layer, not to layer 0. So layer -1 is the model's
  ``last_hidden_state`` (what SD 1.x feeds its UNet), and layer -2 is
  ``final_layer_norm(hidden_states[-2])``: diffusers' ``clip_skip=1``, the "CLIP skip: 2" of the
  popular UIs. ``final_layer_norm: false`` with layer -2 gives the raw penultimate layer, which is
  what SDXL uses. BERT has no final norm (each layer ends in its own LayerNorm).
- Unpadded rows (a list of 1-D arrays, from ``padding: none``) are all real tokens; the padding
  embedpipe adds to batch them is always masked, whatever ``use_attention_mask`` says.
- A row with no real token (an empty text without special tokens) embeds as zeros.
- ``packed``: with the mask, a batch runs as its rows' real tokens concatenated, attention kept within
  each row (:mod:`pipeline.encode.packed`); the same embeddings, without computing the padding. A model
  the packed forward does not cover runs padded, and the log says why, once.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.encode.device import DeviceSteps, device_steps, prefetch_to_device
from pipeline.encode.models import family_of, final_norm, num_layers, position_limit
from pipeline.encode.packed import packed_family, packed_hidden_states, pool_packed, segments
from pipeline.errors import ConfigError
from pipeline.output.embedding_format import FLOAT_DTYPES, NUMPY_DTYPES, OutputDtype
from pipeline.tokenize.st_config import ACTIVATIONS, DenseLayer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pipeline.config import EncoderConfig
    from pipeline.tokenize.st_config import EncoderSettings

Pooling = Literal["mean", "cls", "last", "max", "weightedmean", "none"]
POOLINGS = ("mean", "cls", "last", "max", "weightedmean", "none")
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Padded tokens per forward pass when encoder.max_tokens_per_batch is unset. On CPU a 16k-token
# batch of MiniLM ran ~10% slower per token than 2k-token batches (measured on 2 cores). A GPU needs
# big forwards to be busy: 64k tokens (an out-of-memory error halves it, see encode_rows).
DEFAULT_TOKENS_PER_BATCH = {"cuda": 65_536, "cpu": 2_048}
WIDTH_MULTIPLE = 8  # batch widths rounded up to a multiple of 8 suit tensor-core tiles
log = logging.getLogger("embedpipe")


@dataclass(frozen=True)
class EncodeOptions:
    """How token rows become embeddings (the ``encoder`` config section minus model and device)."""

    pooling: Pooling = "mean"
    layer: int = -1
    final_layer_norm: bool | None = None
    normalize: bool = False
    use_attention_mask: bool = True
    dtype: torch.dtype = torch.float32
    output_dtype: OutputDtype = "float32"
    max_tokens_per_batch: int = 16_384
    packed: bool = False  # run batches unpadded where the model allows (see pipeline.encode.packed)
    # A sentence-transformers model's head, after pooling (pipeline.tokenize.st_config): Dense projections,
    # then the first truncate_dim dimensions (Matryoshka), then normalize. prompt_tokens: the first real
    # tokens of each row left out of pooling (include_prompt false); 0: none.
    dense: tuple[DenseLayer, ...] = ()
    truncate_dim: int | None = None
    prompt_tokens: int = 0

    @classmethod
    def from_config(cls, encoder: EncoderConfig, device: str = "cuda", settings: EncoderSettings | None = None,
                    prompt_tokens: int = 0) -> EncodeOptions:
        """The options of a validated ``encoder`` config section, for ``device`` ("cpu" or "cuda").

        ``settings``: the section resolved against the model (pooling, normalize, Dense layers, include_prompt);
        without them ``auto`` means mean / false. ``prompt_tokens``: the prompt's length in tokens (used when
        the model's pooling leaves the prompt out).
        """
        pooling = settings.pooling if settings else ("mean" if encoder.pooling == "auto" else encoder.pooling)
        normalize = settings.normalize if settings else encoder.normalize is True
        excluded = prompt_tokens if settings and not settings.include_prompt else 0
        return cls(
            pooling=pooling, layer=encoder.layer, final_layer_norm=encoder.final_layer_norm,
            normalize=normalize, use_attention_mask=encoder.use_attention_mask,
            dtype=TORCH_DTYPES[resolve_dtype(encoder.dtype, device)],
            # Quantized outputs leave here as float32: the shard's commit quantizes them with the job's ranges.
            output_dtype=encoder.output_dtype if encoder.output_dtype in FLOAT_DTYPES else "float32",
            max_tokens_per_batch=encoder.max_tokens_per_batch or DEFAULT_TOKENS_PER_BATCH[device],
            packed=encoder.packed, dense=settings.dense if settings else (), truncate_dim=encoder.truncate_dim,
            prompt_tokens=excluded,
        )

    def output_dim(self, hidden_size: int) -> int:
        """D of the stored vectors for a model of ``hidden_size``: after the Dense layers and truncate_dim."""
        dim = self.dense[-1].out_features if self.dense and self.pooling != "none" else hidden_size
        return min(dim, self.truncate_dim) if self.truncate_dim else dim


def resolve_dtype(dtype: str, device: str) -> str:
    """``encoder.dtype`` for ``device``: ``auto`` is bfloat16 on a GPU and float32 on a CPU."""
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


def compute_lengths(input_ids, attention_mask, token_type_ids, options: EncodeOptions, *,
                    padding_side: str = "right") -> np.ndarray:
    """Per row, the tokens :func:`encode_rows` computes for it: the real tokens, or the stored width
    when the model sees the padding (``use_attention_mask`` off). The length order of batches and pieces."""
    return _Rows(input_ids, attention_mask, token_type_ids, padding_side,
                 full_width=not options.use_attention_mask).compute_lengths()


@dataclass(frozen=True)
class _Forward:
    """The options resolved against one model."""

    layer: int  # index into hidden_states: 0 = embeddings, num_layers = last layer
    last: int
    norm: torch.nn.Module | None  # the final norm, if the model has one
    apply_norm: bool
    token_type_ids: bool
    options: EncodeOptions
    packed: str | None = None  # the family whose packed forward runs the batches; None: padded


def _resolve(model: torch.nn.Module, options: EncodeOptions) -> _Forward:
    check_options(model, options)
    last = num_layers(model)
    layer = options.layer if options.layer >= 0 else last + 1 + options.layer
    norm = final_norm(model)
    apply_norm = options.final_layer_norm if options.final_layer_norm is not None else (layer > 0 and norm is not None)
    return _Forward(layer, last, norm, apply_norm, family_of(model).token_type_ids, options,
                    _packed_family(model, options))


def _packed_family(model: torch.nn.Module, options: EncodeOptions) -> str | None:
    """The family to run packed, when asked and possible; otherwise None, and the log says why (once)."""
    if not options.packed:
        return None
    if not options.use_attention_mask:
        _log_padded("encoder.use_attention_mask is off, so the model must see the stored padding")
        return None
    family, why = packed_family(model)
    if family is None:
        _log_padded(why)
    return family


@functools.cache
def _log_padded(why: str) -> None:
    log.info("encoder.packed: batches run padded: %s", why)


def check_options(model: torch.nn.Module, options: EncodeOptions) -> None:
    """Check the options against the loaded model, before any work.

    Raises:
        ConfigError: an unknown pooling or output dtype, a layer the model does not have, a final layer norm
            the model does not have, a non-positive token budget, or a model loaded in another dtype.
    """
    if options.pooling not in POOLINGS:
        raise ConfigError(f"encoder.pooling: {options.pooling!r} is not one of {', '.join(POOLINGS)}")
    check_head(options, int(model.config.hidden_size))
    if options.output_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"encoder.output_dtype: {options.output_dtype!r} is not one of {', '.join(FLOAT_DTYPES)} "
                          "(quantized dtypes are applied when a shard is committed)")
    if options.max_tokens_per_batch <= 0:
        raise ConfigError(f"encoder.max_tokens_per_batch: must be positive, got {options.max_tokens_per_batch}")
    layers = num_layers(model)
    if not -(layers + 1) <= options.layer <= layers:
        raise ConfigError(
            f"encoder.layer: {options.layer} is out of range for a model with {layers} layers "
            f"(allowed {-(layers + 1)}..{layers}; -1 is the last layer, 0 the embeddings)"
        )
    if options.final_layer_norm and final_norm(model) is None:
        raise ConfigError(f"encoder.final_layer_norm: a {model.config.model_type} model has no final layer norm")
    model_dtype = next(model.parameters()).dtype
    if model_dtype != options.dtype:
        raise ConfigError(f"encoder.dtype: the model was loaded as {model_dtype}, the options ask for {options.dtype}")


def check_head(options: EncodeOptions, hidden_size: int) -> None:
    """Check the Dense layers and truncate_dim against the model's hidden size.

    Raises:
        ConfigError: a Dense layer's input does not fit the vector before it; truncate_dim with per-token
            output, or larger than the vector.
    """
    dim = hidden_size
    for layer in options.dense if options.pooling != "none" else ():
        if layer.in_features != dim:
            raise ConfigError(f"encoder.model: its Dense layer {layer.weights} takes {layer.in_features} inputs, "
                              f"but the vector before it has {dim}")
        dim = layer.out_features
    if options.truncate_dim is not None:
        if options.pooling == "none":
            raise ConfigError("encoder.truncate_dim: applies to pooled vectors, not to pooling 'none'")
        if options.truncate_dim > dim:
            raise ConfigError(f"encoder.truncate_dim: {options.truncate_dim} is more than the {dim} dimensions "
                              "of the model's vectors")


def padded_width(length: int, multiple: int = WIDTH_MULTIPLE, max_width: int | None = None) -> int:
    """A batch's width for its longest row: rounded up to ``multiple``, capped at ``max_width`` (never below it)."""
    width = -(-max(length, 1) // multiple) * multiple
    return width if max_width is None else max(length, min(width, max_width))


# A batch moves on to the next padded width once it holds this many rows: narrower batches waste
# less padding, and past a few dozen rows a bigger batch barely speeds up a forward pass.
MIN_ROWS_BEFORE_WIDER = 32


def plan_batches(
    lengths: np.ndarray, max_tokens_per_batch: int, multiple: int = WIDTH_MULTIPLE, max_width: int | None = None,
    min_rows_before_wider: int = MIN_ROWS_BEFORE_WIDER,
) -> list[np.ndarray]:
    """Cut rows into batches of at most ``max_tokens_per_batch`` padded tokens, shortest rows first.

    Rows are sorted by length (stably: ties keep their row order). A batch grows while
    ``rows * padded_width(longest)`` stays within the budget, and stops at a wider padded width once
    it holds ``min_rows_before_wider`` rows, so that short rows are not padded to their longer
    neighbours' width. A row too long for the budget alone gets a batch of its own. Returns the row
    indices of each batch.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, start, batch_width = [], 0, 0
    for i, row in enumerate(order):
        width = padded_width(int(lengths[row]), multiple, max_width)
        rows = i - start
        over_budget = rows and (rows + 1) * width > max_tokens_per_batch
        wider = rows >= min_rows_before_wider and width > batch_width
        if over_budget or wider:
            batches.append(order[start:i])
            start = i
        batch_width = width
    if len(order):
        batches.append(order[start:])
    return batches


def plan_packed_batches(lengths: np.ndarray, max_tokens_per_batch: int) -> list[np.ndarray]:
    """Cut rows into batches of at most ``max_tokens_per_batch`` real tokens, shortest rows first: the
    budget of the packed forward, which computes no padding (a row too long alone gets its own batch)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    ends = np.cumsum(np.asarray(lengths)[order])
    batches, start, used = [], 0, 0
    for i in range(len(order)):
        if i > start and ends[i] - used > max_tokens_per_batch:
            batches.append(order[start:i])
            start, used = i, int(ends[i - 1])
    if len(order):
        batches.append(order[start:])
    return batches


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray], multiple: int = WIDTH_MULTIPLE,
                  max_width: int | None = None) -> float:
    """Computed tokens / real tokens for a batch plan (1.0: no padding computed)."""
    computed = sum(len(b) * padded_width(int(lengths[b].max()), multiple, max_width) for b in batches if len(b))
    return computed / max(int(np.asarray(lengths).sum()), 1)


class _Rows:
    """Token rows as stored: an (N, L) matrix with its mask, or a list of unpadded 1-D rows."""

    def __init__(self, input_ids, attention_mask, token_type_ids, padding_side: str, full_width: bool) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        self.padded = isinstance(input_ids, np.ndarray) and input_ids.ndim == 2
        if not self.padded and attention_mask is not None:
            raise ValueError("unpadded rows (a list of 1-D arrays) take no attention_mask: every token is real")
        self.ids, self.mask, self.type_ids = input_ids, attention_mask, token_type_ids
        self.left = self.padded and padding_side == "left"
        if self.padded:
            self.width = input_ids.shape[1]
            n = len(input_ids)
            self.lengths = (np.full(n, self.width) if attention_mask is None
                            else attention_mask.sum(axis=1, dtype=np.int64))
            if attention_mask is not None:
                self._check_padding_side()
        else:
            self.lengths = np.array([len(row) for row in input_ids], dtype=np.int64)
            self.width = int(self.lengths.max(initial=0))
        # Without the mask the model must see the stored padding, so every batch spans the stored width.
        self.full_width = full_width and self.padded

    def _check_padding_side(self) -> None:
        # Batches are cut out of the real-token side: a mask padded on the other side would lose tokens.
        positions = np.arange(self.width)
        if self.left:
            expected = positions >= self.width - self.lengths[:, None]
        else:
            expected = positions < self.lengths[:, None]
        bad = np.flatnonzero((self.mask.astype(bool) != expected).any(axis=1))
        if len(bad):
            side = "left" if self.left else "right"
            raise ValueError(f"row {bad[0]}: its attention mask is not {side}-padded (real tokens then padding "
                             f"on the {side}); is padding_side right?")

    def compute_lengths(self) -> np.ndarray:
        return np.full(len(self.lengths), self.width) if self.full_width else self.lengths

    def gather(self, rows: np.ndarray, width: int) -> dict[str, torch.Tensor]:
        """The rows' ids, mask and type ids at ``width`` columns (int64, as embedding lookups need)."""
        if not self.padded:
            return self._gather_unpadded(rows, width)
        cols = slice(self.width - width, None) if self.left else slice(0, width)
        batch = {"input_ids": self.ids[rows, cols]}
        batch["mask"] = np.ones_like(batch["input_ids"]) if self.mask is None else self.mask[rows, cols]
        if self.type_ids is not None:
            batch["token_type_ids"] = self.type_ids[rows, cols]
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in batch.items()}

    def _gather_unpadded(self, rows: np.ndarray, width: int) -> dict[str, torch.Tensor]:
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        type_ids = None if self.type_ids is None else np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            n = self.lengths[row]
            ids[i, :n], mask[i, :n] = self.ids[row], 1
            if type_ids is not None:
                type_ids[i, :n] = self.type_ids[row]
        batch = {"input_ids": ids, "mask": mask} | ({} if type_ids is None else {"token_type_ids": type_ids})
        return {k: torch.from_numpy(v) for k, v in batch.items()}


def encode_rows(
    model: torch.nn.Module,
    input_ids: np.ndarray | Sequence[np.ndarray],
    attention_mask: np.ndarray | None = None,
    token_type_ids: np.ndarray | Sequence[np.ndarray] | None = None,
    options: EncodeOptions = EncodeOptions(),
    *,
    padding_side: Literal["right", "left"] = "right",
    device: torch.device | str | None = None,
    steps: DeviceSteps | None = None,
    backoff: Backoff | None = None,
    counts: dict[str, int] | None = None,
) -> np.ndarray:
    """Embed token rows, in their original order.

    Args:
        model: an encoder from :func:`pipeline.encode.models.load_encoder`, already on ``device``.
        input_ids: an (N, L) matrix of stored rows, or a list of N unpadded 1-D rows.
        attention_mask: (N, L), 1 for real tokens; None when every token is real (and for unpadded rows).
        token_type_ids: like ``input_ids``; used by BERT-family models only.
        options: pooling, layer, dtypes and token budget.
        padding_side: the side the stored rows are padded on.
        device: where to compute; by default the model's device.
        steps: the device steps (tests pass a recording one); by default those of ``device``.
        backoff: out-of-memory halvings to start from and add to (kept across the pieces of a shard).
        counts: if given, ``forwards`` and ``computed_tokens`` (positions computed, padding included) are
            added to it as the batches run: the padding waste a run really had.

    Returns:
        (N, D) for pooled output, or (N, L, D) for pooling ``none`` (L the stored width; for unpadded rows
        the longest row), of the numpy dtype for ``options.output_dtype`` (bfloat16 as uint16 bit patterns).

    Raises:
        ConfigError: the options do not fit the model (see :func:`check_options`).
        torch.OutOfMemoryError: a single row does not fit on the device.
    """
    forward = _resolve(model, options)
    rows = _Rows(input_ids, attention_mask, token_type_ids, padding_side,
                 full_width=not options.use_attention_mask)
    cap = min(rows.width, position_limit(model)) if rows.padded else position_limit(model)
    lengths = rows.compute_lengths()
    dim = options.output_dim(int(model.config.hidden_size))
    shape = (len(lengths), rows.width, dim) if options.pooling == "none" else (len(lengths), dim)
    out = np.zeros(shape, dtype=NUMPY_DTYPES[options.output_dtype])
    device = torch.device(device) if device is not None else next(model.parameters()).device
    steps = steps or device_steps(device)
    backoff = backoff or Backoff()

    packed = forward.packed is not None and not rows.full_width
    plan = (plan_packed_batches(lengths, options.max_tokens_per_batch) if packed
            else plan_batches(lengths, options.max_tokens_per_batch, WIDTH_MULTIPLE, cap))

    def host_batches():
        for batch_rows in plan:
            width = padded_width(int(lengths[batch_rows].max()), WIDTH_MULTIPLE, cap)
            yield batch_rows, rows.gather(batch_rows, width)

    parts: list[tuple[np.ndarray, torch.Tensor]] = []  # (rows, outputs on the device), in computed order
    with torch.inference_mode():
        for batch_rows, batch in prefetch_to_device(host_batches(), steps):
            for part_rows, part in _split(batch_rows, batch, backoff.splits):
                embeddings = _encode_with_backoff(model, part, forward, rows, steps, backoff)
                if counts is not None:
                    counts["forwards"] = counts.get("forwards", 0) + 1
                    # From host-side numbers: summing the device mask would wait on the GPU every batch.
                    computed = (int(lengths[part_rows].sum()) if packed
                                else part["input_ids"].numel())  # packed: the real tokens only
                    counts["computed_tokens"] = counts.get("computed_tokens", 0) + computed
                stored = embeddings.to(TORCH_DTYPES[options.output_dtype])
                parts.append((part_rows, _stored_width(stored, out, rows.left)))
        _copy_back(parts, out, steps, options.output_dtype)
    return out


class Backoff:
    """How often a batch has been halved after running out of device memory: later batches of the same
    shard are cut as small up front, instead of failing and halving again each time."""

    def __init__(self) -> None:
        self.splits = 0


def _split(rows: np.ndarray, batch: dict[str, torch.Tensor], times: int):
    """A batch cut into 2**times row-parts (fewer when it has fewer rows)."""
    parts = min(2 ** times, len(rows)) if len(rows) else 1
    bounds = np.linspace(0, len(rows), parts + 1).astype(int)
    for lo, hi in itertools.pairwise(bounds):
        yield rows[lo:hi], {k: v[lo:hi] for k, v in batch.items()}


def _stored_width(embeddings: torch.Tensor, out: np.ndarray, left: bool) -> torch.Tensor:
    """Per-token outputs padded (or cut, for unpadded rows batched wider) to the stored width, on the device;
    pooled outputs as they are."""
    if out.ndim == 2:
        return embeddings
    width, stored = embeddings.shape[1], out.shape[1]
    if width >= stored:
        return embeddings[:, width - stored:] if left else embeddings[:, :stored]
    pad = (0, 0, stored - width, 0) if left else (0, 0, 0, stored - width)
    return F.pad(embeddings, pad)


def _copy_back(parts: list[tuple[np.ndarray, torch.Tensor]], out: np.ndarray, steps: DeviceSteps,
               output_dtype: OutputDtype) -> None:
    """Bring every batch's outputs to the host in one copy and put each row in its place; when the
    concatenation or the copy runs out of device memory, in two halves (and so on, down to one batch)."""
    if not parts:
        return
    try:
        host = to_output(steps.to_host(steps.concat([t for _, t in parts])), output_dtype)
    except torch.OutOfMemoryError:
        if len(parts) == 1:
            raise
        host = None
    if host is not None:
        out[np.concatenate([r for r, _ in parts])] = host
        return
    steps.release_after_oom()
    half = len(parts) // 2
    _copy_back(parts[:half], out, steps, output_dtype)
    _copy_back(parts[half:], out, steps, output_dtype)


def _encode_with_backoff(model, batch: dict[str, torch.Tensor], forward: _Forward, rows: _Rows,
                         steps: DeviceSteps, backoff: Backoff) -> torch.Tensor:
    """Encode a device batch; on out-of-memory split it in two halves by rows and retry, down to one row,
    and remember the halving for the batches that follow."""
    try:
        return _encode_batch(model, batch, forward, rows)
    except torch.OutOfMemoryError:
        if len(batch["input_ids"]) == 1:
            raise
    # Retry outside the except block, so the failed attempt's frames (and their tensors) are released first.
    steps.release_after_oom()
    backoff.splits += 1
    half = len(batch["input_ids"]) // 2
    halves = ({k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()})
    return torch.cat([_encode_with_backoff(model, part, forward, rows, steps, backoff) for part in halves])


def _encode_batch(model, batch: dict[str, torch.Tensor], forward: _Forward, rows: _Rows) -> torch.Tensor:
    options, full_width = forward.options, rows.full_width
    if forward.packed is not None and not full_width:
        return _head(_encode_packed(model, batch, forward), options)
    mask = batch["mask"]
    inputs = {"input_ids": batch["input_ids"]}
    if not full_width:  # the model sees the mask, or only padding embedpipe added to unpadded rows
        inputs["attention_mask"] = mask
        if rows.left:  # count positions from each row's first real token, as HF generation does
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if forward.token_type_ids and "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    hidden = _hidden_states(model, inputs, forward).float()
    keep = mask.bool()
    if options.pooling == "none":
        pooled = hidden if full_width else hidden.masked_fill(~keep[..., None], 0.0)
    else:
        pooled = pool(hidden, keep, options.pooling, options.prompt_tokens)
    return _head(pooled, options)


def _head(pooled: torch.Tensor, options: EncodeOptions) -> torch.Tensor:
    """What a sentence-transformers model runs after pooling: its Dense layers, then truncate_dim (as
    ``SentenceTransformer(truncate_dim=...)``, after every module), then the L2 normalization.

    With ``normalize`` on, the vector is normalized after truncation: ``encode(normalize_embeddings=True)``,
    which for a model ending in Normalize renormalizes the truncated unit vector (ST's own output without
    ``normalize_embeddings`` is that truncated vector, of norm below 1: the same direction).
    """
    if options.pooling != "none":
        for layer in _dense_modules(options.dense, pooled.device):
            pooled = layer(pooled)
        if options.truncate_dim is not None:
            pooled = pooled[..., :options.truncate_dim]
    return F.normalize(pooled, dim=-1) if options.normalize else pooled


@functools.lru_cache(maxsize=8)
def _dense_modules(layers: tuple[DenseLayer, ...], device: torch.device) -> tuple[torch.nn.Module, ...]:
    """The Dense layers as float32 torch modules on ``device``, their weights read once per process."""
    from safetensors.torch import load_file

    modules = []
    for layer in layers:
        weights = load_file(layer.weights)
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items() if k.startswith("linear.")})
        if layer.activation not in ACTIVATIONS:  # read_st_config admits no other; a spec built by hand might
            raise ConfigError(f"encoder.model: Dense activation {layer.activation!r} is not one of {ACTIVATIONS}")
        modules.append(torch.nn.Sequential(linear, getattr(torch.nn, layer.activation)()).float().to(device).eval())
    return tuple(modules)


def _encode_packed(model, batch: dict[str, torch.Tensor], forward: _Forward) -> torch.Tensor:
    """A batch's pooled (B, D) or per-token (B, W, D) output, computed over its real tokens only."""
    keep = batch["mask"].bool()
    seqs = segments(keep.sum(dim=1))
    # Row-major order: each row's real tokens in order, whichever side its padding is on.
    positions = (keep.cumsum(-1) - 1)[keep]
    type_ids = batch["token_type_ids"][keep] if forward.token_type_ids and "token_type_ids" in batch else None
    hidden = packed_hidden_states(model, batch["input_ids"][keep], seqs, positions, type_ids, forward.layer,
                                  forward.apply_norm).float()
    options = forward.options
    if options.pooling in ("mean", "cls", "last") and not options.prompt_tokens:
        return pool_packed(hidden, seqs.cu_seqlens, options.pooling)
    out = hidden.new_zeros(*keep.shape, hidden.shape[-1])
    out[keep] = hidden
    # The other poolings read the rows laid out again: one pooling code, the padded forward's.
    return out if options.pooling == "none" else pool(out, keep, options.pooling, options.prompt_tokens)


def _hidden_states(model, inputs: dict[str, torch.Tensor], forward: _Forward) -> torch.Tensor:
    """The chosen layer's hidden states, with the final norm applied or not as asked."""
    if forward.layer < forward.last:
        hidden = model(**inputs, output_hidden_states=True).hidden_states[forward.layer]
        return forward.norm(hidden) if forward.apply_norm else hidden
    if forward.norm is None or forward.apply_norm:
        return model(**inputs).last_hidden_state
    # The last layer before the final norm: GPT-2 does not expose it (its hidden_states[-1] is normed).
    captured: list[torch.Tensor] = []
    handle = forward.norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured[0]


def pool(hidden: torch.Tensor, keep: torch.Tensor, pooling: Pooling, prompt_tokens: int = 0) -> torch.Tensor:
    """Pool (B, W, D) hidden states over the real positions ``keep`` (B, W); rows with none pool to zeros.

    As sentence-transformers' Pooling: ``max`` over the real positions; ``weightedmean`` weights the k-th
    real token by k (1, 2, ...). ``prompt_tokens``: the first real tokens of each row (the prompt) are left
    out, and the others keep their weights.
    """
    rank = keep.cumsum(dim=1)  # 1-based position among the row's real tokens (either padding side)
    if prompt_tokens:
        keep = keep & (rank > prompt_tokens)
    any_real = keep.any(dim=1, keepdim=True)
    if pooling == "mean":
        # masked_fill, not a multiply: a NaN at a padded position must not leak into the sum.
        summed = hidden.masked_fill(~keep[..., None], 0.0).sum(dim=1)
        return summed / keep.sum(dim=1, keepdim=True).clamp(min=1)
    if pooling == "max":
        top = hidden.masked_fill(~keep[..., None], float("-inf")).max(dim=1).values
        return top.masked_fill(~any_real, 0.0)
    if pooling == "weightedmean":
        weights = (rank * keep).to(hidden.dtype)[..., None]
        summed = (hidden.masked_fill(~keep[..., None], 0.0) * weights).sum(dim=1)
        return summed / weights.sum(dim=1).clamp(min=1)
    width = keep.shape[1]
    if pooling == "cls":
        position = keep.int().argmax(dim=1)
    elif pooling == "last":
        position = width - 1 - keep.flip(1).int().argmax(dim=1)
    else:
        raise ValueError(f"pooling {pooling!r} does not reduce over positions")
    picked = hidden[torch.arange(len(hidden), device=hidden.device), position]
    return picked.masked_fill(~any_real, 0.0)


def to_output(embeddings: torch.Tensor, output_dtype: OutputDtype) -> np.ndarray:
    """Embeddings as a numpy array of the stored dtype; bfloat16 as its uint16 bit pattern."""
    tensor = embeddings.detach().to(TORCH_DTYPES[output_dtype])
    if output_dtype == "bfloat16":
        return tensor.view(torch.int16).cpu().numpy().view(np.uint16)
    return tensor.cpu().numpy()
