"""Drawing the PCA scatter: matplotlib (Agg, no pyplot state), fonts that cover the labels' scripts,
colours by category, and labels placed so that they do not overlap.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.ops import PLOT_LABELS

LABEL_CHARS = 30
MAX_CATEGORIES = 10  # colours in a legend; the rest of the categories share grey as "other"
# Fonts tried after DejaVu Sans (matplotlib's default, which has no CJK glyphs), first found first.
FALLBACK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans SC",
    "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN",
    "Noto Sans SC", "Noto Sans JP", "Noto Sans KR", "Noto Sans Arabic", "Noto Sans Hebrew", "Noto Sans Thai",
    "Noto Sans Devanagari", "Noto Sans Bengali", "Noto Sans Tamil", "Unifont")


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
           title: str, color_by: str | None = None, color_values: list[Any] | None = None, labels: int = PLOT_LABELS,
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
