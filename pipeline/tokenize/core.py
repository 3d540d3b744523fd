"""Pure tokenization: texts in, an Arrow table of token rows out.

The Rust ``tokenizers`` backend of the ``transformers`` fast tokenizer does the
tokenizing (so special tokens are exactly the library's). Truncation: with
chunking, the backend's own overflowing windows; without, when the
post-processor only puts special tokens around the text (BERT, RoBERTa, GPT-2,
CLIP...), whole encodings are cut here the way the backend would cut them, which
spares it building windows only to count them. Padding is done here in numpy,
which is what the backend would do (pad id, type id 0, mask 0, on the padding
side) without building a Python list per padded position.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np
import pyarrow as pa
from tokenizers import Encoding, Tokenizer

from pipeline.tokenize.pack import packed_schema

# Bucket edges of the histogram of untruncated lengths (max_length is added to them).
_HISTOGRAM_EDGES = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


@dataclass(frozen=True)
class TokenizeSpec:
    """Everything a worker needs to tokenize, resolved and checked on the driver (picklable)."""

    tokenizer_json: str
    max_length: int | None
    padding: Literal["max_length", "longest", "none"]
    padding_side: Literal["right", "left"]
    truncation: bool
    truncation_side: Literal["right", "left"]
    add_special_tokens: bool
    pad_id: int | None
    stride: int | None
    with_token_type_ids: bool
    id_dtype: Literal["uint16", "int32"]
    num_special_tokens: int
    # True when the post-processor gives every token of a single sequence type id 0 (BERT, RoBERTa,
    # GPT-2, CLIP...): the type ids are then known without reading them back from each encoding.
    single_type_ids_zero: bool = False
    vocab_size: int = 0  # with added tokens: the encoder's embedding table must be at least this large
    # (before, after): how many special tokens the post-processor puts around a single sequence, when it
    # only adds tokens there. Known, a text is encoded whole and its row cut here, which is what the
    # backend's truncation gives without building the overflowing windows it would then throw away.
    special_tokens_around: tuple[int, int] | None = None
    # Packing (LM pretraining, see pipeline.tokenize.pack): documents are tokenized whole (no truncation, no
    # padding) and cut into max_length blocks, each document followed by pack_separator_id (None: nothing).
    pack: bool = False
    pack_separator_id: int | None = None
    pack_remainder: Literal["pad", "drop"] = "pad"
    # The encoder's prompt (pipeline.tokenize.st_config): prefixed to every text before tokenization, so
    # truncation cuts prompt + text to max_length as sentence-transformers does. prompt_tokens: its length
    # as sentence-transformers counts it (the prompt tokenized alone, less a trailing special token), what
    # a model with include_prompt false leaves out of pooling.
    prompt: str | None = None
    prompt_tokens: int = 0
    # Characters of each text kept before tokenizing (model2vec cuts texts to max_length x its median token
    # length first; pipeline.tokenize.static_models). None: the whole text.
    max_chars: int | None = None

    @property
    def tokenizer_sha256(self) -> str:
        """The tokenizer's identity in the manifest: sha256 of its serialized ``tokenizer.json``."""
        return hashlib.sha256(self.tokenizer_json.encode()).hexdigest()

    @property
    def reads_type_ids(self) -> bool:
        """Whether type ids must be read back from each encoding (they are stored and not all 0)."""
        return self.with_token_type_ids and not self.single_type_ids_zero

    @property
    def cuts_rows_itself(self) -> bool:
        """Whether truncation is done here on whole encodings rather than by the backend (see above)."""
        return (self.truncation and self.stride is None and self.special_tokens_around is not None
                and self.max_length is not None and self.max_length > sum(self.special_tokens_around))

    @property
    def fixed_width(self) -> int | None:
        """Row width when every row has the same length known in advance, else None."""
        if self.padding == "max_length" and self.truncation:
            return self.max_length
        return None

    def histogram_edges(self) -> list[int]:
        edges = set(_HISTOGRAM_EDGES)
        if self.max_length:
            edges.update((self.max_length, self.max_length + 1))
        return sorted(edges)


@dataclass
class TokenRows:
    """Unpadded token rows: flat id/type-id arrays cut by ``lengths``, one entry per output row."""

    ids: list[str]
    flat_ids: np.ndarray
    lengths: np.ndarray
    flat_type_ids: np.ndarray | None
    chunk: np.ndarray | None
    untruncated: np.ndarray  # per source text: its length in tokens had nothing been cut

    @staticmethod
    def concat(parts: list[TokenRows]) -> TokenRows:
        def cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            return None if arrays[0] is None else np.concatenate(arrays)

        return TokenRows(
            ids=list(chain.from_iterable(p.ids for p in parts)),
            flat_ids=np.concatenate([p.flat_ids for p in parts]),
            lengths=np.concatenate([p.lengths for p in parts]),
            flat_type_ids=cat([p.flat_type_ids for p in parts]),
            chunk=cat([p.chunk for p in parts]),
            untruncated=np.concatenate([p.untruncated for p in parts]),
        )


