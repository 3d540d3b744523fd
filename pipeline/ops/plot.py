"""A 2-D PCA picture of a sample of an output's embeddings.

:func:`load_sample` draws a seeded sample of rows across the committed embedding shards (per-token
output mean-pooled over the real tokens), :func:`pca_2d` projects it with a centred SVD,
:func:`spread_order` picks far-apart points to label, and :func:`render` draws the scatter with
matplotlib (Agg, no pyplot state) and places labels so that they do not overlap.
:func:`plot_embeddings` does all of it for ``embedpipe plot``.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.output.manifest import load_manifest
from pipeline.output.shards import read_shard
from pipeline.output.storage import output_path

if TYPE_CHECKING:
    from pipeline.ops.inspect import Decoder

DEFAULT_SAMPLE = 2000
DEFAULT_LABELS = 40
POOL_ROWS = 256  # per-token rows pooled at a time: 256 x 77 x 768 float32 is 60 MB
LABEL_CHARS = 30
MAX_CATEGORIES = 10  # colours in a legend; the rest of the categories share grey as "other"
SOURCE = "source"  # --color-by source: the input file, from the row id
# Fonts tried after DejaVu Sans (matplotlib's default, which has no CJK glyphs), first found first.
FALLBACK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans SC",
    "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN",
    "Noto Sans SC", "Noto Sans JP", "Noto Sans KR", "Noto Sans Arabic", "Noto Sans Hebrew", "Noto Sans Thai",
    "Noto Sans Devanagari", "Noto Sans Bengali", "Noto Sans Tamil", "Unifont",
)


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


def load_sample(out_dir: str | Path, sample: int = DEFAULT_SAMPLE, seed: int = 0, color_by: str | None = None,
                decoder: Decoder | None = None) -> Sample:
    """A seeded, reproducible sample of ``sample`` rows over the committed embedding shards of ``out_dir``.

    Per-token outputs (N, L, D) are mean-pooled over the real tokens (attention mask of the token shard),
    or over all positions when the mask is not stored.

    Raises:
        ConfigError: not an output directory, no committed embeddings, or an unknown ``color_by`` column.
    """
    from pipeline.data.reader import arrow_to_tensor

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
    start, unmasked = 0, None
    for name, rows in shards:
        local = chosen[(chosen >= start) & (chosen < start + rows)] - start
        start += rows
        if not len(local):
            continue
        table = read_shard(out / "embeddings" / name).take(local)
        token_path = out / "tokens" / name
        tokens = read_shard(token_path).take(local) if token_path.is_file() else None
        masked = tokens is not None and "attention_mask" in tokens.column_names
        for at in range(0, len(local), POOL_ROWS):
            part = table.slice(at, POOL_ROWS)
            emb = arrow_to_tensor(part.column("embedding"), part.schema.field("embedding")).float().numpy()
            if emb.ndim == 3 and masked:
                mask = tokens.column("attention_mask").slice(at, POOL_ROWS).to_pylist()
                mask = np.asarray(mask, dtype=np.float32)[:, :, None]
                emb = (emb * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
            elif emb.ndim == 3:
                emb = emb.mean(1)
                unmasked = name
            vectors.append(emb.astype(np.float32))
        if unmasked == name:
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


@dataclass
class Fonts:
    """Font families matplotlib falls back through, and the code points they cover."""

    families: list[str]
    covered: set[int]


def find_fonts() -> Fonts:
    """DejaVu Sans followed by the installed fonts of FALLBACK_FONTS (CJK and others)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    families = ["DejaVu Sans"] + [name for name in FALLBACK_FONTS if name in installed]
    covered: set[int] = set()
    for name in families:
        # The regular face: the light and oblique ones have fewer glyphs.
        path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
        covered |= set(FT2Font(path).get_charmap())
    return Fonts(families, covered)


def label_text(text: str, row_id: str, fonts: Fonts, unknown: str | None) -> tuple[str, str | None]:
    """A short label (LABEL_CHARS) for a point, and the script whose glyphs no font has, if any.

    Unknown tokens show as U+FFFD. A text more than a quarter of whose letters no installed font can draw
    is labelled ``[SCRIPT] <row id>`` instead; fewer missing letters become U+FFFD.
    """
    if unknown:
        text = text.replace(unknown, "\ufffd")
    text = " ".join(unicodedata.normalize("NFC", text).split())
    letters = [ch for ch in text if unicodedata.category(ch)[0] in "LN"]
    missing = [ch for ch in text if not ch.isspace() and ord(ch) not in fonts.covered]
    script = unicodedata.name(missing[0], "UNKNOWN").split()[0] if missing else None
    if script and len(missing) * 4 > len(letters):
        short_id = row_id if len(row_id) <= LABEL_CHARS else "…" + row_id[-(LABEL_CHARS - 1):]
        return f"[{script}] {short_id}", script
    text = "".join("\ufffd" if ch in missing else ch for ch in text)
    text = re.sub(r"\ufffd(?:\s*\ufffd)+", "\ufffd", text)  # a run of them says no more than one
    return (text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1].rstrip() + "…"), script


# ---------------------------------------------------------------- drawing


