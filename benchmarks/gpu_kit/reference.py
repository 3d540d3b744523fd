"""The float32 reference on the machine's own CPU: a plain ``transformers`` forward pass, and the comparisons.

Independent of the embed path's batching: rows are batched here by length (at most ``BATCH_ROWS``, padded to
the batch's longest row with the mask), or, without the mask, run at their stored width as they are; mean
pooling is done here over the mask. A CPU run of every row would take minutes on the larger shapes, so the
reference covers a fixed subsample (stated in the results).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH_ROWS = 64


def subsample(n: int, k: int, lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """``k`` row indices of ``n`` (all when k >= n), always with the shortest and the longest row."""
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = set(rng.choice(n, size=k - 2, replace=False).tolist())
    picked.update((int(np.argmin(lengths)), int(np.argmax(lengths))))
    return np.array(sorted(picked))


def cpu_forward(model_dir: Path, input_ids: np.ndarray, mask: np.ndarray, type_ids: np.ndarray | None,
                pooling: str, use_mask: bool) -> tuple[np.ndarray, float]:
    """(N, D) mean-pooled or (N, L, D) per-token float32 outputs of a plain CPU float32 forward; and seconds."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    started = time.perf_counter()
    lengths = mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    outputs: list[np.ndarray | None] = [None] * len(input_ids)
    with torch.inference_mode():
        for start in range(0, len(order), BATCH_ROWS):
            rows = order[start:start + BATCH_ROWS]
            width = int(lengths[rows].max()) if use_mask else input_ids.shape[1]
            inputs = {"input_ids": torch.from_numpy(input_ids[rows, :width].astype(np.int64))}
            if use_mask:
                inputs["attention_mask"] = torch.from_numpy(mask[rows, :width].astype(np.int64))
                if type_ids is not None:
                    inputs["token_type_ids"] = torch.from_numpy(type_ids[rows, :width].astype(np.int64))
            hidden = model(**inputs).last_hidden_state.double().numpy()
            if pooling == "mean":
                keep = mask[rows, :width, None].astype(np.float64)
                pooled = (hidden * keep).sum(axis=1) / np.maximum(keep.sum(axis=1), 1)
            else:
                pooled = hidden
            for i, row in enumerate(rows):
                outputs[row] = pooled[i].astype(np.float32)
    return np.stack(outputs), time.perf_counter() - started


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each pair of vectors along the last axis, in float64 (two zero vectors count as 1)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    dot, na, nb = (a * b).sum(-1), np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = dot / (na * nb)
    out[(na == 0) & (nb == 0)] = 1.0
    out[(na == 0) ^ (nb == 0)] = 0.0
    return out


def compare(got: np.ndarray, want: np.ndarray, chunk_rows: int = 256) -> dict[str, Any]:
    """Min cosine per row (per position too, for per-token output) and the largest absolute difference.

    In chunks of rows: a CLIP shard of per-token float32 output is about a GB, and float64 copies of it would
    be several more."""
    if got.shape != want.shape:
        raise ValueError(f"outputs of different shapes: {got.shape} and {want.shape}")
    parts = []
    for start in range(0, len(got), chunk_rows):
        a = np.asarray(got[start:start + chunk_rows], dtype=np.float32)
        b = np.asarray(want[start:start + chunk_rows], dtype=np.float32)
        part: dict[str, Any] = {"rows": len(a), "finite": bool(np.isfinite(a).all()),
                                "min_row_cosine": float(cosines(a.reshape(len(a), -1), b.reshape(len(b), -1)).min()),
                                "max_abs_diff": float(np.abs(a - b).max()),
                                "identical_rows": int(sum(np.array_equal(x, y) for x, y in zip(a, b)))}
        if a.ndim == 3:
            part["min_position_cosine"] = float(cosines(a, b).min())
        parts.append(part)
    if not parts:
        return {"rows": 0, "finite": True, "identical_rows": 0}
    return merge(parts)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One comparison over several shards' comparisons."""
    out: dict[str, Any] = {"rows": sum(p["rows"] for p in parts), "finite": all(p["finite"] for p in parts)}
    for key, pick in (("min_row_cosine", min), ("min_position_cosine", min), ("max_abs_diff", max)):
        values = [p[key] for p in parts if p.get(key) is not None]
        if values:
            out[key] = pick(values)
    out["identical_rows"] = sum(p["identical_rows"] for p in parts)
    return out


def judge(result: dict[str, Any], threshold: float) -> dict[str, Any]:
    found = [v for k, v in result.items() if k in ("min_row_cosine", "min_position_cosine") and v is not None]
    worst = min(found) if found else None
    passed = bool(result["finite"] and worst is not None and worst >= threshold)
    return dict(result, threshold=threshold, min_cosine=worst, passed=passed)
