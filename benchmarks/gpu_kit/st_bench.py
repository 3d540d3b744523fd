"""``SentenceTransformer.encode`` on the same texts and the same random-weight model as the embed path.

The model is built from the saved Hugging Face directory as a user would: ``models.Transformer`` (max
sequence length 256, as all-MiniLM-L6-v2's) and ``models.Pooling`` mean. Its timing includes its own
tokenization (it takes texts); the embed path's does not (tokens come from the tokenize stage's shards).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gpu_kit import flops
from gpu_kit.models import read_config

WARM_UP_TEXTS = 512


def build(model_dir: Path, device: str, dtype: str, max_seq_length: int) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sentence-transformers 6.2 deprecates the `models` import path
        from sentence_transformers import SentenceTransformer, models

        transformer = models.Transformer(str(model_dir), max_seq_length=max_seq_length)
        pooling = models.Pooling(int(read_config(model_dir)["hidden_size"]), "mean")
        model = SentenceTransformer(modules=[transformer, pooling], device=device)
    model.max_seq_length = max_seq_length
    if dtype != "float32":
        model.to({"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    return model.eval()


def encode(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    out = model.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
    return np.asarray(out, dtype=np.float32)


def padding_waste(texts: list[str], lengths: np.ndarray, batch_size: int) -> float:
    """Computed / real tokens of its batches: it sorts by characters and pads each batch to its longest row."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    batches = np.array_split(order, range(batch_size, len(order), batch_size))
    return float(sum(len(b) * lengths[b].max() for b in batches) / lengths.sum())


def run_st(model_dir: Path, texts: list[str], lengths: np.ndarray, device: str, dtype: str, batch_size: int,
           max_seq_length: int, peak_tflops: float, warm_up_texts: int = WARM_UP_TEXTS
           ) -> tuple[dict[str, Any], np.ndarray]:
    """Build, warm up on the first texts, then one timed ``encode`` over all of them. Returns (results, vectors)."""
    started = time.perf_counter()
    model = build(model_dir, device, dtype, max_seq_length)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    encode(model, texts[:warm_up_texts], batch_size)
    warm_up_s = time.perf_counter() - started
    started = time.perf_counter()
    vectors = encode(model, texts, batch_size)
    seconds = time.perf_counter() - started
    shape = flops.Shape.of(read_config(model_dir))
    real_flops = flops.total_flops(lengths, shape)
    result = {
        "device": device, "dtype": dtype, "batch_size": batch_size, "max_seq_length": max_seq_length,
        "rows": len(texts), "real_tokens": int(lengths.sum()), "load_s": load_s, "warm_up_s": warm_up_s,
        "encode_s": seconds, "rows_per_s": len(texts) / seconds, "real_tokens_per_s": float(lengths.sum()) / seconds,
        "model_tflops": real_flops / seconds / 1e12,
        "model_share_of_bf16_peak": real_flops / seconds / 1e12 / peak_tflops,
        "padding_waste": padding_waste(texts, lengths, batch_size),
        "includes": "its own tokenization (texts in); the embed path reads token shards",
    }
    del model
    return result, vectors
