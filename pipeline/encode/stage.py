"""The embed stage's work on token shards, without Ray.

read ``tokens/<shard>`` (memory-mapped) -> encode its pieces -> commit ``embeddings/<shard>`` with the
same rows in the same order; return a report for the manifest. A :class:`ShardEncoder` loads its model
once and is reused for every piece of every shard (the Ray encoder actor is a thin wrapper around it);
the pieces of one shard may be embedded by many encoders and are committed once by
:func:`pipeline.encode.pieces.assemble_shard`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.encode.pieces import (
    DEFAULT_PIECE_ROWS,
    Piece,
    assemble_shard,
    length_order,
    piece_count,
    piece_rows_of,
)
from pipeline.faults import fault_point
from pipeline.output.contract import TOKENS
from pipeline.output.embedding_format import embedding_arrow_field
from pipeline.output.shards import read_shard_and_sha256
from pipeline.output.storage import output_path

log = logging.getLogger("embedpipe")
# The exit status of an encoder process whose GPU became unusable (EX_SOFTWARE).
DEVICE_LOST_EXIT = 70


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
    hidden_size: int  # D of the stored vectors: the model's hidden size, or its last Dense's, or truncate_dim
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    cpu_linear: str = "onednn"  # "onednn": pack float32 linear layers for oneDNN on CPU; "torch": leave them
    tf32: bool = False  # CUDA float32 matmuls on TF32 tensor cores (faster, ~1e-3 relative error)
    piece_rows: int = DEFAULT_PIECE_ROWS["cpu"]  # rows per piece of a shard (pipeline.encode.pieces)
    # A hub model's (repo id, commit): each worker fetches that commit from its own node's Hugging Face cache
    # (downloading it there if absent), so every node loads the same snapshot; model_dir is the driver's copy.
    hub_model: tuple[str, str] | None = None
    static: bool = False  # a static embedding model (pipeline.encode.static): a table lookup and a mean
    # int8 | uint8 | binary | ubinary: the stored dtype, applied when a shard is committed (the pieces are float32)
    quantize: str | None = None
    # int8 / uint8: the (2, D) calibration ranges as nested lists; None until known (see calibrate_ranges)
    quantize_ranges: list[list[float]] | None = None

    @property
    def stored_dtype(self) -> str:
        """The dtype embedding shards store: the quantized one, else the options' output dtype."""
        return self.quantize or self.options.output_dtype

    @property
    def needs_ranges(self) -> bool:
        """int8 / uint8 output whose calibration ranges are not known yet."""
        return self.quantize in ("int8", "uint8") and self.quantize_ranges is None

    def computed_with(self) -> dict[str, Any]:
        """The resolved settings a shard's bytes depend on beyond the config (``device: auto`` resolved):
        recorded in the manifest, so that a resumed job never mixes shards computed two ways."""
        return {"device": self.device, "dtype": str(self.options.dtype).removeprefix("torch."),
                "tf32": self.tf32 and self.device == "cuda", "piece_rows": self.piece_rows,
                "max_tokens_per_batch": self.options.max_tokens_per_batch}


