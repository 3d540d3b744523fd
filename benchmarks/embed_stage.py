"""Benchmark of `embedpipe run` against SentenceTransformer.encode on the same rows, in one run.

    python benchmarks/embed_stage.py --json bench-work/embed.json             # both shapes (about 20 min on 2 cores)
    python benchmarks/embed_stage.py --shape one-shard --rows 3000            # one shape

Shapes (MiniLM, max_length 256, on the machine's CPUs or GPUs):
  one-shard       --rows rows (default 3,000) in ONE token shard (output.shard_rows 10,000, the default), the case
                  where a job has fewer shards than encoders; also run with one CPU (one encoder actor) to
                  print the scaling from 1 to N actors;
  several-shards  --rows-large rows (default 10,000) in shards of 2,500 rows.
Each contender is a whole separate process, so start-up and model loading count for everyone:
  * `embedpipe run` (both stages, fresh output) with the default float32, and with `encoder.dtype: bfloat16`
    (one-shard also with `encoder.packed: true`, the unpadded forward);
  * SentenceTransformer(minilm).encode(texts, batch_size=32 | 128, normalize_embeddings=True), float32, each in
    its own process (this file with --st-worker), max_seq_length 256, on the same device.
Prints wall time, rows/s, real tokens/s, the padding waste embedpipe's forwards really had (computed positions
counted as they ran, from the manifest's ``computed_tokens``; sentence-transformers' is computed from its batch
rule: sorted by characters, each batch padded to its longest row), the per-row cosine to sentence-transformers
(bs 32), and the targets: float32 run >= 1.4x the faster sentence-transformers setting with min cosine >= 0.9999;
bfloat16 run >= 2.5x with min cosine >= 0.999.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# No TOKENIZERS_PARALLELISM here: sentence-transformers keeps its tokenizer threads, as users run it.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
MAX_LENGTH = 256
TARGETS = {"float32": (1.4, 0.9999), "bfloat16": (2.5, 0.999)}  # speed-up over the faster ST, min cosine


def st_worker(texts_path: Path, batch_size: int, out_npy: Path, device: str) -> None:
    """In a fresh process: load the model, encode, save embeddings and the encode-call time."""
    started = time.perf_counter()
    from sentence_transformers import SentenceTransformer

    from pipeline.tokenize.loading import resolve_alias

    model = SentenceTransformer(resolve_alias("minilm"), device=device)
    model.max_seq_length = MAX_LENGTH
    texts = json.loads(texts_path.read_text(encoding="utf-8"))
    loaded = time.perf_counter()
    embeddings = model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    done = time.perf_counter()
    np.save(out_npy, embeddings)
    print(json.dumps({"load_s": loaded - started, "encode_s": done - loaded}))


def cpu_model() -> str:
    """The processor's model name (lscpu's), for the figures' context."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def native_bfloat16() -> bool:
    """Whether oneDNN has native bfloat16 kernels here (AVX512-BF16 or AMX)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bfloat16_speedup() -> float:
    """bfloat16 over float32 speed of MiniLM's widest linear layer (384 x 1536, 2,048 tokens) on one thread."""
    import torch

    from pipeline.encode.cpu_linear import bfloat16_linear_speedup

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bfloat16_linear_speedup(384, 1536, tokens=2048, repeats=9)
    finally:
        torch.set_num_threads(threads)


