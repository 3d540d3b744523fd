"""What packing costs: `embedpipe tokenize` with `tokenizer.pack: true` against `padding: none` on the same
corpus, whole processes, in one run (issue 19's target: packing at most 10% slower).

    python benchmarks/pack_cost.py --corpus bench-work/corpus-18mb.jsonl --json bench-work/pack.json

Both use the demo byte-level BPE (conf/tokenizers/decoder-bpe) and max_length 1024 (the block length; the
unpacked job keeps whole documents: truncation off). The order alternates over --rounds pairs and the
median of each is compared, since the machine is noisy.
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
SETTINGS = {
    "packed": ["tokenizer.pack=true", "tokenizer.max_length=1024"],
    "padding none": ["tokenizer.pack=false", "tokenizer.padding=none", "tokenizer.truncation=false"],
}


def tokenize(corpus: Path, out: Path, settings: list[str]) -> float:
    sets = [f"input.path={corpus}", "input.id_column=id", "tokenizer.name=conf/tokenizers/decoder-bpe",
            "output.shard_rows=10000", *settings]
    cmd = [sys.executable, "-m", "jobs.cli", "tokenize", "conf/pretrain-pack.yaml",
           *(a for s in sets for a in ("--set", s)), "--no-progress", "-o", str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=REPO / "bench-work" / "corpus-18mb.jsonl")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "pack")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds):
        names = list(SETTINGS) if round_ % 2 == 0 else list(reversed(SETTINGS))
        for name in names:
            out = args.workdir / f"{name.replace(' ', '-')}-{round_}"
            times[name].append(tokenize(args.corpus, out, SETTINGS[name]))
    manifest = json.loads((args.workdir / "packed-0" / "manifest.json").read_text())
    totals = manifest["stages"]["tokens"]["totals"]
    size = args.corpus.stat().st_size / 1e6
    print(f"\n{args.corpus.name} ({size:.0f} MB), {os.cpu_count()} CPUs, medians of {args.rounds} alternating rounds")
    for name, seconds in times.items():
        print(f"  embedpipe tokenize, {name:13} {statistics.median(seconds):7.1f} s   ({', '.join(f'{s:.1f}' for s in seconds)})")
    ratio = statistics.median(times["packed"]) / statistics.median(times["padding none"])
    print(f"  packed blocks: {totals.get('rows', '?')} rows; packed / padding none = {ratio:.3f}")
    ok = ratio <= 1.10
    print(f"target: {'PASS' if ok else 'FAIL'}  packing at most 10% slower than padding: none   {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"corpus_mb": size, "seconds": times, "ratio": ratio, "pass": ok}, indent=1))


if __name__ == "__main__":
    main()