def embedding_schema(spec: EmbedSpec, with_chunk: bool) -> pa.Schema:
    """The one Arrow schema of embedding shards: id, (chunk), embedding."""
    fields = [pa.field("id", pa.string())]
    if with_chunk:
        fields.append(pa.field("chunk", pa.int32()))
    seq_len = spec.seq_len if spec.options.pooling == "none" else None
    ranges = None if spec.quantize_ranges is None else np.asarray(spec.quantize_ranges, np.float32)
    fields.append(embedding_arrow_field("embedding", spec.hidden_size, seq_len, spec.stored_dtype, ranges))
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
    """Holds one loaded encoder and embeds pieces of token shards with it (see :mod:`pipeline.encode.pieces`)."""

    def __init__(self, spec: EmbedSpec) -> None:
        self.spec = spec
        self._model = None
        self._shard: _OpenShard | None = None
        self._ahead: tuple[tuple[str, str], Future[_OpenShard]] | None = None  # the next shard, being read
        self._reader: ThreadPoolExecutor | None = None

    @property
    def model(self) -> Any:
        """The encoder, loaded on first use (once per worker)."""
        if self._model is None:
            import torch

            from pipeline.encode.cpu_linear import pack_linear_layers, warn_if_bfloat16_is_slow
            from pipeline.encode.device import resolve_device
            from pipeline.encode.forward import check_options
            from pipeline.encode.malloc import keep_freed_memory
            from pipeline.encode.models import load_encoder

            if self.spec.num_threads:
                torch.set_num_threads(self.spec.num_threads)
            model_dir = self.spec.model_dir
            if self.spec.hub_model:  # never a branch: the commit the driver pinned
                from pipeline.hub import fetch_model

                model_dir = fetch_model(*self.spec.hub_model, allow_pickle=self.spec.allow_pickle,
                                        trust_remote_code=self.spec.trust_remote_code)
            if self.spec.static:  # a table and a mean: no transformer, always on the CPU
                from pipeline.encode.static import StaticEncoder

                self._model = StaticEncoder.load(model_dir, self.spec.options.normalize, self.spec.options.truncate_dim)
                return self._model
            keep_freed_memory()
            device = resolve_device(self.spec.device)
            if device.type == "cuda":  # exact float32 unless encoder.tf32 asks for tensor-core speed
                torch.backends.cuda.matmul.allow_tf32 = self.spec.tf32
                torch.backends.cudnn.allow_tf32 = self.spec.tf32
            model = load_encoder(
                model_dir, allow_pickle=self.spec.allow_pickle,
                trust_remote_code=self.spec.trust_remote_code, dtype=self.spec.options.dtype, device=device,
            )
            check_options(model, self.spec.options)
            if device.type == "cpu":
                warn_if_bfloat16_is_slow(self.spec.options.dtype, model)
                if self.spec.cpu_linear == "onednn":
                    pack_linear_layers(model)
            self._model = model
        return self._model

    def ready(self) -> bool:
        """Load the model now (a bad model surfaces here as ConfigError); True once it is in memory."""
        return self.model is not None

    def pieces(self, rows: int) -> int:
        """How many pieces a token shard of ``rows`` rows is embedded in."""
        return piece_count(rows, self.spec.piece_rows)

    def embed_piece(self, out_dir: str, name: str, piece: int,
                    read_ahead: str | None = None) -> tuple[dict[str, Any], Piece]:
        """Embed piece ``piece`` of ``tokens/<name>``; return (a small status for the driver, the piece).

        ``read_ahead``: a committed token shard this encoder is likely to get next, read and hashed on a
        thread while this piece computes, so that the device does not wait for it.
        """
        from pipeline.encode.forward import encode_rows

        shard, read = self._open(out_dir, name)
        if read_ahead and read_ahead != name:
            self._read_ahead(out_dir, read_ahead)
        rows = piece_rows_of(shard.order, piece, self.spec.piece_rows)
        input_ids, mask, type_ids = (_take(column, rows) for column in shard.arrays)
        counts: dict[str, int] = {}
        try:
            if self.spec.static:
                embeddings = self.model.encode(input_ids, mask)
                counts["computed_tokens"] = int(shard.lengths[rows].sum())
            else:
                embeddings = encode_rows(self.model, input_ids, mask, type_ids, self.spec.options,
                                         padding_side=self.spec.padding_side, backoff=shard.backoff, counts=counts)
        except Exception as exc:
            _exit_if_device_lost(exc, f"tokens/{name} piece {piece}")
            raise
        fault_point("embed.after_piece")
        status = {"name": name, "piece": piece, "rows": len(rows), "tokens_sha256": shard.sha256,
                  "computed_tokens": counts.get("computed_tokens", 0), "read": read}
        return status, Piece(rows.astype(np.int64), embeddings, shard.sha256)

    def embed_shard(self, out_dir: str, name: str) -> dict[str, Any]:
        """Embed every piece of ``tokens/<name>`` here and commit ``embeddings/<name>``; return its report.

        The same bytes as the pieces embedded by many encoders and assembled (see :mod:`pipeline.encode.pieces`).
        """
        shard, _ = self._open(out_dir, name)
        done = [self.embed_piece(out_dir, name, p) for p in range(self.pieces(shard.rows))]
        self._shard = None  # the next call reads the shard afresh
        report = assemble_shard(out_dir, name, embedding_schema(self.spec, shard.with_chunk),
                                self.spec.stored_dtype, [piece for _, piece in done])
        return report | {"pieces": len(done), "computed_tokens": sum(s["computed_tokens"] for s, _ in done)}

    def _open(self, out_dir: str, name: str) -> tuple[_OpenShard, str | None]:
        """The token shard's arrays and length order, read and hashed once for all its pieces; and how this
        call got it: None (open already), ``ahead`` (read while the last piece computed) or ``here``."""
        if self._shard is not None and (self._shard.out_dir, self._shard.name) == (out_dir, name):
            return self._shard, None
        self._shard = None  # the last shard's arrays are released before the next one is read
        ahead, self._ahead = self._ahead, None
        if ahead and ahead[0] == (out_dir, name):
            try:
                self._shard = ahead[1].result()
                return self._shard, "ahead"
            except Exception:  # read it again here: an error is this piece's to report
                log.debug("reading tokens/%s ahead failed; reading it again", name, exc_info=True)
        self._shard = self._read(out_dir, name)
        return self._shard, "here"

    def _read_ahead(self, out_dir: str, name: str) -> None:
        """Start reading ``tokens/<name>`` on the reader thread, unless it is being read already."""
        if self._ahead and self._ahead[0] == (out_dir, name):
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self._ahead = ((out_dir, name), self._reader.submit(self._read, out_dir, name))

    def _read(self, out_dir: str, name: str) -> _OpenShard:
        """Read and hash ``tokens/<name>``, and sort its rows by length (pyarrow and hashlib release the GIL)."""
        from pipeline.encode.forward import Backoff, compute_lengths

        tokens, sha256 = read_shard_and_sha256(output_path(out_dir) / TOKENS / name)
        arrays = token_arrays(tokens)
        lengths = compute_lengths(*arrays, self.spec.options, padding_side=self.spec.padding_side)
        return _OpenShard(out_dir, name, sha256, arrays, length_order(lengths), tokens.num_rows,
                          "chunk" in tokens.column_names, Backoff(), lengths)