@functools.lru_cache(maxsize=4)
def get_tokenizer(spec: TokenizeSpec) -> Tokenizer:
    """Build the backend tokenizer for ``spec`` once per process, truncation set, padding off."""
    tokenizer = Tokenizer.from_str(spec.tokenizer_json)
    tokenizer.no_padding()
    if spec.truncation and not spec.cuts_rows_itself:
        tokenizer.enable_truncation(
            spec.max_length, stride=spec.stride or 0, strategy="longest_first", direction=spec.truncation_side
        )
    else:
        tokenizer.no_truncation()
    return tokenizer


def _overflow_rows(encoding: Encoding, spec: TokenizeSpec) -> tuple[list[Encoding], int]:
    """The windows past the first of a truncated text, and its untruncated length in tokens."""
    overflow = encoding.overflowing
    # Each overflowing window repeats `stride` tokens of the previous one and carries its own special tokens.
    untruncated = len(encoding) + sum(len(o) - spec.num_special_tokens - (spec.stride or 0) for o in overflow)
    return overflow, untruncated


def _cut(values: list[int], spec: TokenizeSpec) -> list[int]:
    """A whole post-processed sequence cut to max_length as the backend truncates: the content is cut on
    the truncation side and the special tokens around it are kept."""
    before, after = spec.special_tokens_around
    keep = spec.max_length - before - after
    end = len(values) - after
    content = values[before:before + keep] if spec.truncation_side == "right" else values[end - keep:end]
    return values[:before] + content + values[end:]


def _cut_rows(spec: TokenizeSpec, encodings: list[Encoding]) -> tuple[list[list[int]], list[list[int]] | None,
                                                                     np.ndarray]:
    """Ids (and type ids if needed) of whole encodings, cut to max_length; and their untruncated lengths."""
    id_lists = [e.ids for e in encodings]
    untruncated = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    type_lists = [e.type_ids for e in encodings] if spec.reads_type_ids else None
    for i in np.flatnonzero(untruncated > spec.max_length).tolist():
        id_lists[i] = _cut(id_lists[i], spec)
        if type_lists is not None:
            type_lists[i] = _cut(type_lists[i], spec)
    return id_lists, type_lists, untruncated


def tokenize_texts(spec: TokenizeSpec, ids: list[str], texts: list[str]) -> TokenRows:
    """Tokenize ``texts`` with truncation (and chunking if ``spec.stride`` is set), unpadded."""
    tokenizer = get_tokenizer(spec)
    if spec.prompt:
        texts = [spec.prompt + text for text in texts]
    if spec.max_chars is not None:
        texts = [text[:spec.max_chars] for text in texts]
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=spec.add_special_tokens)
    if spec.cuts_rows_itself:
        id_lists, type_lists, untruncated = _cut_rows(spec, encodings)
        return _token_rows(spec, list(ids), id_lists, type_lists, None, untruncated)
    untruncated = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    rows, row_ids, chunk = encodings, ids, None
    if spec.truncation:
        # Only a text whose first window is full can have been truncated: look at those alone.
        cut = np.flatnonzero(untruncated >= spec.max_length)
        windows: dict[int, list[Encoding]] = {}
        for i in cut.tolist():
            windows[i], untruncated[i] = _overflow_rows(encodings[i], spec)
        if spec.stride is not None:
            rows, row_ids, chunks = [], [], []
            for i, encoding in enumerate(encodings):
                extra = windows.get(i, ())
                rows.append(encoding)
                rows.extend(extra)
                row_ids.extend([ids[i]] * (1 + len(extra)))
                chunks.extend(range(1 + len(extra)))
            chunk = np.asarray(chunks, dtype=np.int32)
    id_lists = [row.ids for row in rows]
    type_lists = [row.type_ids for row in rows] if spec.reads_type_ids else None
    return _token_rows(spec, list(row_ids), id_lists, type_lists, chunk, untruncated)


