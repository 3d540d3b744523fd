"""Typed job configuration: load a YAML file, apply ``--set`` overrides, validate.

Importing this module is cheap (no tokenizer, model or Ray import). Unknown keys
and bad values raise :class:`ConfigError` naming the dotted key, before any work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from pipeline.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    """Where the corpus is and how to read it."""

    path: str = Field(description="file, glob or directory; local path or fsspec URI")
    format: Literal["auto", "jsonl", "parquet", "text", "arrow"] = "auto"
    text_column: str = "text"
    id_column: str | None = None
    # A whole number is a row count; a number below 1 is a fraction of the rows read.
    max_quarantined: float = Field(default=0.01, ge=0)
    # A text holding a NUL byte is quarantined (reject), cleaned (strip) or tokenized as it is (keep).
    nul_bytes: Literal["reject", "strip", "keep"] = "reject"
    # Longer texts (UTF-8 bytes) are quarantined: they bound a worker's memory. null = no limit.
    max_text_bytes: int | None = Field(default=8 * 1024 * 1024, gt=0)


class OutputConfig(_Section):
    """Where the shards go and how large they are."""

    path: str = "out"
    shard_rows: int = Field(default=10_000, gt=0)


class TokenizerConfig(_Section):
    """Tokenizer choice and the padding/truncation options of ``transformers``."""

    name: str | None = None
    # Hub revision (branch, tag or commit) of a tokenizer named by hub id. Unset: the encoder's revision when the
    # tokenizer is the encoder's model (tokenizer.name unset or the same id), else main. Pinned to a commit sha
    # on the driver before any work (pipeline.hub.pin_revisions).
    revision: str | None = None
    max_length: int | None = Field(default=None, gt=0)
    padding: Literal["max_length", "longest", "none"] = "max_length"
    padding_side: Literal["right", "left"] | None = None
    truncation: bool = True
    truncation_side: Literal["right", "left"] | None = None
    add_special_tokens: bool = True
    pad_token: str | None = None
    stride: int | None = Field(default=None, ge=0)
    # LM pretraining: documents (each followed by the separator) joined and cut into max_length blocks.
    pack: bool = False
    # "eos": the tokenizer's end-of-text token; else a token string; null: documents joined with nothing between.
    pack_separator: str | None = "eos"
    # The last partial block of a work unit: right-padded (mask 0) or dropped (its tokens counted).
    pack_remainder: Literal["pad", "drop"] = "pad"

    @model_validator(mode="after")
    def _check_combinations(self) -> TokenizerConfig:
        if self.pack:
            # Blocks are cut from whole documents: per-row padding, truncation and chunking mean nothing there.
            # Left at their defaults they are ignored; set explicitly they are a contradiction.
            for key in ("stride", "padding", "truncation"):
                if key in self.model_fields_set and not (key == "stride" and self.stride is None):
                    raise ValueError(f"tokenizer.{key} cannot be set with tokenizer.pack: true (packed blocks are "
                                     "cut from whole documents, never padded per row or truncated); remove it")
            return self
        if self.stride is not None and not self.truncation:
            raise ValueError("tokenizer.stride (chunking) needs tokenizer.truncation: true")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Unpacked jobs dump (and so hash) as they did before the pack keys existed: their outputs stay theirs.
        data = handler(self)
        if not self.pack:
            for key in _PACK_KEYS:
                data.pop(key, None)
        if self.revision is None:  # likewise jobs whose tokenizer is no hub id (pipeline.hub)
            data.pop("revision", None)
        return data


_PACK_KEYS = ("pack", "pack_separator", "pack_remainder")


class EncoderConfig(_Section):
    """The text encoder of the embed stage."""

    model: str = "minilm"
    # Hub revision (branch, tag or commit; unset: main) of a model named by hub id (org/name), pinned to a
    # commit sha on the driver before any work (pipeline.hub.pin_revisions).
    revision: str | None = None
    # auto: the model's sentence-transformers configuration (1_Pooling, Normalize), else mean / false.
    # An explicit value wins; the log says when it overrides the model's (pipeline/tokenize/st_config.py).
    pooling: Literal["auto", "mean", "cls", "last", "max", "weightedmean", "none"] = "auto"
    layer: int = -1
    final_layer_norm: bool | None = None
    normalize: bool | Literal["auto"] = "auto"
    # A prefix added to every text before tokenization: one of the model's prompts by name, or literal
    # (``prompt`` wins over ``prompt_name``, as in SentenceTransformer.encode). Neither: the model's
    # default prompt, if it names one; ``prompt: ""`` turns that off.
    prompt_name: str | None = None
    prompt: str | None = None
    # Matryoshka: keep the first truncate_dim dimensions (after any Dense), renormalized when normalize is on.
    truncate_dim: int | None = Field(default=None, gt=0)
    use_attention_mask: bool = True
    # auto: bfloat16 on a GPU, float32 on a CPU (bfloat16 there too where asked: oneDNN's AVX512-BF16 / AMX kernels).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # CUDA only: float32 matmuls on TF32 tensor cores (off: exact float32, as on a CPU).
    tf32: bool = False
    # Run each batch unpadded: its rows' real tokens in one sequence, attention kept within each row
    # (pipeline/encode/packed.py: BERT family, CLIP text, GPT-2; other models run padded, and the log says so).
    packed: bool = False
    # float32 | float16 | bfloat16, or quantized as sentence-transformers' quantize_embeddings: int8 | uint8
    # (per-dimension ranges) | binary | ubinary (bits packed 8 per byte); see pipeline/output/quantize.py.
    output_dtype: Literal["float32", "float16", "bfloat16", "int8", "uint8", "binary", "ubinary"] = "float32"
    # int8 / uint8: a .npy file of (2, D) floats (per-dimension minima, then maxima); null: calibrated from
    # the first calibration_rows rows of the job's first token shard, and recorded in the manifest.
    quantize_ranges: str | None = None
    calibration_rows: int = Field(default=1000, ge=2)
    # Unset: 65536 on a GPU; 2048 on a CPU, where big batches run ~10% slower per token (cache misses).
    max_tokens_per_batch: int | None = Field(default=None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Rows per piece of a token shard; pieces of one shard are embedded by every encoder actor at once.
    # Unset: 128 on a CPU, 8192 on a GPU. Part of what a shard's bytes depend on (a piece is batched alone).
    piece_rows: int | None = Field(default=None, gt=0)
    # On CPU, float32 linear layers on oneDNN with weights packed once (faster than torch's MKL default,
    # see pipeline/encode/cpu_linear.py); "torch" keeps torch's own kernels. Not used on a GPU.
    cpu_linear: Literal["onednn", "torch"] = "onednn"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Unset, the revision (a model that is no hub id), prompt and Matryoshka keys are left out, and the
        # quantization keys unless the output is int8 / uint8: jobs from before them dump (and so hash) as they
        # did, so their outputs stay their own.
        data = handler(self)
        for key in _QUANTIZE_KEYS if self.output_dtype not in ("int8", "uint8") else ():
            data.pop(key, None)
        for key in _UNSET_OMITTED:
            if data.get(key) is None:
                data.pop(key, None)
        return data


_UNSET_OMITTED = ("revision", "prompt_name", "prompt", "truncate_dim")
_QUANTIZE_KEYS = ("quantize_ranges", "calibration_rows")


class RayConfig(_Section):
    """What runs the job: a Ray cluster, or worker processes on this machine (pipeline/run/engine.py)."""

    address: str | None = None
    # CPU slots: of the local Ray cluster started for the job, or of the local executor. Unset: every core.
    num_cpus: int | None = Field(default=None, gt=0)
    # auto: Ray when an address is given (here or RAY_ADDRESS) or a GPU is visible, else local worker
    # processes (no cluster to start: seconds less per command). The output's bytes do not depend on it.
    executor: Literal["auto", "local", "ray"] = "auto"


class JobConfig(_Section):
    """One embedpipe job: the whole YAML file."""

    input: InputConfig
    output: OutputConfig = OutputConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    encoder: EncoderConfig = EncoderConfig()
    ray: RayConfig = RayConfig()

    def output_hash(self) -> str:
        """Hash of every setting that changes the output (not where it goes, not the cluster).

        Jobs hash the config resolved against the model (:func:`pipeline.tokenize.st_config.resolve_job_config`:
        no ``auto`` left, the prompt as its text), so the hash says which pooling, normalization and prompt ran.
        """
        relevant = self.model_dump(mode="json", exclude={"ray": True, "output": {"path"}})
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()

    def stage_hashes(self) -> dict[str, str]:
        """Per stage, a hash of the settings its shards depend on: a changed encoder setting changes only
        ``embeddings``; anything the tokens depend on (input, shard size, tokenizer) changes both."""
        tokens = self.model_dump(mode="json", exclude={"ray": True, "output": {"path"}, "encoder": True})
        if self.tokenizer.name is None:  # the tokenizer is the encoder's own
            tokens["encoder_model"] = self.encoder.model
        if self.encoder.prompt:  # the tokens begin with it (resolved: see pipeline.tokenize.st_config)
            tokens["prompt"] = self.encoder.prompt
        digest = hashlib.sha256(json.dumps(tokens, sort_keys=True).encode()).hexdigest()
        encoder = json.dumps(self.encoder.model_dump(mode="json"), sort_keys=True)
        return {"tokens": digest, "embeddings": hashlib.sha256((digest + encoder).encode()).hexdigest()}


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value`` into the key path and the value parsed as a YAML scalar."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not a YAML scalar ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override applied."""
    result = json.loads(json.dumps(data))
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return result


def _describe(errors: list[dict[str, Any]]) -> str:
    lines = []
    for err in errors:
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate_config(data: Any) -> JobConfig:
    """Validate a plain mapping into a :class:`JobConfig`, or raise ConfigError naming each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors())) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file with the safe loader."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return data if data is not None else {}


def load_config(path: str | Path, overrides: list[str] | None = None, output: str | None = None) -> JobConfig:
    """Load ``path``, apply ``--set`` overrides and ``--output``, and validate."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    if output is not None:
        data.setdefault("output", {})["path"] = output
    return validate_config(data)