def _exit_if_device_lost(exc: Exception, where: str) -> None:
    """End this process when the GPU is unusable after ``exc``: Ray restarts the actor on a fresh CUDA
    context and retries its pieces, where staying alive would fail every later piece as a data error."""
    from pipeline.encode.device import device_lost

    if device_lost(exc):
        log.critical("%s: %s: %s; the GPU is unusable in this process, which now exits for Ray to restart it",
                     where, type(exc).__name__, exc)
        logging.shutdown()
        os._exit(DEVICE_LOST_EXIT)


@dataclass(frozen=True)
class _OpenShard:
    out_dir: str
    name: str
    sha256: str
    arrays: tuple[Any, Any, Any]
    order: np.ndarray
    rows: int
    with_chunk: bool
    backoff: Any  # pipeline.encode.forward.Backoff: out-of-memory halvings, remembered for the whole shard
    lengths: np.ndarray  # per row, the tokens the encoder computes for it


def _take(column: Any, rows: np.ndarray) -> Any:
    """Rows of a (N, L) matrix or of a list of 1-D rows; None stays None."""
    if column is None:
        return None
    if isinstance(column, np.ndarray):
        return column[rows]
    return [column[int(i)] for i in rows]


def plan_embed(config: Any, tokenize_spec: Any, device: str, num_threads: int | None) -> EmbedSpec:
    """Check the encoder settings against the model's config and the tokenizer, before any work.

    Reads only the model's config.json and lists its weight files (the weights load on the workers). A hub
    model is fetched here into the driver's Hugging Face cache first (:func:`pipeline.hub.fetch_model`).

    Raises:
        ConfigError: the model cannot be used (see :func:`pipeline.encode.models.load_encoder`), the tokenizer's
            vocabulary does not fit its embedding table, the layer is out of range, or per-token output is
            asked of rows that have no fixed width.
    """
    from pipeline.encode.forward import EncodeOptions, check_head
    from pipeline.encode.models import check_model_dir, locate_model, text_config
    from pipeline.errors import ConfigError
    from pipeline.tokenize.st_config import encoder_settings, read_st_config

    enc = config.encoder
    source = locate_model(enc.model, enc.revision, allow_pickle=enc.allow_pickle,
                          trust_remote_code=enc.trust_remote_code)
    model_dir = source.path
    static = _plan_static(config, tokenize_spec, model_dir, source.hub)
    if static is not None:
        return _with_quantization(static, enc)
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
    settings = encoder_settings(enc, read_st_config(model_dir))
    if settings.pooling == "none" and tokenize_spec.fixed_width is None:
        raise ConfigError("encoder.pooling: 'none' (per-token output) needs rows of one width: "
                          "tokenizer.padding: max_length with truncation: true")
    if (tokenize_spec.prompt or None) != settings.prompt:  # the tokens were made for another prompt
        raise ConfigError(f"encoder.prompt: the tokens begin with {tokenize_spec.prompt!r} but the encoder's "
                          f"prompt is {settings.prompt!r}")
    options = EncodeOptions.from_config(enc, device, settings, tokenize_spec.prompt_tokens)
    check_head(options, int(text.hidden_size))
    return _with_quantization(EmbedSpec(
        model_dir=str(model_dir), options=options, device=device,
        allow_pickle=enc.allow_pickle, trust_remote_code=enc.trust_remote_code,
        padding_side=tokenize_spec.padding_side, seq_len=tokenize_spec.fixed_width,
        hidden_size=options.output_dim(int(text.hidden_size)), num_threads=num_threads,
        cpu_linear=enc.cpu_linear, tf32=enc.tf32, piece_rows=enc.piece_rows or DEFAULT_PIECE_ROWS[device],
        hub_model=source.hub,
    ), enc)


