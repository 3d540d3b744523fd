"""How good `embedpipe plan`'s time estimate is: plan's estimate against the `embedpipe run` it predicts.

    python benchmarks/plan_estimate.py                          # 3,000 rows (a few minutes on 2 cores)
    python benchmarks/plan_estimate.py --rows 300 --json bench-work/plan-estimate.json

Writes --rows rows of real text (`../shared/tools/make_corpus.py`, as benchmarks/embed_stage.py does), then
runs, each as a whole process on the same config (the default job: MiniLM, max_length 256), `embedpipe plan
--json` and `embedpipe run` on a fresh output. Prints per stage the estimated and the actual seconds from the
command's start until the stage's last shard was committed (the run's are its manifest's ``stage_seconds`` plus
the time the process spent outside the driver's clock, counted as before it), the whole command's, and their
ratio; plan's own time; and the padding plan predicted against the positions the run's forwards computed.
Timings mean little on a machine that other work is using.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from embed_stage import REPO, timed  # this folder is on sys.path when run as a script

MAX_LENGTH = 256


def write_rows(corpus: Path, n: int, path: Path) -> None:
    with corpus.open(encoding="utf-8") as lines:
        rows = [json.loads(line) for _, line in zip(range(n), lines)]
    if len(rows) < n:
        raise SystemExit(f"{corpus} has {len(rows)} rows, fewer than the {n} asked for")
    path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def actual_seconds(out: Path, process_s: float) -> dict[str, float]:
    """The run's seconds from the command's start until each stage's last commit, and the whole command's."""
    run = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["last_run"]
    outside = process_s - run["seconds"]  # interpreter, imports, config: before the driver's clock starts
    stages = run["stage_seconds"]
    return {"tokenize": stages["tokens"] + outside, "embed": stages["embeddings"] + outside, "total": process_s}


def computed_padding(out: Path) -> float:
    shards = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["stages"]["embeddings"]["shards"]
    return sum(s["computed_tokens"] for s in shards.values()) / max(1, sum(s["tokens"] for s in shards.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_000)
    ap.add_argument("--shard-rows", type=int, default=10_000, help="output.shard_rows (default: one shard)")
    ap.add_argument("--corpus", type=Path, default=REPO / "bench-work" / "corpus-18mb.jsonl")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "plan-estimate")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides for both commands, e.g. ray.num_cpus=1")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.corpus.exists():  # real-looking text from the docs of this virtualenv's packages
        make_corpus = REPO.parent / "shared" / "tools" / "make_corpus.py"
        args.corpus.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(make_corpus), str(args.corpus), "--mb", "20"], check=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    rows_path, out = args.workdir / "rows.jsonl", args.workdir / "out"
    write_rows(args.corpus, args.rows, rows_path)
    sets = [f"input.path={rows_path}", "input.id_column=id", f"tokenizer.max_length={MAX_LENGTH}",
            f"output.shard_rows={args.shard_rows}", *args.settings]
    job = ["conf/default.yaml", *(a for k in sets for a in ("--set", k)), "-o", str(out)]
    plan_s, stdout = timed([sys.executable, "-m", "jobs.cli", "plan", *job, "--json"])
    estimate = json.loads(stdout)["estimate"]
    run_s, _ = timed([sys.executable, "-m", "jobs.cli", "run", *job, "--no-progress"])
    actual = actual_seconds(out, run_s)
    padding = computed_padding(out)

    measured, work = estimate["measured"], estimate.get("work", {})
    print(f"\n{args.rows} rows, MiniLM, max_length {MAX_LENGTH}, {os.cpu_count()} CPUs; cluster assumed: "
          f"{estimate['cluster']}")
    print(f"plan --json took {plan_s:.1f} s; measured: tokenizer {measured.get('tokenizer_tokens_per_s', 0):,.0f} "
          f"tokens/s/worker, encoder {measured.get('encoder_tokens_per_s', 0):,.0f} tokens/s/actor, model load "
          f"{measured.get('model_load_s', 0):.2f} s, torch import {measured.get('torch_import_s', 0):.2f} s")
    print(f"{'stage':10} {'estimated s':>11} {'actual s':>9} {'est/actual':>10}")
    ratios = {}
    for stage, seconds in actual.items():
        guess = estimate["seconds"].get(stage)
        ratios[stage] = guess / seconds if guess is not None and seconds else None
        shown = "-" if guess is None else f"{guess:11.1f}"
        print(f"{stage:10} {shown:>11} {seconds:9.1f} {'-' if ratios[stage] is None else f'{ratios[stage]:.2f}':>10}")
    print(f"padding (computed / real positions): plan {work.get('padding')}, run {padding:.4f}; "
          f"pieces: plan {work.get('pieces')}")
    for note in estimate["notes"]:
        print(f"note: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": args.rows, "shard_rows": args.shard_rows, "settings": args.settings,
                                         "plan_s": plan_s, "estimate": estimate, "actual": actual, "ratio": ratios,
                                         "run_padding": padding}, indent=1))


if __name__ == "__main__":
    main()
