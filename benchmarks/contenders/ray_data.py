"""Contender (c): Ray Data read_json -> map_batches(tokenize) -> write_parquet, on a local 2-CPU Ray.

    python benchmarks/contenders/ray_data.py CORPUS.jsonl OUTDIR

Tokenizes with the same `tokenizers` settings as contender (a) (MiniLM,
truncation + padding to 128) in numpy batches and writes OUTDIR/parquet.
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
    """numpy batch {"id", "text"} -> {"id", "input_ids", "attention_mask"}."""
    ids, mask = _common.encode(batch[_common.TEXT_COLUMN].tolist())
    return {"id": batch[_common.ID_COLUMN], "input_ids": ids, "attention_mask": mask}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("outdir", type=Path)
    args = ap.parse_args()

    import ray

    ray.init(include_dashboard=False, num_cpus=NUM_CPUS)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_json(str(args.corpus))
    ds = ds.map_batches(tokenize_batch, batch_format="numpy", batch_size=BATCH_SIZE)
    ds.write_parquet(str(args.outdir / "parquet"))
    ray.shutdown()
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
