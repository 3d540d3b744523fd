"""One token shard of the embed stage, start to finish, without Ray.

read ``tokens/<shard>`` (memory-mapped) -> encode -> commit ``embeddings/<shard>``
with the same rows in the same order; return a report for the manifest. A
:class:`ShardEncoder` loads its model once and is reused for every shard (the
Ray encoder actor is a thin wrapper around it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.faults import fault_point
from pipeline.output.contract import EMBEDDINGS, TOKENS
from pipeline.output.embedding_format import (
    bfloat16_bits_to_float32,
    count_nonfinite,
    embedding_arrow_field,
    embeddings_to_arrow,
)
from pipeline.output.shards import read_shard_and_sha256, write_shard
from pipeline.output.storage import output_path

# How many ids of non-finite rows a shard report names (the count is always exact).
_NONFINITE_IDS_KEPT = 20


@dataclass(frozen=True)
class EmbedSpec:
    """Everything an encoder worker needs, resolved on the driver (picklable)."""

    model_dir: str
    options: Any  # pipeline.encode.forward.EncodeOptions (imported lazily: it imports torch)
    device: str  # "cpu" or "cuda", already resolved against the cluster
    allow_pickle: bool
    trust_remote_code: bool
    padding_side: str
    seq_len: int | None  # stored row width for per-token output (pooling none), else None
    hidden_size: int  # D of the stored vectors, from the model's config
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    cpu_linear: str = "onednn"  # "onednn": pack float32 linear layers for oneDNN on CPU; "torch": leave them


def embedding_schema(spec: EmbedSpec, with_chunk: bool) -> pa.Schema:
    """The one Arrow schema of embedding shards: id, (chunk), embedding."""
    fields = [pa.field("id", pa.string())]
    if with_chunk:
        fields.append(pa.field("chunk", pa.int32()))
    seq_len = spec.seq_len if spec.options.pooling == "none" else None
    fields.append(embedding_arrow_field("embedding", spec.hidden_size, seq_len, spec.options.output_dtype))
    return pa.schema(fields)


def token_arrays(table: pa.Table) -> tuple[Any, np.ndarray | None, Any]:
    """(input_ids, attention_mask, token_type_ids) of a token shard, as ``encode_rows`` takes them.

    Fixed-width and equal-width rows come as (N, L) matrices viewing the shard's buffers; unpadded
    rows (``padding: none``) as a list of 1-D arrays, with no mask.
    """
    columns = {}
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        if name in table.column_names:
            columns[name] = table.column(name).combine_chunks()
    ids = columns["input_ids"]
    if pa.types.is_fixed_size_list(ids.type):
        width = ids.type.list_size
        return tuple(None if name not in columns else
                     columns[name].flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
                     for name in ("input_ids", "attention_mask", "token_type_ids"))
    lengths = np.diff(ids.offsets.to_numpy())
    if len(lengths) and (lengths == lengths[0]).all():  # padding: longest pads a shard to one width
        width = int(lengths[0])
        return tuple(None if name not in columns else
                     columns[name].flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
                     for name in ("input_ids", "attention_mask", "token_type_ids"))
    splits = np.cumsum(lengths)[:-1]
    flat = {name: np.split(col.flatten().to_numpy(zero_copy_only=False), splits) for name, col in columns.items()}
    return flat["input_ids"], None, flat.get("token_type_ids")


class ShardEncoder:
    """Holds one loaded encoder and embeds whole token shards with it."""

    def __init__(self, spec: EmbedSpec) -> None:
        self.spec = spec
        self._model = None

    @property
    def model(self) -> Any:
        """The encoder, loaded on first use (once per worker)."""
        if self._model is None:
            import torch

            from pipeline.encode.cpu_linear import pack_linear_layers
            from pipeline.encode.device import resolve_device
            from pipeline.encode.forward import check_options
            from pipeline.encode.malloc import keep_freed_memory
            from pipeline.encode.models import load_encoder

            if self.spec.num_threads:
                torch.set_num_threads(self.spec.num_threads)
            keep_freed_memory()
            device = resolve_device(self.spec.device)
            model = load_encoder(
                self.spec.model_dir, allow_pickle=self.spec.allow_pickle,
                trust_remote_code=self.spec.trust_remote_code, dtype=self.spec.options.dtype, device=device,
            )
            check_options(model, self.spec.options)
            if device.type == "cpu" and self.spec.cpu_linear == "onednn":
                pack_linear_layers(model)
            self._model = model
        return self._model

    def ready(self) -> bool:
        """Load the model now (a bad model surfaces here as ConfigError); True once it is in memory."""
        return self.model is not None

    def embed_shard(self, out_dir: str, name: str) -> dict[str, Any]:
        """Embed ``tokens/<name>`` into ``embeddings/<name>``; return the shard's report."""
        from pipeline.encode.forward import encode_rows

        out = output_path(out_dir)
        tokens, tokens_sha256 = read_shard_and_sha256(out / TOKENS / name)
        input_ids, mask, type_ids = token_arrays(tokens)
        embeddings = encode_rows(self.model, input_ids, mask, type_ids, self.spec.options,
                                 padding_side=self.spec.padding_side)
        schema = embedding_schema(self.spec, "chunk" in tokens.column_names)
        columns = [tokens.column("id")]
        if "chunk" in tokens.column_names:
            columns.append(tokens.column("chunk"))
        columns.append(embeddings_to_arrow(embeddings, schema.field("embedding")))
        fault_point("embed.before_commit")
        committed = write_shard(pa.Table.from_arrays(columns, schema=schema), out / EMBEDDINGS / name)
        fault_point("embed.after_commit")
        bad = count_nonfinite(embeddings, self.spec.options.output_dtype)
        return {
            "name": name,
            "rows": len(embeddings),
            "tokens": int(pc.sum(tokens.column("length")).as_py() or 0),
            "bytes": committed.bytes,
            "sha256": committed.sha256,
            "tokens_sha256": tokens_sha256,
            "nonfinite_rows": int(np.count_nonzero(bad)),
            "nonfinite_ids": [tokens.column("id")[int(i)].as_py() for i in np.flatnonzero(bad)[:_NONFINITE_IDS_KEPT]],
            "mean_norm": _mean_norm(embeddings, bad, self.spec.options.output_dtype),
        }