def _plan_static(config: Any, tokenize_spec: Any, model_dir: Any, hub: Any = None) -> EmbedSpec | None:
    """The spec of a static embedding model (pipeline.encode.static), or None for a transformers model.

    The encoder settings of a transformer do not apply: pooling is the mean (``auto`` or ``mean``), the layer
    is the table; ``normalize: auto`` is the model's own (model2vec's config, or a Normalize module), and
    ``truncate_dim`` keeps the first dimensions before the normalization, as sentence-transformers does.
    It runs on the CPU (a table lookup: moving the rows to a GPU would cost more than the mean).
    """
    from pipeline.encode.forward import EncodeOptions
    from pipeline.encode.static import require_static
    from pipeline.errors import ConfigError
    from pipeline.tokenize.st_config import encoder_settings, read_st_config
    from pipeline.tokenize.static_models import static_model_files

    if static_model_files(model_dir) is None:
        return None
    files = require_static(model_dir)
    enc = config.encoder
    if hub is not None:  # the tokenize stage finds a static model's tokenize settings in a local directory only
        raise ConfigError(f"encoder.model: {enc.model!r} is a static embedding model; name its local directory "
                          f"(e.g. {model_dir}): static models are not taken by hub id yet")
    settings = encoder_settings(enc, read_st_config(model_dir))
    if settings.pooling != "mean" or enc.layer != -1:
        raise ConfigError(f"encoder.pooling / encoder.layer: {enc.model!r} is a static embedding model (a token "
                          "table and a mean): pooling must be mean (or auto) and layer -1")
    from safetensors import safe_open

    with safe_open(str(files.weights_file), framework="numpy") as handle:
        name = "embeddings" if files.kind == "model2vec" else "embedding.weight"
        rows, dim = handle.get_slice(name).get_shape()
        if files.kind == "model2vec" and "mapping" in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
            rows = handle.get_slice("mapping").get_shape()[0]
    if tokenize_spec.vocab_size > rows:
        raise ConfigError(f"tokenizer.name: the tokenizer has {tokenize_spec.vocab_size} tokens but encoder.model "
                          f"{enc.model!r} embeds only {rows}; use the encoder's own tokenizer")
    options = EncodeOptions.from_config(enc, "cpu", settings, 0)
    if options.truncate_dim is not None and options.truncate_dim > dim:
        raise ConfigError(f"encoder.truncate_dim: {options.truncate_dim} is more than the {dim} dimensions "
                          "of the model's vectors")
    return EmbedSpec(
        model_dir=str(model_dir), options=options, device="cpu", allow_pickle=False, trust_remote_code=False,
        padding_side=tokenize_spec.padding_side, seq_len=None, hidden_size=options.output_dim(int(dim)),
        num_threads=1, cpu_linear="torch", piece_rows=enc.piece_rows or DEFAULT_PIECE_ROWS["cuda"], static=True,
        hub_model=hub,
    )


