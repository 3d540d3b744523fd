"""Model FLOPs of a transformer encoder, counted from its shape and the tokens it reads.

Per layer, for a row of n positions (d = hidden size, f = intermediate size):

    linear layers   n * 2 * (4 d^2 + 2 d f)     Q, K, V and output projections (4 d^2) and the MLP (2 d f),
                                                 2 FLOPs per multiply-add
    attention       2 * 2 * d * P               scores Q K^T and the weighted sum over V, where P is the
                                                 number of (query, key) pairs: n^2 for a bidirectional model
                                                 (BERT), n (n + 1) / 2 for a causal one (CLIP's text encoder)

and the row's total is layers * (linear + attention). Embedding lookups, layer norms, softmax and the
pooling are left out (well under 1% here). "Real tokens" are the rows' ``length`` (no padding); the
"computed" count is what the embed path's batch plan actually runs: each batch at its padded width,
padding included, which is the rate the hardware sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    causal: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        text = config.get("text_config") or config
        return cls(int(text["num_hidden_layers"]), int(text["hidden_size"]), int(text["intermediate_size"]),
                   causal=str(text.get("model_type", "")).startswith("clip"))


def row_flops(n: np.ndarray, shape: Shape) -> np.ndarray:
    """FLOPs of a forward pass over rows of ``n`` positions each (an array), by the formula above."""
    n = np.asarray(n, dtype=np.float64)
    d, f = shape.hidden, shape.intermediate
    pairs = n * (n + 1) / 2 if shape.causal else n * n
    return shape.layers * (n * 2 * (4 * d * d + 2 * d * f) + 4 * d * pairs)


def total_flops(lengths: np.ndarray, shape: Shape) -> float:
    return float(row_flops(lengths, shape).sum())


def computed_flops(lengths: np.ndarray, shape: Shape, max_tokens_per_batch: int, cap: int,
                   full_width: int | None = None) -> float:
    """FLOPs of the embed path's own batches for one shard: its batch plan, each batch at its padded width.

    ``full_width``: rows computed at the stored width whatever their length (no attention mask).
    """
    from pipeline.encode.forward import WIDTH_MULTIPLE, padded_width, plan_batches

    lengths = np.asarray(lengths)
    if full_width is not None:
        return float(len(lengths) * row_flops(np.array([full_width]), shape)[0])
    total = 0.0
    for rows in plan_batches(lengths, max_tokens_per_batch, WIDTH_MULTIPLE, cap):
        width = padded_width(int(lengths[rows].max()), WIDTH_MULTIPLE, cap)
        total += len(rows) * float(row_flops(np.array([width]), shape)[0])
    return total