def _colours(values: list[Any] | None) -> tuple[str, Any]:
    """("none" | "categories" | "numbers", data) for the colour column."""
    if values is None:
        return "none", None
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    counts = Counter(values)
    if numeric and len(counts) > MAX_CATEGORIES:
        return "numbers", np.asarray(values, dtype=np.float64)
    top = [value for value, _ in counts.most_common(MAX_CATEGORIES)]
    if len(counts) > MAX_CATEGORIES:
        top = top[:MAX_CATEGORIES - 1]
    return "categories", (top, counts)


def render(coords: np.ndarray, explained: np.ndarray, candidates: list[tuple[int, str]], out_path: str | Path, *,
           title: str, color_by: str | None = None, color_values: list[Any] | None = None, labels: int = DEFAULT_LABELS,
           fonts: Fonts | None = None, size: tuple[float, float] = (12.0, 9.0), dpi: int = 100) -> dict[int, str]:
    """Draw the scatter to ``out_path`` and return the labels placed (sample position -> text).

    ``candidates`` are (position, text) pairs in the order to try; a label is placed only where it overlaps
    no label placed before and stays inside the axes, so at most ``labels`` of them appear.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fonts = fonts or find_fonts()
    kind, data = _colours(color_values)
    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    right = {"categories": 0.80, "numbers": 0.93}.get(kind, 0.97)  # room for the legend or the colour bar label
    fig.subplots_adjust(left=0.07, right=right, bottom=0.08, top=0.92)
    ax = fig.add_subplot()
    x, y = coords[:, 0], coords[:, 1]
    point = {"s": 14, "alpha": 0.7, "linewidths": 0}
    if kind == "none":
        ax.scatter(x, y, color="#3a6ea5", **point)
    elif kind == "numbers":
        drawn = ax.scatter(x, y, c=data, cmap="viridis", **point)
        fig.colorbar(drawn, ax=ax, label=color_by, fraction=0.04, pad=0.01)
    else:
        top, counts = data
        keep = {value: k for k, value in enumerate(top)}
        palette = [f"C{k}" for k in range(10)]
        other = np.array([v not in keep for v in color_values])
        if other.any():
            ax.scatter(x[other], y[other], color="#b0b0b0",
                       label=f"other ({sum(counts[v] for v in counts if v not in keep):,})", **point)
        for value, k in keep.items():
            mask = np.array([v == value for v in color_values])
            ax.scatter(x[mask], y[mask], color=palette[k % 10], label=f"{_short(str(value))} ({counts[value]:,})",
                       **point)
        handles, names = ax.get_legend_handles_labels()
        if other.any():  # "other" last in the legend
            handles, names = handles[1:] + handles[:1], names[1:] + names[:1]
        fig.legend(handles, names, title=color_by, loc="upper left", bbox_to_anchor=(right + 0.01, 0.92),
                   fontsize=8, title_fontsize=9, markerscale=1.5, frameon=False)
    ax.set_xlabel(f"PC1 ({explained[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.1%} of variance)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, color="#eeeeee", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.margins(0.04)
    ax.set_xlim(ax.get_xlim())  # freeze the limits: label placement below works in display space
    ax.set_ylim(ax.get_ylim())

    placed = _place_labels(fig, ax, coords, candidates, labels, fonts)
    if placed:
        at = np.array(list(placed))
        ax.scatter(x[at], y[at], facecolors="none", edgecolors="black", s=30, linewidths=0.7)
    with warnings.catch_warnings():
        # Any glyph still missing is drawn as a box; labels that would be all boxes were replaced above.
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        fig.savefig(str(out_path), dpi=dpi)
    return placed


def _short(text: str, chars: int = 28) -> str:
    return text if len(text) <= chars else text[:chars - 1] + "…"


def _place_labels(fig: Any, ax: Any, coords: np.ndarray, candidates: list[tuple[int, str]], labels: int,
                  fonts: Fonts) -> dict[int, str]:
    """Greedy placement: each label beside its point, on the side toward the centre first, never overlapping."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    centre = frame.x0 + frame.width / 2
    boxes: list[Any] = []
    placed: dict[int, str] = {}
    for position, text in candidates:
        if len(placed) >= labels:
            break
        px, _ = ax.transData.transform(coords[position])
        sides = [(-5, "right"), (5, "left")] if px > centre else [(5, "left"), (-5, "right")]
        for (dx, align), dy in [(s, dy) for s in sides for dy in (3, -3)]:
            note = ax.annotate(
                text, coords[position], xytext=(dx, dy), textcoords="offset points", ha=align,
                va="bottom" if dy > 0 else "top", fontsize=7.5, family=fonts.families, parse_math=False,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.75, "linewidth": 0},
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
                box = note.get_window_extent(renderer).expanded(1.08, 1.25)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in boxes):
                boxes.append(box)
                placed[position] = text
                break
            note.remove()
    return placed


def plot_embeddings(out_dir: str | Path, out_path: str | Path, *, sample: int = DEFAULT_SAMPLE, seed: int = 0,
                    color_by: str | None = None, labels: int = DEFAULT_LABELS,
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
