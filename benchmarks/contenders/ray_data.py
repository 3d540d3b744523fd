"""Contender (c): Ray Data read_json -> map_batches(tokenize) -> write_parquet, on a local 2-CPU Ray.

    python benchmarks/contenders/ray_data.py CORPUS.jsonl OUTDIR [--tokenizer tokenizers|transformers]

--tokenizer tokenizers (contender c, the default): the same `tokenizers` settings as
contender (a) (MiniLM, truncation + padding to 128, uint16 ids, int8 masks).
--tokenizer transformers (contender c'): the pipeline as Ray Data users usually
write it, transformers' AutoTokenizer called on each batch with
padding="max_length", truncation=True, return_tensors="np" (int64 arrays), as
contender (b) calls it. Either way numpy batches of 1024 rows, written to OUTDIR/parquet.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# Ray's workers import `_common` by name to unpickle the UDF: put this directory on their path.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import _common  # noqa: E402

NUM_CPUS = 2
BATCH_SIZE = 1024


def tokenize_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """numpy batch {"id", "text"} -> {"id", "input_ids", "attention_mask"}, with `tokenizers`."""
    ids, mask = _common.encode(batch[_common.TEXT_COLUMN].tolist())
    return {"id": batch[_common.ID_COLUMN], "input_ids": ids, "attention_mask": mask}


def tokenize_batch_transformers(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same with transformers' tokenizer call, as contender (b) makes it."""
    texts = batch[_common.TEXT_COLUMN].tolist()
    encoded = _common.hf_tokenizer()(texts, padding="max_length", max_length=_common.MAX_LENGTH, truncation=True,
                                     return_token_type_ids=False, return_tensors="np")
    return {"id": batch[_common.ID_COLUMN], "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"]}


TOKENIZE = {"tokenizers": tokenize_batch, "transformers": tokenize_batch_transformers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--tokenizer", choices=sorted(TOKENIZE), default="tokenizers")
    args = ap.parse_args()

    import ray

    ray.init(include_dashboard=False, num_cpus=NUM_CPUS)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_json(str(args.corpus))
    ds = ds.map_batches(TOKENIZE[args.tokenizer], batch_format="numpy", batch_size=BATCH_SIZE)
    ds.write_parquet(str(args.outdir / "parquet"))
    ray.shutdown()
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