def timed(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def embedpipe_run(rows_path: Path, out: Path, shard_rows: int, settings: list[str]) -> float:
    """`embedpipe run` of the default job (MiniLM, mean pooling, normalized) on these rows, as a whole process."""
    sets = [f"input.path={rows_path}", "input.id_column=id", f"tokenizer.max_length={MAX_LENGTH}",
            f"output.shard_rows={shard_rows}", *settings]
    cmd = [sys.executable, "-m", "jobs.cli", "run", "conf/default.yaml", *(a for k in sets for a in ("--set", k)),
           "--no-progress", "-o", str(out)]
    return timed(cmd)[0]


def read_run(out: Path) -> dict:
    """The run's vectors in row order (float32), its real and computed tokens, and its shape on the cluster."""
    import pyarrow as pa

    from pipeline.output.embedding_format import bfloat16_bits_to_float32

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    shards = manifest["stages"]["embeddings"]["shards"]
    vectors = []
    for name in sorted(shards):
        table = pa.ipc.open_stream(pa.memory_map(str(out / "embeddings" / name))).read_all()
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors.append(flat.reshape(len(table), -1))
    array = np.concatenate(vectors)
    if array.dtype == np.uint16:
        array = bfloat16_bits_to_float32(array)
    report = json.loads(sorted((out / "reports").glob("*.json"))[-1].read_text(encoding="utf-8"))
    return {"vectors": array.astype(np.float32), "shards": len(shards),
            "tokens": sum(s["tokens"] for s in shards.values()),
            "computed_tokens": sum(s["computed_tokens"] for s in shards.values()),
            "pieces": sum(s["pieces"] for s in shards.values()),
            "encoders": max(s["encoders"] for s in shards.values()),
            "device": "cuda" if report["cluster"]["gpus"] else "cpu"}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def st_waste(texts: list[str], batch_size: int) -> float:
    """Computed / real tokens of sentence-transformers' batches: sorted by characters, padded per batch."""
    from transformers import AutoTokenizer

    from pipeline.tokenize.loading import resolve_alias

    tokenizer = AutoTokenizer.from_pretrained(resolve_alias("minilm"))
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]])
    order = np.argsort([-len(t) for t in texts], kind="stable")
    computed = sum(len(b) * lengths[b].max() for b in np.array_split(order, range(batch_size, len(order), batch_size)))
    return computed / lengths.sum()


def write_rows(corpus: Path, n: int, work: Path) -> tuple[Path, Path, list[str]]:
    rows = [json.loads(line) for _, line in zip(range(n), corpus.open(encoding="utf-8"))]
    if len(rows) < n:
        raise SystemExit(f"{corpus} has {len(rows)} rows, fewer than the {n} asked for")
    texts = [r["text"] for r in rows]
    rows_path, texts_path = work / "rows.jsonl", work / "texts.json"
    rows_path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n"
                                 for r in rows), encoding="utf-8")
    texts_path.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    return rows_path, texts_path, texts


