"""Contender (a): one process, `tokenizers` directly, one Arrow IPC stream file out.

    python benchmarks/contenders/handwritten_tokenizers.py CORPUS.jsonl OUTDIR

Rows are parsed with `json`, encoded with `Tokenizer.encode_batch_fast` (which
spreads each batch over all cores itself) and written batch by batch to
OUTDIR/tokens.arrow: id (string), input_ids (fixed_size_list<uint16>[128]),
attention_mask (fixed_size_list<int8>[128]). The practical single-machine limit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from _common import MAX_LENGTH, encode, load_tokenizer, read_jsonl_batches

BATCH_SIZE = 2048
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.uint16(), MAX_LENGTH)),
    ("attention_mask", pa.list_(pa.int8(), MAX_LENGTH)),
])


def fixed_size_lists(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A (rows, MAX_LENGTH) matrix as a fixed_size_list column, without copying rows one by one."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), MAX_LENGTH)


def tokenize_file(corpus: Path, out_file: Path) -> int:
    """Tokenize every row of `corpus` into `out_file`; returns the number of rows written."""
    load_tokenizer()
    rows = 0
    with pa.OSFile(str(out_file), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        for ids, texts in read_jsonl_batches(corpus, BATCH_SIZE):
            input_ids, mask = encode(texts)
            batch = pa.record_batch(
                [pa.array(ids, pa.string()), fixed_size_lists(input_ids), fixed_size_lists(mask)],
                schema=SCHEMA,
            )
            writer.write_batch(batch)
            rows += len(ids)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("outdir", type=Path)
    args = ap.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    rows = tokenize_file(args.corpus, args.outdir / "tokens.arrow")
    print(f"rows={rows}")


if __name__ == "__main__":
    main()
