"""Not a contender: the time the tokenizer alone needs for the corpus, on all cores, with no I/O.

    python benchmarks/contenders/tokenizer_floor.py CORPUS.jsonl

Reads every text into memory first (not timed), then times `Tokenizer.encode_batch_fast`
over all of them with the contenders' settings (MiniLM, truncation + padding to 128),
batches of 2048, the tokenizer's own threads on every core. Every contender tokenizes
every text in full (truncation cuts the encoding, not the text), so none can finish in
less wall time than this on the same cores. Prints {"tokenize_s", "texts", "threads"} as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import load_tokenizer, read_jsonl_batches

BATCH_SIZE = 2048


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    args = ap.parse_args()
    tokenizer = load_tokenizer()
    batches = [texts for _, texts in read_jsonl_batches(args.corpus, BATCH_SIZE)]
    started = time.perf_counter()
    for texts in batches:
        tokenizer.encode_batch_fast(texts)
    elapsed = time.perf_counter() - started
    print(json.dumps({"tokenize_s": elapsed, "texts": sum(map(len, batches)), "threads": os.cpu_count()}))


if __name__ == "__main__":
    main()
