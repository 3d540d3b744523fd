"""Benchmark of the training readers (pipeline.data) against datasets' own reader, in one run.

Every reader feeds the same torch DataLoader set-up: 2 workers, batch 256, one shuffled epoch over
the token shards of one output directory, delivering int64 ``input_ids`` / ``attention_mask`` /
``token_type_ids`` tensors (what a BERT-family model takes); the loop only counts the rows.

    map       pipeline.data.ShardDataset + DataLoader(shuffle=True, collate_fn=ds.collator())
    stream    pipeline.data.StreamingDataset(batch_size=256) + ds.loader(num_workers=2)
    datasets  datasets.load_from_disk(OUT/tokens).with_format("torch") + DataLoader(shuffle=True)

Each reader runs in its own process, ``--repeat`` times round-robin (medians reported), with the
CPU time of its process tree over the epoch (loop + workers: rows per CPU-second is the figure
another job's load on the machine disturbs least) and the load average before it started. A thread
samples the memory of that process tree every 0.25 s from /proc/PID/smaps_rollup: RSS, PSS and
anonymous memory (heap: what grows if data are copied into the processes; RSS and PSS also count
the pages of memory-mapped shards, which are file cache the kernel can drop). The table shows
rows/s, MB/s of delivered tensors, the ratios to datasets, and memory at the first batch, at the
last, and the peak.
Target: map and stream >= 3x datasets' rows/s, anonymous memory flat over the epoch. A target
whose baseline did not run (``--only`` without datasets) is "not measured", not passed.

Every reader must deliver the rows the manifest lists, each once: after its timed epoch the child
process reads one more, untimed, epoch of the ``id`` column alone and compares the ids delivered
(as a multiset) with those of the token shards the manifest lists, and the timed epoch's row count
with the manifest's; any difference fails the run loudly.

Input: an existing output directory (``--out OUT``, tokens stage complete), or one built here from
a JSONL corpus with ``embedpipe tokenize`` (MiniLM, padding to ``--max-length``) into
bench-work/data-readers/ (reused when already there); ``--mb N`` generates the corpus with
../shared/tools/make_corpus.py when ``--corpus`` does not exist.

    python benchmarks/data_readers.py --corpus bench-work/corpus-300mb.jsonl --repeat 3
    python benchmarks/data_readers.py --out out/default --only map,stream
    python benchmarks/data_readers.py --corpus bench-work/corpus-50mb.jsonl --mb 50 --json bench-work/readers.json

Exit status 0 when every target is met and measured and every reader delivered the manifest's rows;
1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench-work" / "data-readers"
MAKE_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_corpus.py"  # ../shared
COLUMNS = ["input_ids", "attention_mask", "token_type_ids"]
READERS = ("map", "stream", "datasets")
BATCH, WORKERS, SEED = 256, 2, 0
TARGET_RATIO = 3.0
SAMPLE_S = 0.25
MB = 1e6


# ------------------------------------------------------------------ input


def ensure_output(args: argparse.Namespace) -> Path:
    """The output directory to read: --out, or the corpus tokenized into bench-work/data-readers/."""
    if args.out:
        return Path(args.out)
    corpus = Path(args.corpus)
    if not corpus.exists():
        if not args.mb:
            sys.exit(f"{corpus} does not exist; give --mb N to generate it")
        corpus.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(MAKE_CORPUS), str(corpus), "--mb", str(args.mb)], check=True)
    out = WORK / f"{corpus.stem}-L{args.max_length}"
    manifest = out / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["stages"].get("tokens", {}).get("status") == "complete":
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    config = WORK / f"{out.name}.yaml"
    config.write_text(json.dumps({
        "input": {"path": str(corpus.resolve()), "id_column": "id"},
        "output": {"path": str(out), "shard_rows": args.shard_rows},
        "tokenizer": {"name": "minilm", "max_length": args.max_length, "padding": "max_length"},
    }))  # JSON is YAML
    print(f"tokenizing {corpus} into {out} ...", flush=True)
    started = time.monotonic()
    subprocess.run([str(Path(sys.executable).parent / "embedpipe"), "tokenize", str(config), "--no-progress"],
                   check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"  done in {time.monotonic() - started:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------ memory


def _rollup(pid: int) -> dict[str, int]:
    """Rss, Pss and Anonymous (kB) of one process."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Anonymous"):
                values[key] = int(rest.split()[0])
    return values