def _token_rows(spec: TokenizeSpec, row_ids: list[str], id_lists: list[list[int]], type_lists: list[list[int]] | None,
                chunk: np.ndarray | None, untruncated: np.ndarray) -> TokenRows:
    """Flatten per-row id (and type id) lists into a :class:`TokenRows`."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    total = int(lengths.sum())
    flat_ids = np.fromiter(chain.from_iterable(id_lists), dtype=spec.id_dtype, count=total)
    flat_type_ids = None
    if spec.with_token_type_ids:
        if type_lists is None:  # every type id is 0
            flat_type_ids = np.zeros(total, dtype=np.int8)
        else:
            flat_type_ids = np.fromiter(chain.from_iterable(type_lists), dtype=np.int8, count=total)
    return TokenRows(row_ids, flat_ids, lengths, flat_type_ids, chunk, untruncated)


def pad_flat(flat: np.ndarray, lengths: np.ndarray, widths: np.ndarray, pad_value: int, side: str) -> np.ndarray:
    """Pad each row of a flat ragged array to its width on ``side``; rows already wider stay as they are."""
    widths = np.maximum(widths, lengths)
    out = np.full(int(widths.sum()), pad_value, dtype=flat.dtype)
    new_starts = np.concatenate(([0], np.cumsum(widths)[:-1])) if len(widths) else widths
    old_starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else lengths
    shift = new_starts + (widths - lengths if side == "left" else 0)
    within = np.arange(len(flat)) - np.repeat(old_starts, lengths)
    out[np.repeat(shift, lengths) + within] = flat
    return out


def row_widths(spec: TokenizeSpec, lengths: np.ndarray) -> np.ndarray:
    """The padded width of each row: max_length, the shard's longest row, or its own length."""
    if spec.padding == "max_length":
        return np.full_like(lengths, spec.max_length)
    if spec.padding == "longest":
        return np.full_like(lengths, lengths.max() if len(lengths) else 0)
    return lengths


def _list_type(value_type: pa.DataType, width: int | None) -> pa.DataType:
    return pa.list_(value_type, width) if width else pa.list_(value_type)


def token_schema(spec: TokenizeSpec) -> pa.Schema:
    """The one Arrow schema of token shards for ``spec`` (see DESIGN.md, output format)."""
    if spec.pack:
        return packed_schema(pa.from_numpy_dtype(np.dtype(spec.id_dtype)), spec.max_length)
    width = spec.fixed_width
    # uint16 ids halve the shard when the vocabulary fits (BERT 30k, GPT-2 50k); int8 masks and type ids.
    fields = [pa.field("id", pa.string())]
    if spec.stride is not None:
        fields.append(pa.field("chunk", pa.int32()))
    fields.append(pa.field("input_ids", _list_type(pa.from_numpy_dtype(np.dtype(spec.id_dtype)), width)))
    if spec.with_token_type_ids:
        fields.append(pa.field("token_type_ids", _list_type(pa.int8(), width)))
    fields.append(pa.field("attention_mask", _list_type(pa.int8(), width)))
    fields.append(pa.field("length", pa.int32()))
    return pa.schema(fields)


def _list_array(flat: np.ndarray, widths: np.ndarray, value_type: pa.DataType, fixed: int | None) -> pa.Array:
    values = pa.array(flat, type=value_type)
    if fixed:
        return pa.FixedSizeListArray.from_arrays(values, fixed)
    offsets = np.concatenate(([0], np.cumsum(widths))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def to_table(spec: TokenizeSpec, rows: TokenRows) -> pa.Table:
    """Pad ``rows`` as ``spec`` says and lay them out in the token shard schema."""
    schema = token_schema(spec)
    widths = np.maximum(row_widths(spec, rows.lengths), rows.lengths)
    side = spec.padding_side
    ones = np.ones(len(rows.flat_ids), dtype=np.int8)
    columns: dict[str, pa.Array] = {"id": pa.array(rows.ids, type=pa.string())}
    if rows.chunk is not None:
        columns["chunk"] = pa.array(rows.chunk, type=pa.int32())
    pad_id = spec.pad_id if spec.pad_id is not None else 0
    padded = {
        "input_ids": pad_flat(rows.flat_ids, rows.lengths, widths, pad_id, side),
        "attention_mask": pad_flat(ones, rows.lengths, widths, 0, side),
    }
    if rows.flat_type_ids is not None:
        padded["token_type_ids"] = pad_flat(rows.flat_type_ids, rows.lengths, widths, 0, side)
    for name, flat in padded.items():
        value_type = schema.field(name).type.value_type
        columns[name] = _list_array(flat, widths, value_type, spec.fixed_width)
    columns["length"] = pa.array(rows.lengths.astype(np.int32))
    return pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)


def length_histogram(spec: TokenizeSpec, untruncated: np.ndarray) -> list[int]:
    """Counts of untruncated lengths per bucket [edge_k, edge_k+1); the last bucket is open."""
    edges = spec.histogram_edges()
    return np.bincount(np.searchsorted(edges, untruncated, side="right") - 1, minlength=len(edges)).tolist()
