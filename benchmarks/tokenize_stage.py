"""Benchmark of `embedpipe tokenize` against three baselines, on one corpus, in one run.

Each contender runs as its own process (benchmarks/contenders/*.py, each taking
CORPUS.jsonl OUTDIR): JSONL in -> files on disk, MiniLM tokenizer, truncation
on, padding to max_length 128, HF_HUB_OFFLINE=1.

    ours  embedpipe tokenize (command line in contenders/ours.py)
    a     handwritten_tokenizers.py: one process, tokenizers.encode_batch_fast -> one Arrow IPC stream
    b     hf_datasets_map.py: datasets load_dataset("json") -> map(num_proc=2) -> save_to_disk
    c     ray_data.py: Ray Data read_json -> map_batches -> write_parquet (num_cpus=2), `tokenizers` as in (a)
    c2    (c') the same with transformers' AutoTokenizer called on each batch, as (b) and most Ray Data
          pipelines call it (the 1.6x target is shown against both (c) and (c'))

For each run the harness records the wall time of the whole process (startup
included) and the peak PSS summed over the whole process tree (Ray's gcs,
raylet and workers included), sampled every 0.5 s. Afterwards it checks that the
output directory is non-empty and that the rows written equal the corpus's
non-blank lines. MB/s counts the UTF-8 bytes of the "text" fields (as
make_corpus.py's --mb does); "ours is" = ours' throughput / the contender's.
Each contender gets a fresh empty OUTDIR and a fresh HF_DATASETS_CACHE under
--workdir; outputs are deleted after checking unless --keep-outputs. With
--repeat N, runs go round-robin and the table shows the median wall time and
the highest peak PSS.

Commands (from the repository root, venv active: `. .venv/bin/activate`):

    python benchmarks/tokenize_stage.py --corpus /tmp/c5.jsonl --json bench-work/tokenize-5mb.json
    python benchmarks/tokenize_stage.py --mb 5 --only a,b,c          # generates bench-work/corpus-5mb.jsonl
    python benchmarks/tokenize_stage.py --mb 200 --sizes 1000 --repeat 3 --json bench-work/tokenize-200mb.json

Afterwards contenders/tokenizer_floor.py times the tokenizer alone on the same texts
(in memory, no I/O, all cores): no contender can be faster than that floor, which
tells whether a throughput target is reachable at all on this machine.

--sizes M[,M2...] afterwards runs ours alone on corpora of M MB (generated with
../shared/tools/make_corpus.py when missing) to show its peak PSS as the
corpus grows. Targets: ours >= 1.0x (a), >= 1.1x (b), >= 1.6x (c) throughput,
and ours' peak PSS < 1500 MB on every corpus. Exit status 0 only if every
target passes and every contender ran and wrote the right number of rows.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

REPO = Path(_HERE).parent
CONTENDERS_DIR = Path(_HERE) / "contenders"
MAKE_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_corpus.py"  # ../shared
SAMPLE_INTERVAL_S = 0.5
LINGER_TIMEOUT_S = 30.0
PSS_LIMIT_MB = 1500.0
BUSY_PERCENT = 20.0  # CPU use by others before a run above which timings are flagged as noisy
MB = 1e6


@dataclass(frozen=True)
class Contender:
    """One competitor: its script, where its result lands in OUTDIR, ours' throughput target vs it."""

    key: str
    label: str
    script: str
    result: str
    target: float | None = None
    args: tuple[str, ...] = ()


CONTENDERS = [
    Contender("ours", "ours (embedpipe)", "ours.py", "tokens"),
    # ours with ray.executor: ray, as every run was before the local executor (issue 21): not a target.
    Contender("ours-ray", "ours on Ray (ray.executor)", "ours.py", "tokens", None, ("--executor", "ray")),
    Contender("a", "(a) tokenizers 1-proc", "handwritten_tokenizers.py", "tokens.arrow", 1.0),
    Contender("b", "(b) datasets map np=2", "hf_datasets_map.py", "dataset", 1.1),
    Contender("c", "(c) ray data", "ray_data.py", "parquet", 1.6),
    Contender("c2", "(c') ray data + transformers", "ray_data.py", "parquet", 1.6, ("--tokenizer", "transformers")),
]
BY_KEY = {c.key: c for c in CONTENDERS}


