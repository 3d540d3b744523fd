"""A 2-D PCA picture of a sample of an output's embeddings.

:func:`load_sample` draws a seeded sample of rows across the committed embedding shards (per-token
output mean-pooled over the real tokens), :func:`pca_2d` projects it with a centred SVD,
:func:`spread_order` picks far-apart points to label, and :func:`render` draws the scatter with
matplotlib (Agg, no pyplot state) and places labels so that they do not overlap.
:func:`plot_embeddings` does all of it for ``embedpipe plot``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.ops import PLOT_LABELS, PLOT_SAMPLE
from pipeline.ops.plot_render import find_fonts, label_text, render
from pipeline.output.manifest import load_manifest
from pipeline.output.shards import read_shard
from pipeline.output.storage import output_path

if TYPE_CHECKING:
    from pipeline.ops.inspect import Decoder

POOL_ROWS = 256  # per-token rows pooled at a time: 256 x 77 x 768 float32 is 60 MB
SOURCE = "source"  # --color-by source: the input file, from the row id


@dataclass
class Sample:
    """The sampled rows: where they are, their vectors, and what labels and colours need."""

    rows: np.ndarray  # global row numbers, in shard order
    ids: list[str]
    vectors: np.ndarray  # (n, D) float32
    content_ids: list[list[int]]  # token ids to decode for labels (empty when there is no token shard)
    color_values: list[Any] | None
    total: int
    notes: list[str] = field(default_factory=list)


@dataclass
class PlotResult:
    """What ``plot_embeddings`` drew."""

    path: str
    rows: np.ndarray
    ids: list[str]
    coords: np.ndarray  # (n, 2) PCA coordinates
    explained: np.ndarray  # explained variance ratio of PC1 and PC2
    total: int
    labels: dict[int, str]  # sample position -> label text drawn
    notes: list[str]


def _source_of(ids: list[str], id_column: str | None) -> tuple[list[str], str | None]:
    """The source of each row: the file of a ``<file>:<position>`` id, else the id without its trailing number."""
    if id_column is None:
        return [i.rsplit(":", 1)[0] for i in ids], None
    note = (f"ids come from input.id_column {id_column!r}, not from the input file: "
            "--color-by source groups rows by id with its trailing number removed")
    return [re.sub(r"[-_:./#]?\d+$", "", i) or i for i in ids], note


def load_sample(out_dir: str | Path, sample: int = PLOT_SAMPLE, seed: int = 0, color_by: str | None = None,
                decoder: Decoder | None = None) -> Sample:
    """A seeded, reproducible sample of ``sample`` rows over the committed embedding shards of ``out_dir``.

    Per-token outputs (N, L, D) are mean-pooled over the real tokens (attention mask of the token shard),
    or over all positions when the mask is not stored.

    Raises:
        ConfigError: not an output directory, no committed embeddings, or an unknown ``color_by`` column.
    """
    out = output_path(out_dir)
    manifest = load_manifest(out)
    if manifest is None:
        raise ConfigError(f"{out_dir}: not an embedpipe output directory (no manifest.json)")
    records = manifest.get("stages", {}).get("embeddings", {}).get("shards", {})
    shards = [(name, rec["rows"]) for name, rec in sorted(records.items()) if (out / "embeddings" / name).is_file()]
    total = sum(rows for _, rows in shards)
    if total < 2:
        raise ConfigError(f"{out_dir}: {total} committed embedding rows; a PCA needs at least 2 "
                          "(run `embedpipe embed` first)")
    if sample < 2:
        raise ConfigError(f"--sample {sample}: a PCA needs at least 2 rows")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(sample, total), replace=False))
    notes: list[str] = []
    ids: list[str] = []
    vectors, content_ids, colors = [], [], []
    start = 0
    for name, rows in shards:
        local = chosen[(chosen >= start) & (chosen < start + rows)] - start
        start += rows
        if not len(local):
            continue
        table = read_shard(out / "embeddings" / name).take(local)
        token_path = out / "tokens" / name
        tokens = read_shard(token_path).take(local) if token_path.is_file() else None
        pooled, unmasked = _pooled(table, tokens)
        vectors += pooled
        if unmasked:
            notes.append(f"{name}: no attention mask stored: per-token embeddings averaged over all positions")
        ids += table.column("id").to_pylist()
        if tokens is not None and decoder is not None and decoder.tokenizer is not None:
            masks = tokens.column("attention_mask").to_pylist() if "attention_mask" in tokens.column_names else None
            for k, row in enumerate(tokens.column("input_ids").to_pylist()):
                content_ids.append(decoder.content_ids(row, masks[k] if masks else None))
        else:
            content_ids += [[] for _ in range(len(local))]
        if color_by and color_by != SOURCE:
            colors += _column_values(color_by, table, tokens)
    if color_by == SOURCE:
        id_column = (manifest.get("config", {}).get("input") or {}).get("id_column")
        colors, note = _source_of(ids, id_column)
        notes += [note] if note else []
    return Sample(chosen, ids, np.concatenate(vectors), content_ids, colors if color_by else None, total, notes)


def _pooled(table: Any, tokens: Any) -> tuple[list[np.ndarray], bool]:
    """The rows' vectors, POOL_ROWS at a time; per-token output pooled over the mask (whether it was not)."""
    from pipeline.data.reader import arrow_to_tensor
    from pipeline.output.embedding_format import arrow_to_numpy, decode_embeddings, field_dims
    from pipeline.output.quantize import QUANTIZED

    masked = tokens is not None and "attention_mask" in tokens.column_names
    vectors, unmasked = [], False
    for at in range(0, table.num_rows, POOL_ROWS):
        part = table.slice(at, POOL_ROWS)
        column = part.schema.field("embedding")
        if field_dims(column)[1] in QUANTIZED:  # int8 / uint8 through their ranges, bits as -1 / +1
            emb = decode_embeddings(arrow_to_numpy(part.column("embedding"), column), column, to_float=True)
        else:
            emb = arrow_to_tensor(part.column("embedding"), column).float().numpy()
        if emb.ndim == 3 and masked:
            mask = np.asarray(tokens.column("attention_mask").slice(at, POOL_ROWS).to_pylist(), np.float32)[..., None]
            emb = (emb * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
        elif emb.ndim == 3:
            emb, unmasked = emb.mean(1), True
        vectors.append(emb.astype(np.float32))
    return vectors, unmasked


def _column_values(column: str, embeddings: Any, tokens: Any) -> list[Any]:
    for table in (tokens, embeddings):
        if table is not None and column in table.column_names:
            values = table.column(column).to_pylist()
            if values and isinstance(values[0], (list, dict)):
                raise ConfigError(f"--color-by {column}: a list column cannot colour points; "
                                  "use a scalar column such as length, chunk or id")
            return values
    names = sorted(set((tokens.column_names if tokens is not None else []) + embeddings.column_names) - {"embedding"})
    raise ConfigError(f"--color-by {column}: no such column; choose {SOURCE} or one of {', '.join(names)}")


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components of ``vectors`` (centred SVD) and their explained variance ratio.

    Signs are fixed so that each component's largest loading is positive, as scikit-learn does, so a
    rerun draws the same picture.
    """
    x = np.asarray(vectors, dtype=np.float64)
    x = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, len(s))
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
    signs[signs == 0] = 1.0
    coords = np.zeros((len(x), 2))
    coords[:, :k] = u[:, :k] * s[:k] * signs
    variance = s**2
    explained = np.zeros(2)
    if variance.sum() > 0:
        explained[:k] = variance[:k] / variance.sum()
    return coords, explained


def spread_order(coords: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` points in farthest-point order (each the farthest from those before it).

    Starts at the point nearest the middle; axes are scaled to their range, as the plot shows them.
    """
    if count <= 0 or not len(coords):
        return []
    span = np.ptp(coords, axis=0)
    scaled = (coords - coords.min(axis=0)) / np.where(span > 0, span, 1.0)
    first = int(np.linalg.norm(scaled - np.median(scaled, axis=0), axis=1).argmin())
    order, distance = [first], np.linalg.norm(scaled - scaled[first], axis=1)
    while len(order) < min(count, len(coords)):
        nxt = int(distance.argmax())
        if distance[nxt] <= 0:
            break
        order.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(scaled - scaled[nxt], axis=1))
    return order