def run_shape(name: str, rows: int, shard_rows: int, corpus: Path, work: Path, scaling: bool, bf16: bool) -> dict:
    """Every contender on one shape; returns the figures (also printed)."""
    work.mkdir(parents=True)
    rows_path, texts_path, texts = write_rows(corpus, rows, work)
    contenders = {"float32": []}
    if bf16:
        contenders["bfloat16"] = ["encoder.dtype=bfloat16"]
    if scaling:
        contenders["float32, 1 CPU (1 actor)"] = ["ray.num_cpus=1"]
        contenders["float32, Ray executor"] = ["ray.executor=ray"]
        contenders["float32, packed"] = ["encoder.packed=true"]
        if bf16:
            contenders["bfloat16, packed"] = ["encoder.dtype=bfloat16", "encoder.packed=true"]
    runs = {}
    for label, settings in contenders.items():
        out = work / f"out-{len(runs)}"
        wall = embedpipe_run(rows_path, out, shard_rows, settings)
        runs[label] = {"process_s": wall, **read_run(out)}
    device = runs["float32"]["device"]
    st = {}
    for batch_size in (32, 128):
        npy = work / f"st{batch_size}.npy"
        wall, stdout = timed([sys.executable, str(Path(__file__).resolve()),
                              "--st-worker", str(texts_path), str(batch_size), str(npy), device])
        st[batch_size] = {"process_s": wall, **json.loads(stdout.strip().splitlines()[-1]),
                          "waste": st_waste(texts, batch_size), "vectors": np.load(npy)}
    reference = st[32]["vectors"]
    for run in runs.values():
        run["min_cosine"] = min_cosine(run.pop("vectors"), reference)
    st128_cos = min_cosine(st[128].pop("vectors"), reference)
    st[32].pop("vectors")
    fastest = min(s["process_s"] for s in st.values())
    tokens = runs["float32"]["tokens"]

    print(f"\n== {name}: {rows} rows in {runs['float32']['shards']} shard(s), {tokens:,} real tokens, MiniLM on "
          f"{device}, max_length {MAX_LENGTH}, {os.cpu_count()} CPUs")
    print(f"{'contender':34} {'process s':>9} {'rows/s':>7} {'tokens/s':>9} {'waste':>6} {'min cos':>9} "
          f"{'pieces':>6} {'actors':>6}  vs the faster ST")
    for label, run in runs.items():
        waste = run["computed_tokens"] / run["tokens"]
        print(f"{'embedpipe run, ' + label:34} {run['process_s']:9.1f} {rows / run['process_s']:7.1f} "
              f"{tokens / run['process_s']:9.0f} {waste:6.3f} {run['min_cosine']:9.6f} {run['pieces']:6d} "
              f"{run['encoders']:6d}  {fastest / run['process_s']:.2f}x")
        run["waste"] = waste
    for batch_size, s in st.items():
        cos = "reference" if batch_size == 32 else f"{st128_cos:9.6f}"
        print(f"{'SentenceTransformer bs=' + str(batch_size):34} {s['process_s']:9.1f} {rows / s['process_s']:7.1f} "
              f"{tokens / s['process_s']:9.0f} {s['waste']:6.3f} {cos:>9} {'':6} {'':6}  "
              f"{fastest / s['process_s']:.2f}x (encode call alone {s['encode_s']:.1f} s)")
    if scaling:
        one = runs["float32, 1 CPU (1 actor)"]
        print(f"scaling: 1 actor {one['process_s']:.1f} s -> {runs['float32']['encoders']} actors "
              f"{runs['float32']['process_s']:.1f} s = {one['process_s'] / runs['float32']['process_s']:.2f}x "
              f"(whole processes, tokenize and start-up included)")
    targets = []
    for dtype, (speedup, cosine) in TARGETS.items():
        run = runs.get(dtype)
        if run is None:
            targets.append({"name": f"{name}: {dtype} run >= {speedup}x the faster ST", "value": None,
                            "pass": None, "why": "not run: this CPU has no native bfloat16 (AVX512-BF16 or AMX)"})
            continue
        ratio = fastest / run["process_s"]
        targets.append({"name": f"{name}: {dtype} run >= {speedup}x the faster ST", "value": ratio,
                        "pass": ratio >= speedup})
        targets.append({"name": f"{name}: {dtype} min cosine >= {cosine}", "value": run["min_cosine"],
                        "pass": run["min_cosine"] >= cosine})
    return {"rows": rows, "shard_rows": shard_rows, "device": device, "tokens": tokens, "runs": runs,
            "st": {str(k): v for k, v in st.items()}, "st128_min_cosine": st128_cos, "targets": targets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=REPO / "bench-work" / "corpus-18mb.jsonl")
    ap.add_argument("--shape", choices=["one-shard", "several-shards", "both"], default="both")
    ap.add_argument("--rows", type=int, default=3_000)
    ap.add_argument("--rows-large", type=int, default=10_000)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "embed")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--bf16", action="store_true", help="run the bfloat16 contenders on a CPU without native bfloat16")
    ap.add_argument("--st-worker", nargs=4, metavar=("TEXTS", "BATCH", "NPY", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.st_worker:
        st_worker(Path(args.st_worker[0]), int(args.st_worker[1]), Path(args.st_worker[2]), args.st_worker[3])
        return
    if not args.corpus.exists():  # real-looking text from the docs of this virtualenv's packages
        make_corpus = REPO.parent / "shared" / "tools" / "make_corpus.py"
        args.corpus.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(make_corpus), str(args.corpus), "--mb", "20"], check=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    bf16 = args.bf16 or native_bfloat16()
    speedup = bfloat16_speedup() if native_bfloat16() else None
    print(f"CPU: {cpu_model()}; native bfloat16 kernels: {native_bfloat16()}"
          + (f"; a MiniLM linear layer runs {speedup:.2f}x float32 in bfloat16 (one thread)" if speedup else "")
          + ("" if bf16 else " -> the bfloat16 contenders are not run (torch would emulate bfloat16, several "
                             "times slower than float32; --bf16 runs them anyway)"))
    shapes = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "native_bfloat16": native_bfloat16(),
                          "bfloat16_linear_speedup": speedup}}
    if args.shape in ("one-shard", "both"):
        shapes["one-shard"] = run_shape("one-shard", args.rows, 10_000, args.corpus, args.workdir / "one-shard", True,
                                        bf16)
    if args.shape in ("several-shards", "both"):
        shapes["several-shards"] = run_shape("several-shards", args.rows_large, 2_500, args.corpus,
                                             args.workdir / "several-shards", False, bf16)
    print("\ntargets:")
    for shape in (v for k, v in shapes.items() if k != "machine"):
        for target in shape["targets"]:
            if target["pass"] is None:
                print(f"  ----  {target['name']:58} {target['why']}")
                continue
            print(f"  {'PASS' if target['pass'] else 'FAIL'}  {target['name']:58} {target['value']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(shapes, indent=1))


if __name__ == "__main__":
    main()