def _mean_norm(embeddings: np.ndarray, bad: np.ndarray, output_dtype: str) -> float | None:
    """Mean L2 norm of the finite rows (per-token output: of every position's vector)."""
    good = embeddings[bad == 0]
    if not len(good):
        return None
    if output_dtype == "bfloat16":  # bit patterns: widen to float32 by shifting into the high half
        good = bfloat16_bits_to_float32(good)
    vectors = good.reshape(-1, good.shape[-1]).astype(np.float32)
    return float(np.linalg.norm(vectors, axis=1).mean())


def plan_embed(config: Any, tokenize_spec: Any, device: str, num_threads: int | None) -> EmbedSpec:
    """Check the encoder settings against the model's config and the tokenizer, before any work.

    Reads only the model's config.json and lists its weight files (the weights load on the workers).

    Raises:
        ConfigError: the model cannot be used (see :func:`pipeline.encode.models.load_encoder`), the tokenizer's
            vocabulary does not fit its embedding table, the layer is out of range, or per-token output is
            asked of rows that have no fixed width.
    """
    from pipeline.encode.forward import EncodeOptions
    from pipeline.encode.models import check_model_dir, resolve_model_dir, text_config
    from pipeline.errors import ConfigError

    enc = config.encoder
    model_dir = resolve_model_dir(enc.model)
    check_model_dir(model_dir, allow_pickle=enc.allow_pickle, trust_remote_code=enc.trust_remote_code)
    text = text_config(model_dir, enc.trust_remote_code)
    if tokenize_spec.vocab_size > text.vocab_size:
        raise ConfigError(
            f"tokenizer.name: the tokenizer has {tokenize_spec.vocab_size} tokens but encoder.model {enc.model!r} "
            f"embeds only {text.vocab_size}; use the encoder's own tokenizer"
        )
    layers = int(text.num_hidden_layers)
    if not -(layers + 1) <= enc.layer <= layers:
        raise ConfigError(f"encoder.layer: {enc.layer} is out of range for a model with {layers} layers "
                          f"(allowed {-(layers + 1)}..{layers}; -1 is the last layer, 0 the embeddings)")
    positions = int(text.max_position_embeddings)
    if not tokenize_spec.truncation or (tokenize_spec.max_length or 0) > positions:
        raise ConfigError(f"tokenizer.max_length: encoder.model {enc.model!r} reads at most {positions} tokens a row; "
                          f"set tokenizer.truncation: true and max_length <= {positions}")
    if enc.pooling == "none" and tokenize_spec.fixed_width is None:
        raise ConfigError("encoder.pooling: 'none' (per-token output) needs rows of one width: "
                          "tokenizer.padding: max_length with truncation: true")
    options = EncodeOptions.from_config(enc, device)
    return EmbedSpec(
        model_dir=str(model_dir), options=options, device=device,
        allow_pickle=enc.allow_pickle, trust_remote_code=enc.trust_remote_code,
        padding_side=tokenize_spec.padding_side, seq_len=tokenize_spec.fixed_width,
        hidden_size=int(text.hidden_size), num_threads=num_threads,
        cpu_linear=enc.cpu_linear,
    )
