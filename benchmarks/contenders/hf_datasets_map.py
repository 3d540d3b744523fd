"""Contender (b): Hugging Face `datasets` load_dataset("json") -> map(num_proc=2) -> save_to_disk.

    python benchmarks/contenders/hf_datasets_map.py CORPUS.jsonl OUTDIR

Tokenizes with transformers' AutoTokenizer (MiniLM, padding="max_length",
max_length=128, truncation=True), drops the text column and saves the dataset
to OUTDIR/dataset. The datasets cache is $HF_DATASETS_CACHE when the harness
sets it (a fresh directory per run), else OUTDIR/hf-cache, so nothing is
reused between runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _common import MAX_LENGTH, TEXT_COLUMN, hf_tokenizer

NUM_PROC = 2
BATCH_SIZE = 1000  # datasets' default for batched map


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("outdir", type=Path)
    args = ap.parse_args()

    cache_dir = Path(os.environ.get("HF_DATASETS_CACHE") or args.outdir / "hf-cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache_dir)  # must be set before importing datasets
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import datasets

    tokenizer = hf_tokenizer()

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch[TEXT_COLUMN], padding="max_length", max_length=MAX_LENGTH,
                         truncation=True, return_token_type_ids=False)

    ds = datasets.load_dataset("json", data_files=str(args.corpus), split="train",
                               cache_dir=str(cache_dir))
    ds = ds.map(tokenize, batched=True, batch_size=BATCH_SIZE, num_proc=NUM_PROC,
                remove_columns=[TEXT_COLUMN])
    ds.save_to_disk(str(args.outdir / "dataset"))
    print(f"rows={len(ds)}")


if __name__ == "__main__":
    main()
