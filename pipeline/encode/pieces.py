"""Work below the shard: a token shard's rows cut into pieces that any encoder can embed, and the one
commit that puts the pieces back together.

A shard's rows are sorted by length (stably, as :func:`pipeline.encode.forward.plan_batches` sorts them)
and cut into pieces of ``piece_rows`` consecutive rows of that order. Each piece is batched and encoded on
its own, so a row's embedding depends only on its piece, never on how many encoders share the shard or
which of them took the piece: an output is byte-identical for 1, 2 or N actors, and after a crash.
:func:`assemble_shard` scatters the pieces back into row order and commits the embedding shard once.

Torch-free: the assembling task imports neither torch nor the model.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    embeddings_to_arrow,
    field_ranges,
)
from pipeline.output.quantize import QUANTIZED, SCALAR, quantize
from pipeline.output.shards import read_shard_and_sha256, write_shard
from pipeline.output.storage import output_path

# Rows per piece when encoder.piece_rows is unset. On a CPU a piece of 128 MiniLM rows of ~200 tokens
# takes a core a few seconds: small enough that the last pieces of a one-shard job spread over every
# core, large enough that a piece's few batches are full. A GPU wants many full 64k-token batches per call.
DEFAULT_PIECE_ROWS = {"cpu": 128, "cuda": 8192}
# How many ids of non-finite rows a shard report names (the count is always exact).
_NONFINITE_IDS_KEPT = 20


@dataclass(frozen=True)
class Piece:
    """Embeddings of some rows of one token shard: ``rows`` (indices into the shard) and their vectors."""

    rows: np.ndarray  # int64 row indices, in the order of ``embeddings``
    embeddings: np.ndarray  # (n, D) or (n, L, D), the stored numpy dtype
    tokens_sha256: str  # of the token shard the piece was computed from


def piece_count(rows: int, piece_rows: int) -> int:
    """How many pieces a shard of ``rows`` rows is cut into (at least one, so an empty shard is committed)."""
    return max(1, -(-rows // piece_rows))


def piece_rows_of(order: np.ndarray, piece: int, piece_rows: int) -> np.ndarray:
    """The shard rows of ``piece``: its slice of the length-sorted ``order``."""
    return order[piece * piece_rows:(piece + 1) * piece_rows]


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Rows sorted by the tokens the encoder computes for them, ties in row order (the pieces' order)."""
    return np.argsort(np.asarray(lengths), kind="stable")


def longest_first(pieces: int) -> list[int]:
    """The order pieces are handed out: the longest rows (the last pieces) first, so that the short pieces
    fill the gaps at the end and no encoder is left with one long piece while the others idle."""
    return list(range(pieces - 1, -1, -1))


def assemble_shard(out_dir: str, name: str, schema: pa.Schema, output_dtype: str,
                   pieces: Sequence[Piece]) -> dict[str, Any]:
    """Scatter ``pieces`` into row order, commit ``embeddings/<name>`` once, and return the shard's report.

    For a quantized ``output_dtype`` the pieces hold float32 vectors, quantized here (int8 / uint8 with the
    ranges in the schema's embedding field); NaN / Inf rows and norms are counted on the float vectors.

    Raises:
        ValueError: the pieces do not cover the shard's rows exactly once, or were computed from another
            version of the token shard than the one now committed.
    """
    out = output_path(out_dir)
    tokens, tokens_sha256 = read_shard_and_sha256(out / TOKENS / name)
    n = tokens.num_rows
    stale = {p.tokens_sha256 for p in pieces} - {tokens_sha256}
    if stale:
        raise ValueError(f"tokens/{name}: embedded from a token shard with sha256 {min(stale)[:12]}..., "
                         f"the committed one has {tokens_sha256[:12]}...")
    covered = np.zeros(n, dtype=np.int64)
    for piece in pieces:
        np.add.at(covered, piece.rows, 1)
    if (covered != 1).any():
        raise ValueError(f"tokens/{name}: the pieces cover {int((covered > 0).sum())} of {n} rows "
                         f"({int((covered > 1).sum())} more than once)")
    field = schema.field("embedding")
    embeddings = _empty_like(pieces, n)
    for piece in pieces:
        embeddings[piece.rows] = piece.embeddings
    columns = [tokens.column("id")]
    if "chunk" in schema.names:
        columns.append(tokens.column("chunk"))
    measured = "float32" if output_dtype in QUANTIZED else output_dtype
    bad = count_nonfinite(embeddings, measured)
    norm = _mean_norm(embeddings, bad, measured)
    if output_dtype in QUANTIZED:
        ranges = field_ranges(field)
        if output_dtype in SCALAR and ranges is None:
            raise ValueError(f"embeddings/{name}: {output_dtype} output but the schema records no quantization ranges")
        embeddings = quantize(embeddings, output_dtype, ranges)
    columns.append(embeddings_to_arrow(embeddings, field))
    fault_point("embed.before_commit")
    committed = write_shard(pa.Table.from_arrays(columns, schema=schema), out / EMBEDDINGS / name)
    fault_point("embed.after_commit")
    return {
        "name": name,
        "rows": n,
        "tokens": int(pc.sum(tokens.column("length")).as_py() or 0),
        "bytes": committed.bytes,
        "sha256": committed.sha256,
        "tokens_sha256": tokens_sha256,
        "nonfinite_rows": int(np.count_nonzero(bad)),
        "nonfinite_ids": [tokens.column("id")[int(i)].as_py() for i in np.flatnonzero(bad)[:_NONFINITE_IDS_KEPT]],
        "mean_norm": norm,
    }


def _empty_like(pieces: Sequence[Piece], n: int) -> np.ndarray:
    first = pieces[0].embeddings
    return np.zeros((n, *first.shape[1:]), dtype=first.dtype)


def _mean_norm(embeddings: np.ndarray, bad: np.ndarray, output_dtype: str) -> float | None:
    """Mean L2 norm of the finite rows (per-token output: of every position's vector)."""
    good = embeddings[bad == 0]
    if not len(good):
        return None
    if output_dtype == "bfloat16":  # bit patterns: widen to float32 by shifting into the high half
        good = bfloat16_bits_to_float32(good)
    vectors = good.reshape(-1, good.shape[-1]).astype(np.float32)
    return float(np.linalg.norm(vectors, axis=1).mean())
