"""Quantized embeddings, torch-free: exactly ``sentence_transformers.quantization.quantize_embeddings``.

- ``int8`` / ``uint8``: per dimension, the calibration range [min, max] cut into 255 steps;
  ``uint8 = clip(floor((x - min) / step), 0, 255)``, ``int8`` that minus 128. A dimension whose range is
  empty takes a step of 1. The ranges are a (2, D) float32 array: row 0 the minima, row 1 the maxima.
- ``binary`` / ``ubinary``: one bit per dimension (``x > 0``), packed 8 per byte, most significant bit
  first (``numpy.packbits``), so D dimensions take ceil(D / 8) bytes; ``binary`` is the packed byte minus
  128 as int8, ``ubinary`` the byte itself.

The arithmetic is sentence-transformers' own, in the same dtypes (float32 throughout), so the bytes are
identical to its output for the same float32 input and ranges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

SCALAR = ("int8", "uint8")
BINARY = ("binary", "ubinary")
QUANTIZED = SCALAR + BINARY


def packed_width(dim: int) -> int:
    """Bytes per vector of ``dim`` dimensions packed 8 per byte."""
    return -(-dim // 8)


def calibration_ranges(embeddings: np.ndarray) -> np.ndarray:
    """Per-dimension (min, max) of float embeddings (N, D): the (2, D) float32 ranges int8/uint8 use."""
    flat = np.asarray(embeddings, dtype=np.float32).reshape(-1, embeddings.shape[-1])
    if len(flat) < 2:
        raise ValueError(f"quantization ranges need at least 2 vectors, got {len(flat)}")
    return np.vstack((flat.min(axis=0), flat.max(axis=0))).astype(np.float32)


def quantize(embeddings: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Float32 embeddings (..., D) in ``precision`` (int8 | uint8 need ``ranges``, (2, D))."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if precision in SCALAR:
        if ranges is None:
            raise ValueError(f"{precision} quantization needs ranges")
        ranges = np.asarray(ranges, dtype=np.float32)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        values = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return values.astype(np.uint8) if precision == "uint8" else (values - 128).astype(np.int8)
    if precision == "binary":
        return (np.packbits(embeddings > 0, axis=-1) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(embeddings > 0, axis=-1)
    raise ValueError(f"precision {precision!r} is not one of {', '.join(QUANTIZED)}")


def dequantize(values: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    """int8 / uint8 values back to approximate float32: each the bottom of its step (sentence-transformers'
    ``_dequantize_embeddings``)."""
    ranges = np.asarray(ranges, dtype=np.float32)
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    wide = values.astype(np.float64) + (128 if precision == "int8" else 0)
    return (wide * steps + ranges[0]).astype(np.float32)


def unpack_bits(values: np.ndarray, precision: str, dim: int) -> np.ndarray:
    """binary / ubinary bytes (..., ceil(D/8)) as (..., D) uint8 bits, 1 where the value was > 0."""
    raw = values.view(np.uint8) if precision == "ubinary" else (values.astype(np.int16) + 128).astype(np.uint8)
    return np.unpackbits(raw, axis=-1, count=dim)


def load_ranges(path: str, dim: int) -> np.ndarray:
    """``encoder.quantize_ranges``: a .npy file of shape (2, D), float (the minima, then the maxima).

    Raises:
        ConfigError: the file cannot be read, is a pickle, or does not have the shape (2, D).
    """
    try:
        ranges = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"encoder.quantize_ranges: cannot read {path} as a .npy array: {exc}") from None
    if ranges.shape != (2, dim) or not np.issubdtype(ranges.dtype, np.floating):
        raise ConfigError(f"encoder.quantize_ranges: {path} holds a {ranges.dtype} array of shape {ranges.shape}; "
                          f"expected floats of shape (2, {dim}): the minima, then the maxima, per dimension")
    return ranges.astype(np.float32)
