"""Benchmark of the embed stage against SentenceTransformer.encode, on the same rows, in one run.

    python benchmarks/embed_stage.py --corpus bench-work/corpus-18mb.jsonl --rows 10000 --json bench-work/embed.json

Steps, each a whole separate process (so start-up and model loading count for everyone):
  1. `embedpipe tokenize` the first --rows rows (MiniLM, max_length 128) into OUT (reported, not compared);
  2. `embedpipe embed` on OUT (the embed stage alone);
  3. the same with `encoder.cpu_linear: torch` (torch's own MKL kernels instead of oneDNN with packed
     weights: what the kernel choice is worth by itself), on tokens made again into another OUT because the
     setting is part of the config hash (that tokenize is not timed);
  4. `embedpipe run` into a fresh OUT2 (both stages, overlapping);
  5. SentenceTransformer(minilm).encode(texts, batch_size=32 | 128, normalize_embeddings=True), each in
     its own process (this file with --st-worker), max_seq_length = max_length, on the embed stage's device.
Prints rows/s and real tokens/s (the token shards' total `length`, the same for all), padding waste
(computed tokens / real tokens: sentence-transformers sorts by characters and pads each batch to its
longest row in tokens; embedpipe from its own batch plan), the per-row cosine between embedpipe's and
each sentence-transformers output, and the targets: embed >= 1.4x the faster sentence-transformers
setting (process vs process), min cosine >= 0.9999, run < 1.15x embed. Also the model FLOPs of the
embed stage's batches and the rate it achieved (on a GPU, with --peak-tflops, as a share of the card's
bf16 peak). `--set K=V` passes settings to every embedpipe command, e.g. on a GPU
`--set encoder.dtype=bfloat16 --peak-tflops 312` (A100).
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


def st_worker(texts_path: Path, batch_size: int, max_length: int, out_npy: Path, device: str) -> None:
    """In a fresh process: load the model, encode, save embeddings and the encode-call time."""
    started = time.perf_counter()
    from sentence_transformers import SentenceTransformer

    from pipeline.tokenize.loading import resolve_alias

    model = SentenceTransformer(resolve_alias("minilm"), device=device)
    model.max_seq_length = max_length
    texts = json.loads(texts_path.read_text(encoding="utf-8"))
    loaded = time.perf_counter()
    embeddings = model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    done = time.perf_counter()
    np.save(out_npy, embeddings)
    print(json.dumps({"load_s": loaded - started, "encode_s": done - loaded}))


def timed(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def embedpipe(command: str, rows_path: Path, out: Path, max_length: int, shard_rows: int, *extra: str) -> float:
    cmd = [sys.executable, "-m", "jobs.cli", command, "conf/default.yaml", "--set", f"input.path={rows_path}",
           "--set", "input.id_column=id", "--set", f"tokenizer.max_length={max_length}",
           "--set", f"output.shard_rows={shard_rows}", *(a for k in extra for a in ("--set", k)),
           "--no-progress", "-o", str(out)]
    return timed(cmd)[0]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def read_embedding_shards(out: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    import pyarrow as pa

    vectors, lengths = [], []
    for shard in sorted((out / "embeddings").glob("data-*.arrow")):
        table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
        column = table.column("embedding").combine_chunks()
        vectors.append(column.flatten().to_numpy().reshape(len(table), -1))
        tokens = pa.ipc.open_stream(pa.memory_map(str(out / "tokens" / shard.name))).read_all()
        lengths.append(tokens.column("length").to_numpy())
    return np.concatenate(vectors), lengths


def st_waste(texts: list[str], batch_size: int, max_length: int) -> float:
    """Computed / real tokens of sentence-transformers' batches: sorted by characters, padded per batch."""
    from transformers import AutoTokenizer

    from pipeline.tokenize.loading import resolve_alias

    tokenizer = AutoTokenizer.from_pretrained(resolve_alias("minilm"))
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]])
    order = np.argsort([-len(t) for t in texts], kind="stable")
    computed = sum(len(b) * lengths[b].max() for b in np.array_split(order, range(batch_size, len(order), batch_size)))
    return computed / lengths.sum()


def encoder_flops(lengths: list[np.ndarray], tokens_per_batch: int) -> float:
    """Model FLOPs of the embed stage's batches: per layer and computed token, 2 x (4 d^2 + 2 d ff) for the
    linear layers and 2 x 2 x width x d for attention (scores, weighted sum); embeddings and norms left out."""
    from pipeline.encode.forward import WIDTH_MULTIPLE, padded_width, plan_batches
    from pipeline.tokenize.loading import resolve_alias

    config = json.loads((Path(resolve_alias("minilm")) / "config.json").read_text(encoding="utf-8"))
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    total = 0.0
    for shard in lengths:
        for rows in plan_batches(shard, tokens_per_batch):
            width = padded_width(int(shard[rows].max()), WIDTH_MULTIPLE)
            total += len(rows) * width * layers * (2 * (4 * d * d + 2 * d * ff) + 4 * width * d)
    return total


