"""One small input file (one work unit, one shard) tokenized on one CPU against every CPU, in one run.

    python benchmarks/small_file_tokenize.py [--rows 20000] [--repeats 3] [--json OUT]

A job of fewer units than CPUs tokenizes each unit on its share of the CPUs (threads in the task: the Rust
tokenizer releases the GIL). This runs `embedpipe tokenize` of the same one-unit file with `ray.num_cpus=1`
(one thread) and with every CPU of the machine, alternated, whole processes, MiniLM's tokenizer at
max_length 256 on the local executor, and prints the tokenize task's own seconds (read, tokenize and commit: the shard
record's ``seconds``) and the whole process's.
The shards of both runs must be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")


def tokenize(rows_path: Path, out: Path, cpus: int) -> dict:
    """One `embedpipe tokenize` process on ``cpus`` CPUs; its wall time, stage time and shard digest."""
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"input.path={rows_path}", "input.id_column=id", "tokenizer.max_length=256", f"ray.num_cpus={cpus}",
            "ray.executor=local", "output.shard_rows=1000000"]
    cmd = [sys.executable, "-m", "jobs.cli", "tokenize", "conf/default.yaml", *(a for k in sets for a in ("--set", k)),
           "--no-progress", "-o", str(out)]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True)
    wall = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    (shard,) = manifest["stages"]["tokens"]["shards"].values()
    return {"process_s": wall, "stage_s": shard["seconds"],
            "threads": shard["threads"], "sha256": shard["sha256"], "tokens": shard["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=REPO / "bench-work" / "corpus-18mb.jsonl")
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "small-file")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.corpus.exists():
        make_corpus = REPO.parent / "shared" / "tools" / "make_corpus.py"
        args.corpus.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(make_corpus), str(args.corpus), "--mb", "20"], check=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows_path = args.workdir / "rows.jsonl"
    with args.corpus.open(encoding="utf-8") as src, rows_path.open("w", encoding="utf-8") as dst:
        for _, line in zip(range(args.rows), src):
            row = json.loads(line)
            dst.write(json.dumps({"id": row["id"], "text": row["text"]}, ensure_ascii=False) + "\n")
    every = len(os.sched_getaffinity(0))
    runs: dict[int, list[dict]] = {1: [], every: []}
    for _ in range(args.repeats):
        for cpus in runs:
            runs[cpus].append(tokenize(rows_path, args.workdir / f"out-{cpus}", cpus))
    digests = {r["sha256"] for rs in runs.values() for r in rs}
    print(f"one file of {args.rows:,} rows ({runs[1][0]['tokens']:,} tokens), one unit; medians of {args.repeats}")
    print(f"{'CPUs':>5} {'threads':>7} {'task s':>8} {'process s':>9}")
    for cpus, rs in runs.items():
        print(f"{cpus:5d} {rs[0]['threads']:7d} {statistics.median(r['stage_s'] for r in rs):8.2f} "
              f"{statistics.median(r['process_s'] for r in rs):9.2f}")
    one, all_ = (statistics.median(r["stage_s"] for r in runs[c]) for c in runs)
    print(f"tokenize task: {one / all_:.2f}x with {every} CPUs; shards identical: {len(digests) == 1}")
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, "runs": runs, "speedup": one / all_,
                                         "identical": len(digests) == 1}, indent=1))
    if len(digests) != 1:
        raise SystemExit("the shards differ between thread counts")


if __name__ == "__main__":
    main()
