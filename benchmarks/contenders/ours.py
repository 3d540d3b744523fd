"""Contender (ours): `embedpipe tokenize`, exec'd in place so the harness measures it alone.

    python benchmarks/contenders/ours.py CORPUS.jsonl OUTDIR [--executor auto|local|ray]

The command line lives in `command()` below: the one place to change it
(e.g. PREFIX = ["embedpipe"] to use the console script).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "conf" / "default.yaml"
PREFIX = [sys.executable, "-m", "jobs.cli"]  # or ["embedpipe"]


def command(corpus: Path, outdir: Path, executor: str = "auto") -> list[str]:
    """The embedpipe command line that tokenizes `corpus` into `outdir` (on ``ray.executor``)."""
    return [
        *PREFIX, "tokenize", str(CONFIG),
        "--set", f"input.path={corpus}",
        "--set", "tokenizer.name=minilm",
        "--set", "tokenizer.padding=max_length",
        "--set", "tokenizer.max_length=128",
        "--set", "ray.num_cpus=2",
        "--set", f"ray.executor={executor}",
        # The baselines tokenize texts with NUL bytes (a few in the corpus) like any other; by default
        # embedpipe quarantines them. Keep them, so that every contender writes the same rows.
        "--set", "input.nul_bytes=keep",
        "--output", str(outdir),
    ]


def main() -> None:
    args = sys.argv[1:]
    executor = "auto"
    if len(args) == 4 and args[2] == "--executor":
        executor, args = args[3], args[:2]
    if len(args) != 2:
        sys.exit(f"usage: {sys.argv[0]} CORPUS.jsonl OUTDIR [--executor auto|local|ray]")
    cmd = command(Path(args[0]).resolve(), Path(args[1]).resolve(), executor)
    executable = cmd[0] if os.sep in cmd[0] else shutil.which(cmd[0])
    if executable is None:
        sys.exit(f"ours: {cmd[0]!r} not found on PATH")
    print("ours: " + " ".join(cmd), file=sys.stderr, flush=True)
    os.chdir(REPO)  # so `-m jobs.cli` imports this checkout
    os.execv(executable, cmd)  # same pid: the harness keeps measuring the same process tree


if __name__ == "__main__":
    main()