def embed_device(out: Path) -> str:
    """"cuda" if the embed stage's cluster had GPUs (its run report says), else "cpu"."""
    report = json.loads(sorted((out / "reports").glob("*.json"))[-1].read_text(encoding="utf-8"))
    return "cuda" if report["cluster"]["gpus"] else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=REPO / "bench-work" / "corpus-18mb.jsonl")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--shard-rows", type=int, default=2500)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "embed")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="K=V",
                    help="a setting for every embedpipe command (repeatable)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, to report the share of it "
                    "the embed stage achieved on a GPU")
    ap.add_argument("--st-worker", nargs=4, metavar=("TEXTS", "BATCH", "NPY", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.st_worker:
        st_worker(Path(args.st_worker[0]), int(args.st_worker[1]), args.max_length, Path(args.st_worker[2]),
                  args.st_worker[3])
        return

    from pipeline.encode.forward import DEFAULT_TOKENS_PER_BATCH, padding_waste, plan_batches

    if not args.corpus.exists():  # real-looking text from the docs of this virtualenv's packages
        make_corpus = REPO.parent / "shared" / "tools" / "make_corpus.py"
        subprocess.run([sys.executable, str(make_corpus), str(args.corpus), "--mb", "20"], check=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    rows = [json.loads(line) for _, line in zip(range(args.rows), args.corpus.open(encoding="utf-8"))]
    texts = [r["text"] for r in rows]
    rows_path = args.workdir / "rows.jsonl"
    rows_path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n"
                                 for r in rows), encoding="utf-8")
    texts_path = args.workdir / "texts.json"
    texts_path.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")

    out, out_torch, out_run = args.workdir / "out", args.workdir / "out-torch-linear", args.workdir / "out-run"
    mine, torch_linear = args.settings, [*args.settings, "encoder.cpu_linear=torch"]
    tokenize_s = embedpipe("tokenize", rows_path, out, args.max_length, args.shard_rows, *mine)
    embedpipe("tokenize", rows_path, out_torch, args.max_length, args.shard_rows, *torch_linear)
    embed_s = embedpipe("embed", rows_path, out, args.max_length, args.shard_rows, *mine)
    embed_torch_s = embedpipe("embed", rows_path, out_torch, args.max_length, args.shard_rows, *torch_linear)
    run_s = embedpipe("run", rows_path, out_run, args.max_length, args.shard_rows, *mine)
    ours, lengths = read_embedding_shards(out)
    ours_torch_linear = read_embedding_shards(out_torch)[0]
    real_tokens = int(sum(l.sum() for l in lengths))
    device = embed_device(out)
    budget = DEFAULT_TOKENS_PER_BATCH[device]
    ours_waste = sum(padding_waste(l, plan_batches(l, budget)) * l.sum() for l in lengths) / real_tokens
    flops = encoder_flops(lengths, budget)

    results = {"rows": len(texts), "real_tokens": real_tokens, "max_length": args.max_length,
               "tokenize_s": tokenize_s, "embed_s": embed_s, "embed_torch_linear_s": embed_torch_s, "run_s": run_s,
               "torch_linear_min_cosine": min_cosine(ours, ours_torch_linear), "embedpipe_waste": ours_waste,
               "device": device, "model_flops": flops, "st": {}}
    for batch_size in (32, 128):
        npy = args.workdir / f"st{batch_size}.npy"
        wall, stdout = timed([sys.executable, str(Path(__file__).resolve()), "--max-length", str(args.max_length),
                              "--st-worker", str(texts_path), str(batch_size), str(npy), device])
        inner = json.loads(stdout.strip().splitlines()[-1])
        results["st"][batch_size] = {"process_s": wall, **inner, "waste": st_waste(texts, batch_size, args.max_length),
                                     "min_cosine": min_cosine(ours, np.load(npy))}

    n = len(texts)
    print(f"\n{n} rows, {real_tokens:,} real tokens, MiniLM on {device}, max_length {args.max_length}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'contender':34} {'process s':>9} {'rows/s':>8} {'tokens/s':>9} {'waste':>6} {'min cos':>9}  embed is")
    print(f"{'embedpipe embed (stage alone)':34} {embed_s:9.1f} {n / embed_s:8.1f} {real_tokens / embed_s:9.0f} "
          f"{ours_waste:6.3f}")
    print(f"{'  the same, cpu_linear: torch':34} {embed_torch_s:9.1f} {n / embed_torch_s:8.1f} "
          f"{real_tokens / embed_torch_s:9.0f} {ours_waste:6.3f} {results['torch_linear_min_cosine']:9.6f}  "
          f"{embed_torch_s / embed_s:.2f}x (what oneDNN's packed linear layers are worth)")
    for batch_size, st in results["st"].items():
        name = f"SentenceTransformer bs={batch_size}"
        print(f"{name:34} {st['process_s']:9.1f} {n / st['process_s']:8.1f} {real_tokens / st['process_s']:9.0f} "
              f"{st['waste']:6.3f} {st['min_cosine']:9.6f}  {st['process_s'] / embed_s:.2f}x process, "
              f"encode call alone {st['encode_s']:.1f} s")
    achieved = flops / embed_s / 1e12
    share = f" = {achieved / args.peak_tflops:.1%} of the {args.peak_tflops:g} TFLOP/s peak" if args.peak_tflops else ""
    print(f"embed stage on {device}: {flops / 1e12:.1f} TFLOP of model FLOPs at {achieved * 1e3:.1f} GFLOP/s over "
          f"its whole process (start-up and model load included){share}")
    results["achieved_tflops"] = achieved
    print(f"embedpipe run (both stages)        {run_s:9.1f}   = {run_s / embed_s:.2f}x the embed stage alone "
          f"(tokenize alone took {tokenize_s:.1f} s)")
    fastest = min(st["process_s"] for st in results["st"].values())
    min_cos = min(st["min_cosine"] for st in results["st"].values())
    targets = [("embed >= 1.4x the faster sentence-transformers setting", fastest / embed_s, fastest / embed_s >= 1.4),
               ("min cosine >= 0.9999", min_cos, min_cos >= 0.9999),
               ("run < 1.15x embed", run_s / embed_s, run_s / embed_s < 1.15)]
    print("\ntargets:")
    for name, value, ok in targets:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:58} {value:.4f}")
    results["targets"] = [{"name": n_, "value": v, "pass": ok} for n_, v, ok in targets]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
