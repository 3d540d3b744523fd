"""Rendering an :func:`~pipeline.ops.inspect.inspect_path` report for a terminal: tables of shards, token
grids that line the decoded text up with the ids and mask, embeddings' shape and first values.

Widths are display columns (East Asian wide characters take two), so the grids stay aligned.
"""

from __future__ import annotations

import textwrap
import unicodedata
from typing import Any

TOKEN_WIDTH = 12  # display columns one token string may take in the text view


# ---------------------------------------------------------------- rendering for a terminal


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: wide (CJK) characters count 2, combining marks 0."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def fit(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` columns, ending in "…" when cut."""
    if display_width(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = display_width(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))


def _printable(token: str) -> str:
    """A token string with its whitespace and control characters made visible."""
    out = []
    for ch in token:
        if ch == " ":
            out.append("␠")
        elif ch in "\n\r\t" or unicodedata.category(ch) == "Cc":
            out.append(ch.encode("unicode_escape").decode())
        else:
            out.append(ch)
    return "".join(out)


def _token_cells(row: dict[str, Any], max_cells: int) -> list[tuple[str, str, str, str]]:
    """(position, token, id, mask) cells; runs of padding collapse into one cell, long rows into "…"."""
    ids, mask = row["input_ids"], row["attention_mask"]
    tokens = row["tokens"] or ["?"] * len(ids)
    mask = mask if mask is not None else [1] * len(ids)
    cells, i = [], 0
    while i < len(ids):
        j = i
        while not mask[i] and j + 1 < len(ids) and not mask[j + 1]:
            j += 1
        if j - i >= 1:  # a run of padding
            same = len(set(ids[i:j + 1])) == 1
            cells.append((f"{i}-{j}", fit(_printable(tokens[i]), TOKEN_WIDTH - 4) + f"×{j - i + 1}" if same else "pad",
                          str(ids[i]) if same else "…", "0"))
        else:
            cells.append((str(i), fit(_printable(tokens[i]), TOKEN_WIDTH), str(ids[i]), str(mask[i])))
        i = j + 1
    if len(cells) > max_cells:
        hidden = len(cells) - (max_cells - 1)
        cells = cells[:max_cells - 3] + [("…", f"+{hidden}", "…", "…")] + cells[-2:]
    return cells


def _token_grid(row: dict[str, Any], width: int, max_cells: int, indent: str) -> list[str]:
    labels = ("pos", "token", "id", "mask")
    label_width = max(map(len, labels)) + 1
    cells = _token_cells(row, max_cells)
    lines: list[str] = []
    block: list[tuple[tuple[str, ...], int]] = []
    used = len(indent) + label_width

    def flush() -> None:
        for k, label in enumerate(labels):
            lines.append((indent + label.ljust(label_width) + " ".join(_pad(c[k], w) for c, w in block)).rstrip())

    for cell in cells:
        w = max(display_width(part) for part in cell)
        if block and used + w + 1 > width:
            flush()
            block, used = [], len(indent) + label_width
        block.append((cell, w))
        used += w + 1
    if block:
        flush()
    return lines


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def _text_lines(label: str, text: str | None, width: int, indent: str, max_lines: int = 2) -> list[str]:
    if text is None:
        return []
    flat = " ".join(unicodedata.normalize("NFC", text).split())  # uncased BERT decodes Hangul as jamo
    lines = textwrap.wrap(flat, width=max(20, width - len(indent) - len(label) - 2)) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = fit(lines[-1] + " …", width - len(indent) - len(label) - 2)
    pad = " " * (len(label) + 2)
    return [indent + (f"{label}: " if k == 0 else pad) + fit(line, width - len(indent) - len(pad))
            for k, line in enumerate(lines)]


def _format_shard(detail: dict[str, Any], width: int, max_cells: int) -> list[str]:
    lines = [f"{detail['path']}: {detail['stage']} shard, {detail['rows']:,} rows, {_bytes(detail['bytes'])}"
             + ("" if detail["committed"] == "no manifest" else f", committed: {detail['committed']}")]
    lines.append("  schema:")
    name_width = max(len(f["name"]) for f in detail["schema"])
    for field in detail["schema"]:
        meta = ", ".join(f"{k}={fit(v, 40)}" for k, v in field["metadata"].items())
        lines.append(f"    {field['name'].ljust(name_width)}  {field['type']}" + (f"  [{meta}]" if meta else ""))
    if detail["stage"] == "embeddings":
        emb = detail["embedding"]
        lines.append(f"  embedding: shape {tuple(emb['shape'])}, stored as {emb['dtype']}")
    for row in detail["rows_shown"]:
        lines.append("")
        head = f"  row {row['row']}  id={row['id']}"
        if detail["stage"] == "tokens":
            positions = len(row["input_ids"])
            real = sum(row["attention_mask"]) if row["attention_mask"] is not None else positions
            head += f"  {real} real tokens of {positions} positions"
            if "chunk" in row:
                head += f"  chunk {row['chunk']}"
            lines.append(head)
            lines += _text_lines("text", row["text"], width, "    ")
            lines += _token_grid(row, width, max_cells, "    ")
        else:
            norm_label = "norm" if len(detail["embedding"]["shape"]) == 2 else "mean token norm"
            lines.append(head + f"  {norm_label} {row['norm']:.4f}")
            values = "[" + ", ".join(f"{v:+.4f}" for v in row["values"]) + ", …]"
            first = "first values" if len(detail["embedding"]["shape"]) == 2 else "position 0"
            lines.append(f"    {first}: {values}")
            lines += _text_lines("text", row.get("text"), width, "    ")
            if row.get("token_id_matches") is False:
                lines.append("    warning: the token shard's row has another id")
    return lines


def _format_stage(summary: dict[str, Any]) -> list[str]:
    shards = summary["shards"]
    count = f"{len(shards)} shard" + ("" if len(shards) == 1 else "s")
    lines = [f"{summary['dir']}: {count}, {summary['rows']:,} rows, {_bytes(summary['bytes'])}"]
    name_width = max([len("shard")] + [len(s["name"]) for s in shards])
    lines.append(f"  {'shard'.ljust(name_width)}  {'rows':>9}  {'bytes':>13}  committed")
    for s in shards:
        rows = "?" if s["rows"] is None else f"{s['rows']:,}"
        size = "?" if s["bytes"] is None else f"{s['bytes']:,}"
        lines.append(f"  {s['name'].ljust(name_width)}  {rows:>9}  {size:>13}  {s['committed']}")
    return lines


def format_report(report: dict[str, Any], width: int = 100, max_cells: int = 40) -> str:
    """The report as text for a terminal ``width`` columns wide (80 to 120 read well)."""
    lines = []
    if report["out_dir"]:
        counts = report.get("counts") or {}
        line = f"output {report['out_dir']}: status {report.get('status', 'unknown (no manifest.json)')}"
        if counts:
            line += (f"; {counts.get('rows_in', 0):,} rows in, {counts.get('rows_out', 0):,} out, "
                     f"{counts.get('quarantined', 0):,} quarantined")
        lines.append(line)
    if report.get("tokenizer"):
        lines.append(f"tokenizer: {report['tokenizer']}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    for summary in report["stages"]:
        lines += ([""] if lines else []) + _format_stage(summary)
    for detail in report["shards"]:
        lines += ([""] if lines else []) + _format_shard(detail, width, max_cells)
    return "\n".join(lines)