def _with_quantization(spec: EmbedSpec, enc: Any) -> EmbedSpec:
    """The spec with the configured quantized output dtype, and int8 / uint8 ranges from ``encoder.quantize_ranges``."""
    from dataclasses import replace

    from pipeline.errors import ConfigError
    from pipeline.output.quantize import QUANTIZED, SCALAR, load_ranges

    if enc.output_dtype not in QUANTIZED:
        return spec
    if spec.options.pooling == "none":
        raise ConfigError(f"encoder.output_dtype: {enc.output_dtype!r} quantizes pooled vectors; per-token output "
                          "(pooling none) is stored as float32, float16 or bfloat16")
    ranges = None
    if enc.output_dtype in SCALAR and enc.quantize_ranges is not None:
        ranges = load_ranges(enc.quantize_ranges, spec.hidden_size).tolist()
    return replace(spec, quantize=enc.output_dtype, quantize_ranges=ranges)


def with_ranges(spec: EmbedSpec, ranges: Any) -> EmbedSpec:
    """The spec with int8 / uint8 calibration ranges ((2, D)) filled in."""
    from dataclasses import replace

    return replace(spec, quantize_ranges=np.asarray(ranges, np.float32).tolist())


def calibrate_ranges(spec: EmbedSpec, out_dir: str, name: str, rows: int) -> np.ndarray:
    """int8 / uint8 calibration ranges: per dimension the (min, max) of the float vectors of the first ``rows``
    rows (in row order) of ``tokens/<name>``, embedded in this process in float32 on the CPU.

    The driver calls it once, for the job's first token shard, before any piece is handed out; the result is
    recorded in the manifest, so a rerun (resume) quantizes with the same ranges whatever runs it.
    """
    from dataclasses import replace

    import torch

    from pipeline.output.quantize import calibration_ranges

    cpu = replace(spec, device="cpu", options=replace(spec.options, dtype=torch.float32), num_threads=None,
                  piece_rows=rows)
    encoder = ShardEncoder(cpu)
    shard, _ = encoder._open(out_dir, name)
    first = np.arange(min(rows, shard.rows), dtype=np.int64)
    input_ids, mask, type_ids = (_take(column, first) for column in shard.arrays)
    if cpu.static:
        vectors = encoder.model.encode(input_ids, mask)
    else:
        from pipeline.encode.forward import encode_rows

        vectors = encode_rows(encoder.model, input_ids, mask, type_ids, cpu.options, padding_side=cpu.padding_side)
    return calibration_ranges(vectors)
