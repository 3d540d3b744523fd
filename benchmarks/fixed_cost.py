"""Benchmark of a command's fixed cost (issue 21): small jobs and read-only commands, whole processes, one run.

Shapes (every figure is the wall time of a whole `python -m jobs.cli ...` process, median of --repeat
runs taken round-robin, so that machine noise hits every contender alike):

    tokenize-50     `embedpipe tokenize` of the first 50 rows of the sample corpus (MiniLM tokenizer,
                    max_length 128, one shard), on three set-ups:
                      local, warm   ray.executor: local, tokenizer settings cached (what a scheduled job sees)
                      local, cold   the same with an empty EMBEDPIPE_CACHE_DIR (first job with a tokenizer)
                      ray, warm     ray.executor: ray: a local Ray cluster started and stopped, as every
                                    command ran before the local executor (the baseline)
    run-50          `embedpipe run` (tokenize + MiniLM embeddings) of the same 50 rows, local vs ray
    status / verify / plan / --help   on the 50-row output: wall time and whether torch or ray got imported
                    (plan of the tokenize stage; plan of both stages is shown too: checking the encoder
                    reads its config with transformers, which imports torch)

Then one timeline per executor of the tokenize-50 job from its JSON log: process start -> `plan` (imports,
config, input discovery) -> `resume` (lock, manifest, engine start, tokenizer) -> last `progress` (the work:
workers start, tokenize, commit) -> `run_report` (stage metadata, manifest) -> process exit (shutdown).

Targets (issue 21): tokenize-50 local warm < 3 s; status < 0.5 s; status, verify, plan --stages tokenize and
--help import neither torch nor ray. Exit 0 only if all pass.

    python benchmarks/fixed_cost.py --repeat 5 --json benchmarks/results/fixed-cost-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pipeline" / "sample_data" / "corpus.jsonl"
ROWS = 50
# Runs the CLI and, at exit, says on stderr whether torch / ray were imported.
PROBE = ("import atexit, sys\n"
         "atexit.register(lambda: print('IMPORTED torch=%s ray=%s' % ('torch' in sys.modules, 'ray' in sys.modules),"
         " file=sys.stderr))\n"
         "sys.argv = ['embedpipe', *sys.argv[1:]]\n"
         "from jobs.cli import main\n"
         "main()\n")


def cli(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done


def imported(done: subprocess.CompletedProcess) -> dict[str, bool]:
    line = next((x for x in done.stderr.splitlines() if x.startswith("IMPORTED")), "IMPORTED torch=? ray=?")
    return {k: v == "True" for k, v in (p.split("=") for p in line.split()[1:])}


def write_job(workdir: Path) -> Path:
    corpus = workdir / "corpus-50.jsonl"
    with SAMPLE.open() as src:
        corpus.write_text("".join(next(src) for _ in range(ROWS)))
    config = workdir / "job.yaml"
    config.write_text(f"input: {{path: {corpus}}}\noutput: {{path: {workdir / 'unused'}}}\n"
                      "tokenizer: {name: minilm, max_length: 128}\n"
                      "encoder: {model: minilm, pooling: mean, normalize: true}\n")
    return config


SETUPS = {  # name -> (command, executor, cold settings cache)
    "tokenize-50 local, warm": ("tokenize", "local", False),
    "tokenize-50 local, cold": ("tokenize", "local", True),
    "tokenize-50 ray, warm": ("tokenize", "ray", False),
    "run-50 local": ("run", "local", False),
    "run-50 ray": ("run", "ray", False),
}


def run_setup(name: str, config: Path, workdir: Path, env: dict[str, str], rep: int) -> tuple[float, str]:
    command, executor, cold = SETUPS[name]
    out = workdir / "outs" / f"{name.replace(' ', '_').replace(',', '')}-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    run_env = dict(env)
    if cold:
        run_env["EMBEDPIPE_CACHE_DIR"] = tempfile.mkdtemp(dir=workdir, prefix="cold-cache-")
    wall, done = cli([command, str(config), "-o", str(out), "--set", f"ray.executor={executor}", "--no-progress",
                      "--log-format", "json"], run_env)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return wall, done.stderr


def timeline(stderr: str, started_wall: float, wall: float) -> dict[str, float]:
    """Seconds from process start to each phase's end, from the JSON log's timestamps."""
    events: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        ts = datetime.fromisoformat(record["ts"]).timestamp() - started_wall
        kind = record.get("event")
        if kind in ("plan", "resume", "run_report") and kind not in events:
            events[kind] = ts
        if kind == "progress":
            events["work done"] = ts
    events["exit"] = wall
    return events


def read_only(out: Path, config: Path, env: dict[str, str], repeat: int) -> dict[str, dict[str, Any]]:
    commands = {"status": ["status", str(out)], "verify": ["verify", str(out)],
                "plan --stages tokenize": ["plan", str(config), "-o", str(out), "--stages", "tokenize"],
                "--help": ["--help"],
                # Not read-only-cheap by design: checking the encoder reads its config with transformers (torch).
                "plan (both stages)": ["plan", str(config), "-o", str(out)]}
    results: dict[str, dict[str, Any]] = {name: {"walls": []} for name in commands}
    for _ in range(repeat):
        for name, args in commands.items():
            wall, done = cli(args, env)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stdout}{done.stderr[-2000:]}")
            results[name]["walls"].append(wall)
            results[name]["imported"] = imported(done)
    for entry in results.values():
        entry["wall_s"] = statistics.median(entry["walls"])
    return results


def lscpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return platform.processor()
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("Model name")), "?")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "fixed-cost")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               EMBEDPIPE_CACHE_DIR=str(args.workdir / "warm-cache"))
    config = write_job(args.workdir)
    print(f"machine: {lscpu()}, {os.cpu_count()} CPUs; python {platform.python_version()}; "
          f"{args.repeat} runs of each, round-robin")
    run_setup("tokenize-50 local, warm", config, args.workdir, env, -1)  # fills the warm cache; not counted

    walls: dict[str, list[float]] = {name: [] for name in SETUPS}
    timelines: dict[str, dict[str, float]] = {}
    for rep in range(args.repeat):
        for name in SETUPS:
            started = time.time()
            wall, stderr = run_setup(name, config, args.workdir, env, rep)
            walls[name].append(wall)
            if name in ("tokenize-50 local, warm", "tokenize-50 ray, warm") and rep == args.repeat - 1:
                timelines[name] = timeline(stderr, started, wall)
    medians = {name: statistics.median(w) for name, w in walls.items()}
    base = medians["tokenize-50 ray, warm"]
    print(f"\n{'job (whole process)':<28} {'median s':>9} {'runs':>28}  vs ray")
    for name, median in medians.items():
        ref = medians["run-50 ray"] if name.startswith("run") else base
        runs = " ".join(f"{w:.2f}" for w in walls[name])
        print(f"{name:<28} {median:9.2f} {runs:>28}  {ref / median:5.2f}x faster")

    print("\ntimeline of tokenize-50 (s from process start to the end of each phase)")
    phases = ["plan", "resume", "work done", "run_report", "exit"]
    print(f"{'':<28}" + "".join(f"{p:>12}" for p in phases))
    for name, events in timelines.items():
        print(f"{name:<28}" + "".join(f"{events.get(p, float('nan')):12.2f}" for p in phases))

    out = args.workdir / "outs" / "tokenize-50_local_warm-0"
    ro = read_only(out, config, env, args.repeat)
    print(f"\n{'read-only command':<28} {'median s':>9}  imports torch / ray")
    for name, entry in ro.items():
        print(f"{name:<28} {entry['wall_s']:9.2f}  {entry['imported'].get('torch')} / {entry['imported'].get('ray')}")

    targets = [
        ("tokenize-50 local, warm < 3 s", medians["tokenize-50 local, warm"] < 3.0, medians["tokenize-50 local, warm"]),
        ("status < 0.5 s", ro["status"]["wall_s"] < 0.5, ro["status"]["wall_s"]),
        ("status, verify, plan --stages tokenize, --help import neither torch nor ray",
         not any(e["imported"].get("torch") or e["imported"].get("ray")
                 for name, e in ro.items() if name != "plan (both stages)"), None),
    ]
    print("\ntargets")
    for label, ok, value in targets:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}" + (f" ({value:.2f} s)" if value is not None else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": lscpu(), "cpus": os.cpu_count(), "repeat": args.repeat, "walls": walls, "medians": medians,
            "timelines": timelines, "read_only": ro,
            "targets": [{"name": t[0], "pass": t[1], "value": t[2]} for t in targets]}, indent=1))
    return 0 if all(ok for _, ok, _ in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