# ---------------------------------------------------------------- fonts and label text


# ---------------------------------------------------------------- drawing


def plot_embeddings(out_dir: str | Path, out_path: str | Path, *, sample: int = PLOT_SAMPLE, seed: int = 0,
                    color_by: str | None = None, labels: int = PLOT_LABELS,
                    size: tuple[float, float] = (12.0, 9.0), dpi: int = 100) -> PlotResult:
    """Sample, project and draw an output's embeddings to ``out_path`` (PNG, or any format by its suffix).

    Raises:
        ConfigError: see :func:`load_sample`; or ``out_path``'s directory is missing or its format unknown.
    """
    from pipeline.ops.inspect import load_decoder

    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ConfigError(f"--out {out_path}: directory {out_path.parent} does not exist")
    out = output_path(out_dir)
    decoder = load_decoder(load_manifest(out)) if labels else None
    drawn = load_sample(out, sample, seed, color_by, decoder)
    notes = list(drawn.notes)
    if decoder is not None and decoder.note:
        notes.append(decoder.note)
    coords, explained = pca_2d(drawn.vectors)
    fonts = find_fonts()
    candidates, scripts = [], {}
    unknown = decoder.tokenizer.unk_token if decoder is not None and decoder.tokenizer is not None else None
    for position in spread_order(coords, labels * 6):
        ids = drawn.content_ids[position]
        if not ids:
            continue
        text, script = label_text(decoder.tokenizer.decode(ids), drawn.ids[position], fonts, unknown)
        candidates.append((position, text))
        if script:
            scripts[position] = script
    title = f"{out}: PCA of {len(drawn.rows):,} of {drawn.total:,} embeddings (seed {seed})"
    try:
        placed = render(coords, explained, candidates, out_path, title=title, color_by=color_by,
                        color_values=drawn.color_values, labels=labels, fonts=fonts, size=size, dpi=dpi)
    except ValueError as exc:  # matplotlib: unknown image format
        raise ConfigError(f"--out {out_path}: {exc}") from None
    missing = Counter(scripts[p] for p in placed if p in scripts)
    if missing:
        notes.append(f"no installed font draws all of the text of {sum(missing.values())} labels "
                     f"({', '.join(f'{s} {n}' for s, n in missing.most_common())}): they show the row id "
                     "(or U+FFFD for a few characters) instead; font packages such as fonts-noto-cjk (CJK, Hangul) "
                     "or fonts-noto-core fix that")
    return PlotResult(str(out_path), drawn.rows, drawn.ids, coords, explained, drawn.total, placed, notes)
