"""Static embedding models in the embed stage: a token-vector table lookup and a mean, no transformer.

The model (:mod:`pipeline.tokenize.static_models` finds its files) is a (V, D) float32 table; a row's
vector is the mean of its real tokens' rows (``torch.nn.functional.embedding_bag``, mode ``mean``, what
sentence-transformers' ``StaticEmbedding`` runs), zeros for a row with none, then L2-normalized if the model
says so. model2vec drops unknown tokens before the mean (after truncation), as ``StaticModel.tokenize`` does;
a vocabulary-quantized model2vec table is unfolded to one row per token (``embeddings[mapping] * weights``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.tokenize.static_models import StaticModelFiles, static_model_files


def _unk_id(tokenizer_json: str) -> int | None:
    """model2vec's ``_get_unk_token_id``: the model's unk token's id (WordPiece, BPE, WordLevel), or Unigram's unk_id."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    model = tokenizer.model
    if hasattr(model, "unk_token"):
        return None if model.unk_token is None else tokenizer.token_to_id(model.unk_token)
    return json.loads(tokenizer_json)["model"].get("unk_id")


def load_table(files: StaticModelFiles) -> torch.Tensor:
    """The (V, D) float32 table, one row per token id (a model2vec mapping and weights folded in)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(files.weights_file))
    if files.kind == "sentence_transformers":
        return torch.from_numpy(tensors["embedding.weight"].astype(np.float32))
    table = tensors["embeddings"].astype(np.float32)
    if "mapping" in tensors:
        table = table[tensors["mapping"].astype(np.int64)]
    if "weights" in tensors:
        table = table * tensors["weights"].astype(np.float32)[:, None]
    return torch.from_numpy(np.ascontiguousarray(table))


@dataclass
class StaticEncoder:
    """A loaded static model: its table, the token id dropped before the mean, and its normalization."""

    files: StaticModelFiles
    table: torch.Tensor
    drop_id: int | None
    normalize: bool
    truncate_dim: int | None = None  # keep the first dimensions (before the normalization), Matryoshka-style

    @classmethod
    def load(cls, model_dir: str | Path, normalize: bool | None = None,
             truncate_dim: int | None = None) -> StaticEncoder:
        """Load the static model in ``model_dir``; ``normalize`` None keeps the model's own setting.

        Raises:
            ConfigError: not a static model, or one with modules after StaticEmbedding other than Normalize.
        """
        files = require_static(model_dir)
        drop = _unk_id(files.tokenizer_file.read_text(encoding="utf-8")) if files.kind == "model2vec" else None
        return cls(files, load_table(files), drop, files.normalize if normalize is None else normalize, truncate_dim)

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def encode(self, input_ids, attention_mask: np.ndarray | None) -> np.ndarray:
        """(N, D) float32 vectors of token rows: an (N, L) matrix with its mask, or a list of 1-D rows."""
        flat, counts = _real_tokens(input_ids, attention_mask)
        if self.drop_id is not None:
            keep = flat != self.drop_id
            rows = np.repeat(np.arange(len(counts)), counts)
            counts = np.bincount(rows[keep], minlength=len(counts)).astype(np.int64)
            flat = flat[keep]
        offsets = torch.from_numpy(np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64))
        ids = torch.from_numpy(flat.astype(np.int64))
        with torch.inference_mode():
            out = F.embedding_bag(ids, self.table, offsets, mode="mean") if len(counts) else self.table[:0]
            if self.truncate_dim is not None:
                out = out[:, :self.truncate_dim]
            if self.normalize:
                out = self._normalized(out)
        return out.numpy().astype(np.float32, copy=False)

    def _normalized(self, out: torch.Tensor) -> torch.Tensor:
        if self.files.kind == "model2vec":  # StaticModel._encode_batch: x / (||x|| + 1e-32)
            return out / (torch.linalg.vector_norm(out, dim=1, keepdim=True) + 1e-32)
        return F.normalize(out, p=2, dim=1)  # sentence-transformers' Normalize module


def _real_tokens(input_ids, attention_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The real tokens of every row end to end, and how many each row has."""
    if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
        if attention_mask is None:
            return input_ids.reshape(-1), np.full(len(input_ids), input_ids.shape[1], dtype=np.int64)
        keep = attention_mask.astype(bool)
        return input_ids[keep], keep.sum(axis=1, dtype=np.int64)
    counts = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    flat = np.concatenate(input_ids) if len(input_ids) else np.zeros(0, np.int64)
    return flat, counts


def require_static(model_dir: str | Path) -> StaticModelFiles:
    """The static model files of ``model_dir``, checked for modules embedpipe runs.

    Raises:
        ConfigError: not a static model directory, or a module after StaticEmbedding other than Normalize.
    """
    files = static_model_files(model_dir)
    if files is None:
        raise ConfigError(f"encoder.model: {model_dir} is not a static embedding model")
    other = [m for m in files.later_modules if m != "Normalize"]
    if other:
        raise ConfigError(f"encoder.model: {model_dir}: modules after StaticEmbedding other than Normalize "
                          f"({', '.join(other)}) are not supported for static models")
    return files