@dataclass
class Corpus:
    """A JSONL corpus and what the contenders must reproduce from it."""

    path: str
    file_bytes: int
    text_bytes: int
    rows: int


@dataclass
class Measurement:
    """What watching one process tree gave: exit code, wall time, peak PSS."""

    exit_code: int
    wall_s: float
    peak_pss_mb: float
    peak_procs: int  # processes in the tree at the peak
    peak_breakdown: list[dict[str, Any]]  # those processes, biggest first
    lingering: list[str]  # tree processes still alive 30 s after the main one exited
    sampler_cpu_s: float  # CPU the harness itself spent sampling
    timed_out: bool = False


@dataclass
class Run:
    """One contender process on one corpus: its measurement and the checks of its output."""

    contender: str
    corpus: str
    rep: int
    measurement: Measurement
    cpu_busy_before: float
    log: str
    expected_rows: int
    ok: bool = False
    error: str | None = None
    rows: int | None = None
    rows_source: str | None = None
    output_mb: float | None = None

    @property
    def wall_s(self) -> float:
        return self.measurement.wall_s

    @property
    def peak_pss_mb(self) -> float:
        return self.measurement.peak_pss_mb


# ---------------------------------------------------------------- corpus

def ensure_corpus(path: Path, mb: float | None) -> Path:
    """`path`, generated with make_corpus.py (--mb `mb`) first if it does not exist."""
    if path.exists():
        return path
    if mb is None:
        raise SystemExit(f"corpus {path} does not exist (pass --mb N to generate it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"generating {path} ({mb:g} MB of text) with {MAKE_CORPUS} ...", flush=True)
    subprocess.run([sys.executable, str(MAKE_CORPUS), str(path), "--mb", f"{mb:g}"], check=True)
    return path


def corpus_stats(path: Path) -> Corpus:
    """Rows (non-blank lines) and UTF-8 bytes of the "text" fields; also warms the page cache."""
    rows = text_bytes = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                rows += 1
                text_bytes += len(json.loads(line)["text"].encode("utf-8"))
    return Corpus(str(path), path.stat().st_size, text_bytes, rows)


# ---------------------------------------------------------------- measuring

def tree_pss(root: psutil.Process) -> tuple[int, list[tuple[psutil.Process, int]]]:
    """Summed PSS (bytes) of `root` and all its descendants, skipping processes that vanish."""
    try:
        procs = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0, []
    total, parts = 0, []
    for p in procs:
        try:
            pss = p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += pss
        parts.append((p, pss))
    return total, parts


def describe(parts: list[tuple[psutil.Process, int]]) -> list[dict[str, Any]]:
    """The processes of one sample, biggest first, as JSON-friendly dicts."""
    out = []
    for p, pss in sorted(parts, key=lambda x: -x[1]):
        try:
            name = p.name()
        except psutil.Error:
            name = "?"
        out.append({"pid": p.pid, "name": name, "pss_mb": round(pss / MB, 1)})
    return out


def wait_for_leftovers(seen: dict[int, psutil.Process], main_pid: int) -> list[str]:
    """Wait for the tree's other processes to exit; terminate (by pid) those still there."""
    others = [p for pid, p in seen.items() if pid != main_pid]
    _, alive = psutil.wait_procs(others, timeout=LINGER_TIMEOUT_S)
    names = []
    for p in alive:
        try:
            names.append(f"{p.name()}[{p.pid}]")
            p.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=5)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    return names