def tree_memory() -> dict[str, float]:
    """RSS, PSS and anonymous memory (MB) summed over this process and its descendants."""
    import psutil

    me = psutil.Process()
    total = {"Rss": 0, "Pss": 0, "Anonymous": 0}
    for proc in [me, *me.children(recursive=True)]:
        try:
            for key, kb in _rollup(proc.pid).items():
                total[key] += kb
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # a worker that just exited
    return {"rss": total["Rss"] * 1024 / MB, "pss": total["Pss"] * 1024 / MB, "anon": total["Anonymous"] * 1024 / MB}


class Sampler(threading.Thread):
    """Samples tree_memory() every SAMPLE_S seconds; keeps the peak of each figure."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"rss": 0.0, "pss": 0.0, "anon": 0.0}
        self.latest: dict[str, float] | None = None
        self.stop = threading.Event()

    def take(self) -> dict[str, float]:
        sample = tree_memory()
        self.peak = {k: max(v, sample[k]) for k, v in self.peak.items()}
        self.latest = sample
        return sample

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.take()


# ------------------------------------------------------------------ readers (run in a child process)


def make_loader(kind: str, out: Path, columns: list[str] = COLUMNS) -> Any:
    """The DataLoader of one reader (in the child process)."""
    from torch.utils.data import DataLoader

    if kind == "map":
        from pipeline.data import ShardDataset

        ds = ShardDataset(str(out), columns=columns)
        return DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS, collate_fn=ds.collator())
    if kind == "stream":
        from pipeline.data import StreamingDataset

        return StreamingDataset(str(out), columns=columns, batch_size=BATCH, seed=SEED).loader(num_workers=WORKERS)
    import datasets

    ds = datasets.load_from_disk(str(out / "tokens")).with_format("torch", columns=columns)
    return DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS)


def manifest_rows(out: Path) -> tuple[int, list[str]]:
    """The rows the manifest lists for the tokens stage: their count, and the ids read from those shards."""
    import pyarrow as pa

    shards = json.loads((out / "manifest.json").read_text())["stages"]["tokens"]["shards"]
    ids: list[str] = []
    for name in sorted(shards):
        with pa.memory_map(str(out / "tokens" / name)) as source:
            ids.extend(pa.ipc.open_stream(source).read_all().column("id").to_pylist())
    return sum(s["rows"] for s in shards.values()), ids


def check_delivered(kind: str, out: Path, rows: int) -> list[str]:
    """What is wrong with the rows one reader delivers (empty when they are the manifest's, each once).

    ``rows``: the timed epoch's row count. The ids come from one more, untimed, epoch of ``id`` alone.
    """
    from collections import Counter

    listed, expected = manifest_rows(out)
    delivered = [i for batch in make_loader(kind, out, ["id"]) for i in batch["id"]]
    problems = []
    if rows != listed:
        problems.append(f"the timed epoch delivered {rows:,} rows, the manifest lists {listed:,}")
    if len(expected) != listed:
        problems.append(f"the listed shards hold {len(expected):,} rows, the manifest says {listed:,}")
    want, got = Counter(expected), Counter(delivered)
    missing, extra = want - got, got - want
    if missing or extra:
        problems.append(f"ids delivered differ from the manifest's rows: {sum(missing.values()):,} missing "
                        f"(e.g. {sorted(missing)[:3]}), {sum(extra.values()):,} extra or repeated "
                        f"(e.g. {sorted(extra)[:3]})")
    return problems


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (the DataLoader workers, once joined)."""
    usages = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(r.ru_utime + r.ru_stime for r in usages)


def run_reader(kind: str, out: Path) -> dict[str, Any]:
    """One epoch of one reader: rows, delivered bytes, seconds, memory at first/last batch and peak.

    "last" is the latest sample taken while batches still flowed (the workers exit when the epoch ends).
    """
    import torch

    torch.manual_seed(SEED)
    loader = make_loader(kind, out)
    sampler = Sampler()
    sampler.start()
    rows = nbytes = 0
    first = last = None
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    for batch in loader:
        if first is None:
            first = sampler.take()
        last = sampler.latest
        rows += len(batch["input_ids"])
        nbytes += sum(batch[c].nelement() * batch[c].element_size() for c in COLUMNS)
        last_batch = batch
    seconds = time.perf_counter() - started
    del loader  # joins the workers, so their CPU time is counted below
    sampler.stop.set()
    cpu = cpu_seconds() - cpu_before
    dtypes = {c: str(last_batch[c].dtype) for c in COLUMNS}
    problems = check_delivered(kind, out, rows)  # after the timing: not part of the figures
    return {"reader": kind, "rows": rows, "problems": problems, "bytes": nbytes, "seconds": seconds, "cpu_s": cpu, "first": first,
            "last": last, "peak": sampler.peak, "dtypes": dtypes, "shape": list(last_batch["input_ids"].shape)}


def spawn(kind: str, out: Path) -> dict[str, Any]:
    """Run one reader in a fresh process (so each one's memory is its own)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--out", str(out)], capture_output=True,
                          text=True, env=env, cwd=REPO)
    if done.returncode:
        sys.exit(f"reader {kind} failed:\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load}


# ------------------------------------------------------------------ report


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run of one reader (by rows/s), with the median CPU time and the loads seen."""
    ranked = sorted(runs, key=lambda r: r["rows"] / r["seconds"])
    median = ranked[len(ranked) // 2]
    return {**median, "rate": median["rows"] / median["seconds"],
            "rows_per_cpu_s": median["rows"] / statistics.median(r["cpu_s"] for r in runs),
            "loads": [round(r["load_before"], 1) for r in runs], "runs": len(runs)}


def report(results: list[dict[str, Any]], out: Path) -> bool:
    """Print the table and the targets; True when every target is met."""
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["stages"]["tokens"]["shards"]
    by_reader = {kind: summarize([r for r in results if r["reader"] == kind])
                 for kind in dict.fromkeys(r["reader"] for r in results)}
    print(f"\n{out}: {sum(s['rows'] for s in shards.values()):,} rows in {len(shards)} token shards, "
          f"{sum(s['bytes'] for s in shards.values()) / MB:,.0f} MB; batch {BATCH}, {WORKERS} workers, "
          f"one shuffled epoch, {os.cpu_count()} CPUs; median of {max(r['runs'] for r in by_reader.values())} runs")
    base = by_reader.get("datasets")
    print(f"{'reader':<9} {'rows/s':>9} {'MB/s':>6} {'vs ds':>6} {'rows/cpu-s':>11} {'vs ds':>6}  "
          f"{'RSS MB first/last/peak':>22} {'PSS MB first/last/peak':>22} {'anon MB first/last/peak':>23}  load before")
    ok = True
    for run in results:
        for problem in run["problems"]:
            print(f"FAIL {run['reader']}: {problem}")
            ok = False
    for kind, r in by_reader.items():
        ratio = r["rate"] / base["rate"] if base else float("nan")
        cpu_ratio = r["rows_per_cpu_s"] / base["rows_per_cpu_s"] if base else float("nan")
        mem = {k: f"{r['first'][k]:.0f}/{r['last'][k]:.0f}/{r['peak'][k]:.0f}" for k in ("rss", "pss", "anon")}
        print(f"{kind:<9} {r['rate']:>9,.0f} {r['bytes'] / MB / r['seconds']:>6,.0f} {ratio:>6.2f} "
              f"{r['rows_per_cpu_s']:>11,.0f} {cpu_ratio:>6.2f}  {mem['rss']:>22} {mem['pss']:>22} {mem['anon']:>23}"
              f"  {r['loads']}")
    print(f"delivered: {next(iter(by_reader.values()))['dtypes']}, batches of {BATCH} rows")
    for kind, r in by_reader.items():
        if kind == "datasets":
            continue
        growth = r["last"]["anon"] - r["first"]["anon"]
        flat = growth < max(50.0, 0.1 * r["first"]["anon"])
        ratio = r["rate"] / base["rate"] if base else None
        fast = ratio is not None and ratio >= TARGET_RATIO  # a baseline not run checks nothing
        ok &= flat and fast
        speed = ("NOT MEASURED (the datasets baseline did not run: add it to --only)" if ratio is None
                 else f"{ratio:.2f}x {'PASS' if fast else 'FAIL'}")
        print(f"target {kind}: >= {TARGET_RATIO}x datasets rows/s: {speed}; "
              f"anonymous memory first -> last batch {growth:+.0f} MB {'PASS' if flat else 'FAIL'}")
    rows = {r["reader"]: r["rows"] for r in results}
    print(f"rows delivered per epoch: {rows}; ids checked against the manifest: "
          f"{'PASS' if not any(r['problems'] for r in results) else 'FAIL'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="an existing output directory (tokens stage complete)")
    parser.add_argument("--corpus", default=str(REPO / "bench-work" / "corpus-300mb.jsonl"))
    parser.add_argument("--mb", type=float, help="generate --corpus with this many MB of text when missing")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--only", default=",".join(READERS), help="comma-separated readers to run")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each reader, round-robin (median shown)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", choices=READERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_reader(args.child, Path(args.out))))
        return
    out = ensure_output(args)
    results = []
    for rep in range(args.repeat):
        for kind in args.only.split(","):
            print(f"reading with {kind} (run {rep + 1} of {args.repeat}) ...", flush=True)
            results.append(spawn(kind, out))
    ok = report(results, out)
    if args.json:
        Path(args.json).write_text(json.dumps({"out": str(out), "results": results, "ok": ok}, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