def run_process(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> Measurement:
    """Run `cmd` (output to `log`), sampling its whole tree's PSS every SAMPLE_INTERVAL_S."""
    seen: dict[int, psutil.Process] = {}
    peak, peak_parts, timed_out = 0, [], False
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    with open(log, "wb") as logf:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        root = psutil.Process(proc.pid)
        while True:
            total, parts = tree_pss(root)
            seen.update((p.pid, p) for p, _ in parts)
            if total > peak:
                peak, peak_parts = total, parts
            try:
                code = proc.wait(timeout=SAMPLE_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - start > timeout_s:
                    kill_group(proc.pid)
                    code, timed_out = proc.wait(), True
                    break
        wall = time.perf_counter() - start
    sampler_cpu = sum(me.cpu_times()[:2]) - cpu_before
    return Measurement(exit_code=code, wall_s=wall, peak_pss_mb=peak / MB, peak_procs=len(peak_parts),
                       peak_breakdown=describe(peak_parts), lingering=wait_for_leftovers(seen, proc.pid),
                       sampler_cpu_s=sampler_cpu, timed_out=timed_out)


def kill_group(pgid: int) -> None:
    """Terminate the process group the harness started (start_new_session: pgid == pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


# ---------------------------------------------------------------- checking outputs

def dir_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def count_arrow_rows(path: Path) -> int:
    """Rows of every Arrow IPC (stream or file) and Parquet file at or under `path` (hidden dirs skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if not any(part.startswith(".") for part in f.relative_to(path).parts))
    rows = 0
    for f in files:
        if f.suffix == ".parquet":
            rows += pq.ParquetFile(f).metadata.num_rows
        elif f.suffix == ".arrow":
            with pa.memory_map(str(f)) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                    rows += sum(b.num_rows for b in reader)
                except pa.ArrowInvalid:
                    rows += pa.ipc.open_file(source).read_all().num_rows
    return rows


def manifest_rows(outdir: Path) -> int | None:
    """Rows according to embedpipe's manifest.json "counts" (an int or a dict of counts)."""
    for manifest in (outdir / "manifest.json", outdir / "tokens" / "manifest.json"):
        if not manifest.is_file():
            continue
        counts = json.loads(manifest.read_text()).get("counts")
        if isinstance(counts, int):
            return counts
        if isinstance(counts, dict):
            for key in ("rows_out", "rows", "written", "docs", "documents", "records"):
                if isinstance(counts.get(key), int):
                    return counts[key]
    return None


def count_rows(c: Contender, outdir: Path) -> tuple[int, str]:
    """Rows written by contender `c` into `outdir`, and how they were counted."""
    result = outdir / c.result
    if c.key.startswith("ours"):
        try:
            import datasets

            ds = datasets.load_from_disk(str(result))
            lengths = [len(ds)] if hasattr(ds, "num_rows") and isinstance(ds.num_rows, int) \
                else [len(split) for split in ds.values()]
            return sum(lengths), f"datasets.load_from_disk({c.result})"
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to the manifest
            rows = manifest_rows(outdir)
            if rows is not None:
                return rows, f"manifest.json counts (load_from_disk failed: {exc})"
    if not result.exists():
        raise FileNotFoundError(f"{c.result} not found in the output directory")
    return count_arrow_rows(result), f"Arrow/Parquet files under {c.result}"


def check_output(c: Contender, outdir: Path, corpus: Corpus, run: Run) -> None:
    """Fill `run`'s row count and error from what the contender left in `outdir`."""
    if not outdir.is_dir() or not any(outdir.iterdir()):
        run.error = run.error or "output directory missing or empty"
        return
    run.output_mb = dir_bytes(outdir) / MB
    try:
        run.rows, run.rows_source = count_rows(c, outdir)
    except Exception as exc:  # noqa: BLE001
        run.error = run.error or f"could not count output rows: {exc}"
        return
    if run.rows != corpus.rows:
        run.error = run.error or f"row count mismatch: wrote {run.rows}, corpus has {corpus.rows}"


# ---------------------------------------------------------------- running

def cpu_busy_percent() -> float:
    """How busy the machine's CPUs are (%, all cores) over half a second, before a run starts."""
    return psutil.cpu_percent(interval=0.5)


def contender_env(cache_dir: Path) -> dict[str, str]:
    """The environment of every contender: offline hub, fresh datasets cache, no Ray usage stats."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache_dir), RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    return env


def tail(path: Path, lines: int = 6) -> str:
    """The last lines of a log, for error messages."""
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


def run_contender(c: Contender, corpus: Corpus, workdir: Path, rep: int,
                  timeout_s: float, keep: bool) -> Run:
    """Run contender `c` once on `corpus` in a fresh directory and check what it wrote."""
    rundir = workdir / "tokenize" / Path(corpus.path).stem / f"{c.key}-r{rep}"
    shutil.rmtree(rundir, ignore_errors=True)
    outdir, cache = rundir / "out", rundir / "cache"
    outdir.mkdir(parents=True)
    cache.mkdir()
    log = rundir / "run.log"
    cmd = [sys.executable, str(CONTENDERS_DIR / c.script), corpus.path, str(outdir), *c.args]
    busy = cpu_busy_percent()
    print(f"  {c.label:<30} run {rep + 1} ... ", end="", flush=True)
    m = run_process(cmd, contender_env(cache), log, timeout_s)
    run = Run(contender=c.key, corpus=corpus.path, rep=rep, measurement=m, cpu_busy_before=busy,
              log=str(log), expected_rows=corpus.rows)
    if m.timed_out:
        run.error = f"timed out after {timeout_s:g} s"
    elif m.exit_code != 0:
        run.error = f"exit code {m.exit_code}: {tail(log)}"
    else:
        check_output(c, outdir, corpus, run)
    run.ok = run.error is None
    if not keep:
        shutil.rmtree(outdir, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    status = "ok" if run.ok else f"FAILED: {run.error}"
    print(f"{m.wall_s:7.2f} s  peak PSS {m.peak_pss_mb:7.1f} MB  {status}", flush=True)
    if m.lingering:
        print(f"    note: processes still alive 30 s after exit, terminated: {', '.join(m.lingering)}")
    return run


def run_all(keys: list[str], corpus: Corpus, args: argparse.Namespace) -> list[Run]:
    """Every contender in `keys`, `args.repeat` times, round-robin."""
    runs = []
    for rep in range(args.repeat):
        for key in keys:
            runs.append(run_contender(BY_KEY[key], corpus, args.workdir, rep, args.timeout,
                                      args.keep_outputs))
    return runs


# ---------------------------------------------------------------- reporting

def summarize(runs: list[Run], corpus: Corpus) -> dict[str, dict[str, Any]]:
    """Per contender: median wall time, throughputs and highest peak PSS over its runs."""
    summary: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(r.contender for r in runs):
        mine = [r for r in runs if r.contender == key]
        good = [r for r in mine if r.ok]
        entry: dict[str, Any] = {"ok": len(good) == len(mine), "runs": len(mine),
                                 "errors": [r.error for r in mine if r.error],
                                 "logs": [r.log for r in mine if r.error]}
        timed = good or [r for r in mine if r.measurement.exit_code == 0]  # bad rows: still show the time
        if timed:
            wall = statistics.median(r.wall_s for r in timed)
            entry.update(wall_s=wall, mb_s=corpus.text_bytes / MB / wall, docs_s=corpus.rows / wall,
                         peak_pss_mb=max(r.peak_pss_mb for r in timed))
        summary[key] = entry
    return summary


def evaluate_targets(summary: dict[str, dict[str, Any]], ours_runs: list[Run]) -> list[dict[str, Any]]:
    """PASS/FAIL of every target (peak PSS over all of ours' runs); missing or invalid measurements fail."""
    if "ours" not in summary:
        return []  # nothing to compare (ours not in --only)
    ours = summary["ours"]
    targets = []
    for c in CONTENDERS:
        if c.target is None or c.key not in summary:
            continue
        other = summary[c.key]
        t: dict[str, Any] = {"name": f"ours >= {c.target}x {c.label} throughput", "target": c.target}
        if not ours.get("ok") or "wall_s" not in ours:
            t.update(value=None, status="FAIL", why="ours did not run correctly")
        elif not other.get("ok") or "wall_s" not in other:
            t.update(value=None, status="FAIL", why=f"{c.label} did not run correctly")
        else:
            ratio = other["wall_s"] / ours["wall_s"]
            t.update(value=ratio, status="PASS" if ratio >= c.target else "FAIL")
        targets.append(t)
    peak = max((r.peak_pss_mb for r in ours_runs if r.ok), default=None)
    failed = [r for r in ours_runs if not r.ok]
    pss: dict[str, Any] = {"name": f"ours peak PSS < {PSS_LIMIT_MB:g} MB", "target": PSS_LIMIT_MB,
                           "value": peak}
    if failed:
        pss.update(status="FAIL", why=f"ours failed on {Path(failed[0].corpus).name}")
    else:
        pss.update(status="PASS" if peak is not None and peak < PSS_LIMIT_MB else "FAIL")
    targets.append(pss)
    return targets


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or "-" when missing."""
    return "-" if value is None else format(value, spec)


def print_table(summary: dict[str, dict[str, Any]], corpus: Corpus) -> None:
    """The side-by-side table."""
    print(f"\ncorpus {corpus.path}: {corpus.rows} docs, {corpus.text_bytes / MB:.1f} MB of text "
          f"({corpus.file_bytes / MB:.1f} MB file); {psutil.cpu_count()} CPUs")
    print(f"{'contender':<30} {'wall s':>8} {'MB/s':>7} {'docs/s':>8} {'peak PSS MB':>12}  "
          f"{'rows':<5} ours is")
    ours = summary.get("ours", {})
    for c in CONTENDERS:
        s = summary.get(c.key)
        if s is None:
            continue
        if "wall_s" not in s:
            print(f"{c.label:<30} FAILED: {s['errors'][0][:300] if s['errors'] else '?'}")
            if c.key == "ours":
                print(f"{'':<30} (is the embedpipe CLI ready? command line in {CONTENDERS_DIR / c.script}; "
                      f"log {s['logs'][0] if s['logs'] else '-'})")
            continue
        rows = "ok" if s["ok"] else "BAD"
        ratio = ""
        if c.key != "ours":
            value = f"{s['wall_s'] / ours['wall_s']:.2f}x" if "wall_s" in ours else "n/a"
            ratio = f"{value:<7} (target >= {c.target}x)" if c.target is not None else f"{value:<7} (no target)"
        print(f"{c.label:<30} {s['wall_s']:8.2f} {s['mb_s']:7.2f} {s['docs_s']:8.0f} "
              f"{s['peak_pss_mb']:12.1f}  {rows:<5} {ratio}")
    for c in CONTENDERS:
        for err in summary.get(c.key, {}).get("errors", [])[:1]:
            if "wall_s" in summary[c.key]:
                print(f"  ! {c.label}: {err}")


def print_targets(targets: list[dict[str, Any]]) -> None:
    """One PASS/FAIL line per target."""
    if not targets:
        print("\ntargets: none checked (ours not in --only)")
        return
    print("\ntargets:")
    for t in targets:
        value = t["value"]
        shown = "-" if value is None else (f"{value:.2f}x" if "throughput" in t["name"] else f"{value:.0f} MB")
        why = f"  ({t['why']})" if t.get("why") else ""
        print(f"  {t['status']:<4}  {t['name']:<56} {shown}{why}")


def print_sizes(size_rows: list[dict[str, Any]]) -> None:
    """Ours' peak PSS on corpora of growing size."""
    print("\nours vs corpus size:")
    print(f"  {'corpus':<36} {'MB text':>8} {'docs':>8} {'wall s':>8} {'MB/s':>7} {'peak PSS MB':>12}")
    for r in size_rows:
        print(f"  {Path(r['corpus']).name:<36} {r['text_mb']:8.1f} {r['rows']:8d} "
              f"{fmt(r.get('wall_s'), '8.2f'):>8} {fmt(r.get('mb_s'), '7.2f'):>7} "
              f"{fmt(r.get('peak_pss_mb'), '12.1f'):>12}  {r.get('error') or ''}")
    peaks = [r for r in size_rows if r.get("peak_pss_mb") and r.get("ok")]
    if len(peaks) >= 2:
        first, last = peaks[0], peaks[-1]
        print(f"  peak PSS x{last['peak_pss_mb'] / first['peak_pss_mb']:.2f} "
              f"for x{last['text_mb'] / first['text_mb']:.1f} the text")


def size_row(corpus: Corpus, runs: list[Run]) -> dict[str, Any]:
    """One line of the size table from ours' runs on `corpus`."""
    row: dict[str, Any] = {"corpus": corpus.path, "text_mb": corpus.text_bytes / MB, "rows": corpus.rows}
    s = summarize(runs, corpus).get("ours", {})
    row.update(ok=s.get("ok", False), error=(s.get("errors") or [None])[0])
    row.update({k: s[k] for k in ("wall_s", "mb_s", "docs_s", "peak_pss_mb") if k in s})
    return row


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="JSONL corpus with {id, text} rows")
    ap.add_argument("--mb", type=float, help="generate the corpus (default bench-work/corpus-<N>mb.jsonl) "
                    "with N MB of text if it does not exist")
    ap.add_argument("--only", default="ours,a,b,c,c2", help="contenders to run, comma-separated")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender (median wall time)")
    ap.add_argument("--sizes", default="", help="MB of further corpora on which to run ours alone, "
                    "to show its peak PSS as the corpus grows (e.g. 20 or 200,1000)")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work",
                    help="run directories, logs and generated corpora (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per run")
    ap.add_argument("--keep-outputs", action="store_true", help="keep each run's output directory")
    args = ap.parse_args(argv)
    if args.corpus is None and args.mb is None:
        ap.error("pass --corpus PATH or --mb N")
    args.keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(args.keys) - set(BY_KEY)
    if unknown:
        ap.error(f"unknown contenders {sorted(unknown)}; choose from {list(BY_KEY)}")
    args.size_mbs = [float(x) for x in args.sizes.split(",") if x.strip()]
    args.workdir = args.workdir.resolve()
    return args


def load_corpus(path: Path | None, mb: float | None, workdir: Path) -> Corpus:
    path = path or workdir / f"corpus-{mb:g}mb.jsonl"
    path = ensure_corpus(path.resolve(), mb)
    print(f"reading {path} ...", flush=True)
    return corpus_stats(path)


def versions() -> dict[str, str]:
    """Versions of the libraries the contenders use."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("tokenizers", "transformers", "datasets", "ray", "pyarrow", "psutil"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def tokenizer_floor(corpus: Corpus) -> float:
    """Seconds the tokenizer alone needs for every text of `corpus` (see contenders/tokenizer_floor.py)."""
    done = subprocess.run([sys.executable, str(CONTENDERS_DIR / "tokenizer_floor.py"), corpus.path],
                          env=contender_env(Path(os.devnull)), capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["tokenize_s"])


def print_floor(floor_s: float, summary: dict[str, dict[str, Any]]) -> None:
    """The floor next to the wall time each throughput target asks of ours."""
    print(f"\ntokenizer alone (texts in memory, no I/O, all cores): {floor_s:.2f} s; no contender can beat it")
    for c in CONTENDERS:
        if c.target is not None and "wall_s" in summary.get(c.key, {}):
            needed = summary[c.key]["wall_s"] / c.target
            verdict = "below the floor: unreachable here" if needed < floor_s else "above the floor"
            print(f"  {c.target}x {c.label} asks ours for <= {needed:.2f} s = {needed / floor_s:.2f}x the floor "
                  f"({verdict})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    corpus = load_corpus(args.corpus, args.mb, args.workdir)
    print(f"running {', '.join(args.keys)} x{args.repeat} on {corpus.path}", flush=True)
    runs = run_all(args.keys, corpus, args)
    summary = summarize(runs, corpus)
    print("timing the tokenizer alone", flush=True)
    floor_s = tokenizer_floor(corpus)

    size_rows: list[dict[str, Any]] = []
    if args.size_mbs:
        if "ours" in args.keys and summary["ours"]["ok"]:
            size_rows.append(size_row(corpus, [r for r in runs if r.contender == "ours"]))
            for mb in args.size_mbs:
                big = load_corpus(None, mb, args.workdir)
                print(f"running ours on {big.path}", flush=True)
                big_runs = [run_contender(BY_KEY["ours"], big, args.workdir, 0, args.timeout,
                                          args.keep_outputs)]
                runs += big_runs
                size_rows.append(size_row(big, big_runs))
        else:
            print("--sizes skipped: ours is not in --only or did not run correctly")

    targets = evaluate_targets(summary, [r for r in runs if r.contender == "ours"])
    print_table(summary, corpus)
    if size_rows:
        print_sizes(size_rows)
    print_floor(floor_s, summary)
    print_targets(targets)
    busy = [r for r in runs if r.cpu_busy_before > BUSY_PERCENT]
    if busy:
        print(f"\nnote: the CPUs were more than {BUSY_PERCENT:g}% busy just before {len(busy)} run(s) "
              f"(max {max(r.cpu_busy_before for r in busy):.0f}%): other work competed, timings are noisy")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"corpus": asdict(corpus), "cpus": psutil.cpu_count(), "versions": versions(),
                  "summary": summary, "tokenizer_floor_s": floor_s, "targets": targets, "sizes": size_rows,
                  "runs": [asdict(r) for r in runs]}
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nresults written to {args.json}")
    all_ok = all(r.ok for r in runs) and all(t["status"] == "PASS" for t in targets)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
