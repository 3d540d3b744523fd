"""One check run: every section in order of importance, each timed and recorded, within a time budget.

Order: the two targets' measurements first (embed path bf16 on the MiniLM shape, SentenceTransformer fp16,
the CLIP-L shape bf16), then float32, the CPU reference and cross cosines, the OOM back-off, the profiles,
a token-budget sweep, our own tokenize rate, ``--full``, and last the targets and the import audit.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gpu_kit import checks, flops, image, layout, reference, st_bench
from gpu_kit.embed import embed_config, read_embeddings
from gpu_kit.models import build_model, parameter_count, read_config
from gpu_kit.results import Results

COSINE_TARGET = {"bfloat16": 0.999, "float16": 0.999, "float32": 0.99999}
EMBED_VS_ST_TARGET = 3.0
CLIP_PEAK_SHARE_TARGET = 0.35
ST_BATCHES = (32, 128)


@dataclasses.dataclass
class Options:
    out_dir: Path
    kit: Path
    work: Path
    device: str
    quick: bool
    tiny_models: bool  # the tiny stand-ins (--quick's default) instead of the real shapes
    full: bool
    peak_tflops: float
    budget_s: float
    ref_rows: dict[str, int]


class Session:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.deadline = time.perf_counter() + opts.budget_s
        self.kit_info = layout.read_kit(opts.kit)
        self.results = Results(opts.out_dir, {
            "what": "embedpipe GPU check (issue 17)", "device": opts.device, "quick": opts.quick,
            "models": "tiny stand-ins" if opts.tiny_models else "real shapes (random weights)",
            "peak_tflops_bf16": opts.peak_tflops, "budget_s": opts.budget_s,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "kit": {k: self.kit_info.get(k) for k in ("corpus", "texts", "wheels", "travelling_bytes")},
        })
        self.model_dirs: dict[str, Path] = {}
        self.encoders: dict[tuple[str, str], Any] = {}
        self.names: dict[tuple[str, str], list[str]] = {}
        self.vectors: dict[str, np.ndarray] = {}

    # -- helpers -----------------------------------------------------------------------------------------
    def model_name(self, shard_set: layout.ShardSet) -> str:
        return shard_set.quick_model if self.o.tiny_models else shard_set.model

    def work_dir(self, set_name: str, dtype: str) -> Path:
        return self.o.work / f"embed-{set_name}-{dtype}"

    def texts(self) -> tuple[list[str], list[str]]:
        with gzip.open(self.o.kit / layout.TEXTS, "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        n = self.kit_info["sets"]["minilm-256"]["rows"]
        return [r["id"] for r in rows[:n]], [r["text"] for r in rows[:n]]

    def kit_arrays(self, set_name: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids, input_ids, attention_mask, token_type_ids) of every row of a set, from the kit's shards."""
        from pipeline.encode.stage import token_arrays

        tables = []
        for path in layout.shard_paths(self.o.kit, set_name):
            with pa.memory_map(str(path)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        table = pa.concat_tables(tables)
        ids, mask, types = token_arrays(table)
        return table.column("id").to_pylist(), ids, mask, types

    def all_embeddings(self, set_name: str, dtype: str) -> np.ndarray:
        work = self.work_dir(set_name, dtype)
        return np.concatenate([read_embeddings(work, n) for n in self.names[(set_name, dtype)]])

    # -- sections ----------------------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        import torch
        import transformers

        env: dict[str, Any] = {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "pyarrow": pa.__version__, "numpy": np.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
        for name in ("sentence_transformers", "pydantic", "tokenizers", "upath", "fsspec", "typing_extensions"):
            try:
                module = __import__(name)
                where = Path(module.__file__).parent
                where = where.parent if module.__file__.endswith("__init__.py") else where
                env[name] = f"{getattr(module, '__version__', '?')} from {where}"
            except ImportError as exc:
                env[name] = f"unavailable: {exc}"
        if self.o.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_bytes=props.total_memory,
                       multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
            try:
                query = "name,driver_version,clocks.sm,clocks.max.sm,memory.used,power.draw,temperature.gpu"
                env["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                                                   capture_output=True, text=True, timeout=20,
                                                   check=False).stdout.strip()
            except (OSError, subprocess.SubprocessError) as exc:
                env["nvidia_smi"] = f"unavailable: {exc}"
        return env

    def models(self) -> dict[str, Any]:
        out = {}
        for shard_set in layout.SETS.values():
            name = self.model_name(shard_set)
            started = time.perf_counter()
            self.model_dirs[shard_set.name] = build_model(self.o.kit, name, self.o.work)
            config = read_config(self.model_dirs[shard_set.name])
            out[shard_set.name] = {"model": name, "parameters": parameter_count(self.model_dirs[shard_set.name]),
                                   "shape": dataclasses.asdict(flops.Shape.of(config)),
                                   "build_s": time.perf_counter() - started,
                                   "weights": "random (seeded); speed does not depend on them"}
        return out

    def embed(self, set_name: str, dtype: str) -> dict[str, Any]:
        shard_set = layout.SETS[set_name]
        # Pooled vectors are small: float32 whatever the compute dtype. Per-token bf16 is stored as bf16
        # (77 x 768 floats a row: a Stable Diffusion job stores what its UNet reads).
        output_dtype = dtype if shard_set.pooling == "none" else "float32"
        result, encoder, names = embed_config(
            self.o.kit, shard_set, self.model_dirs[set_name], self.o.device, dtype, output_dtype,
            self.work_dir(set_name, dtype), peak_tflops=self.o.peak_tflops, deadline=self.deadline, quick=self.o.quick)
        self.encoders[(set_name, dtype)], self.names[(set_name, dtype)] = encoder, names
        if shard_set.pooling != "none":
            self.vectors[f"embed/{dtype}"] = self.all_embeddings(set_name, dtype)
        return result

    def st(self, dtype: str, batch_size: int) -> dict[str, Any]:
        ids, texts = self.texts()
        kit_ids, _, mask, _ = self.kit_arrays("minilm-256")
        if ids != kit_ids:
            raise RuntimeError("the kit's texts and its minilm-256 shards are not in the same row order")
        lengths = mask.sum(axis=1).astype(np.int64)
        result, vectors = st_bench.run_st(
            self.model_dirs["minilm-256"], texts, lengths, self.o.device, dtype, batch_size,
            layout.SETS["minilm-256"].max_length, self.o.peak_tflops,
            warm_up_texts=16 if self.o.quick else st_bench.WARM_UP_TEXTS)
        self.vectors[f"st/{dtype}/{batch_size}"] = vectors
        return result

    def cpu_reference(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for set_name, shard_set in layout.SETS.items():
            _, ids, mask, types = self.kit_arrays(set_name)
            lengths = mask.sum(axis=1)
            rows = reference.subsample(len(ids), self.o.ref_rows[set_name], lengths)
            want, seconds = reference.cpu_forward(self.model_dirs[set_name], ids[rows], mask[rows],
                                                  None if types is None else types[rows], shard_set.pooling,
                                                  shard_set.use_attention_mask)
            entry: dict[str, Any] = {"rows_compared": len(rows), "rows_total": len(ids),
                                     "subsample": bool(len(rows) < len(ids)), "cpu_s": seconds,
                                     "how": "plain transformers forward, float32, this machine's CPU"}
            if entry["subsample"]:
                entry["why_subsample"] = ("a CPU float32 run of every row would take minutes; rows drawn at random "
                                          "(seed 0), plus the shortest and the longest")
            for dtype in ("bfloat16", "float32"):
                if (set_name, dtype) not in self.names:
                    entry[f"embed/{dtype}"] = {"skipped": "that embed run did not complete"}
                    continue
                got = self._rows_of(set_name, dtype, rows)
                entry[f"embed/{dtype}"] = reference.judge(reference.compare(got, want), COSINE_TARGET[dtype])
            if shard_set.pooling == "mean":
                for key, vectors in self.vectors.items():
                    if key.startswith("st/"):
                        entry[key] = reference.judge(reference.compare(vectors[rows], want),
                                                     COSINE_TARGET[key.split("/")[1]])
            out[set_name] = entry
        return out

    def _rows_of(self, set_name: str, dtype: str, rows: np.ndarray) -> np.ndarray:
        if f"embed/{dtype}" in self.vectors and set_name == "minilm-256":
            return self.vectors[f"embed/{dtype}"][rows]
        work, names = self.work_dir(set_name, dtype), self.names[(set_name, dtype)]
        picked, offset = [], 0
        for name in names:
            shard = read_embeddings(work, name)
            inside = rows[(rows >= offset) & (rows < offset + len(shard))] - offset
            picked.append(shard[inside])
            offset += len(shard)
        return np.concatenate(picked)

    def cross(self) -> dict[str, Any]:
        """Every row: bf16 against fp32 on this device; SentenceTransformer against the embed path."""
        out: dict[str, Any] = {}
        if ("clip-77", "bfloat16") in self.names and ("clip-77", "float32") in self.names:
            parts = [reference.compare(read_embeddings(self.work_dir("clip-77", "bfloat16"), n),
                                       read_embeddings(self.work_dir("clip-77", "float32"), n))
                     for n in self.names[("clip-77", "float32")]]
            out["clip-77 embed bfloat16 vs float32"] = reference.judge(reference.merge(parts),
                                                                       COSINE_TARGET["bfloat16"])
        pairs = [("embed/bfloat16", "embed/float32", "bfloat16")]
        pairs += [(f"st/float32/{b}", "embed/float32", "float32") for b in ST_BATCHES]
        pairs += [(f"st/float16/{b}", "embed/float32", "float16") for b in ST_BATCHES]
        for got, want, dtype in pairs:
            if got in self.vectors and want in self.vectors:
                out[f"minilm-256 {got} vs {want}"] = reference.judge(
                    reference.compare(self.vectors[got], self.vectors[want]), COSINE_TARGET[dtype])
        return out

    def oom(self) -> dict[str, Any]:
        key = ("minilm-256", "float32")
        work, names = self.work_dir(*key), self.names[key]
        _, _, mask, _ = self.kit_arrays("minilm-256")
        lengths = mask.sum(axis=1)[:len(read_embeddings(work, names[0]))]
        result = checks.oom_backoff(self.encoders[key], work, names[0], lengths, self.o.device,
                                    COSINE_TARGET["float32"])
        if self.o.device != "cuda":
            result["memory_fraction"] = "skipped: cpu"
        return result

    def profile(self, set_name: str) -> dict[str, Any]:
        key = (set_name, "bfloat16")
        return checks.profile_shard(self.encoders[key], self.work_dir(*key), self.names[key][0], self.o.device)

    def sweep(self) -> dict[str, Any]:
        """encode_rows alone on the first shard at other token budgets: what a larger batch would give."""
        from pipeline.encode.forward import encode_rows
        from pipeline.encode.stage import token_arrays
        from pipeline.output.contract import TOKENS
        from pipeline.output.shards import read_shard

        budgets = (512, 2048) if self.o.quick else (8192, 16384, 65536, 131072)
        out: dict[str, Any] = {}
        for set_name in layout.SETS:
            encoder = self.encoders[(set_name, "bfloat16")]
            work, name = self.work_dir(set_name, "bfloat16"), self.names[(set_name, "bfloat16")][0]
            tokens = read_shard(work / TOKENS / name)
            ids, mask, types = token_arrays(tokens)
            shape = flops.Shape.of(read_config(self.model_dirs[set_name]))
            spec = encoder.spec
            lengths = tokens.column("length").to_numpy()
            work_flops = (flops.total_flops(lengths, shape) if spec.options.use_attention_mask
                          else len(lengths) * float(flops.row_flops(np.array([spec.seq_len]), shape)[0]))
            entry = {}
            for budget in budgets:
                options = dataclasses.replace(spec.options, max_tokens_per_batch=budget)
                times = []
                for _ in range(1 if self.o.quick else 2):
                    started = time.perf_counter()
                    encode_rows(encoder.model, ids, mask, types, options, padding_side=spec.padding_side)
                    times.append(time.perf_counter() - started)
                best = min(times)
                entry[str(budget)] = {"s": best, "rows_per_s": len(ids) / best,
                                      "model_tflops": work_flops / best / 1e12,
                                      "model_share_of_bf16_peak": work_flops / best / 1e12 / self.o.peak_tflops}
            out[set_name] = {"shard": name, "rows": len(ids), "default_budget": spec.options.max_tokens_per_batch,
                             "budgets": entry}
        return out

    def tokenize(self) -> dict[str, Any]:
        """The tokenize stage's own rate on the same texts, one process (it runs on the CPUs, beside the GPU)."""
        from gpu_kit.prepare import job_config
        from pipeline.tokenize.core import to_table, tokenize_texts
        from pipeline.tokenize.loading import load_tokenize_spec

        ids, texts = self.texts()
        spec = load_tokenize_spec(job_config(self.o.kit / layout.TOKENIZER, layout.SETS["minilm-256"]))
        started = time.perf_counter()
        for start in range(0, len(texts), 10_000):
            to_table(spec, tokenize_texts(spec, ids[start:start + 10_000], texts[start:start + 10_000]))
        seconds = time.perf_counter() - started
        return {"rows": len(texts), "s": seconds, "rows_per_s": len(texts) / seconds, "processes": 1}

    def targets(self) -> dict[str, Any]:
        s = self.results.data["sections"]
        judged = self.o.device == "cuda" and not self.o.quick and not self.o.tiny_models
        out: dict[str, Any] = {"judged": judged}
        if not judged:
            out["note"] = "not judged: the targets are for the real shapes on the H200 (this is a --quick or cpu run)"
        embed = s.get("embed/minilm-256/bfloat16") or {}
        st = [s.get(f"sentence_transformers/float16/{b}") or {} for b in ST_BATCHES]
        st_best = max(st, key=lambda r: r.get("rows_per_s", 0))
        if "embed_shard" in embed and st_best.get("rows_per_s"):
            ratio = embed["embed_shard"]["rows_per_s"] / st_best["rows_per_s"]
            out["embed_vs_sentence_transformers_fp16"] = {
                "target": f">= {EMBED_VS_ST_TARGET}x", "embed_rows_per_s": embed["embed_shard"]["rows_per_s"],
                "st_rows_per_s": st_best["rows_per_s"], "st_batch_size": st_best["batch_size"], "ratio": ratio,
                "ratio_encode_rows_only": embed["encode_rows_only"]["rows_per_s"] / st_best["rows_per_s"],
                "passed": ratio >= EMBED_VS_ST_TARGET if judged else None}
        clip = s.get("embed/clip-77/bfloat16") or {}
        if "embed_shard" in clip:
            share = clip["embed_shard"]["model_share_of_bf16_peak"]
            out["clip_l_share_of_bf16_peak"] = {
                "target": f">= {CLIP_PEAK_SHARE_TARGET:.0%}", "share": share,
                "model_tflops": clip["embed_shard"]["model_tflops"],
                "share_encode_rows_only": clip["encode_rows_only"]["model_share_of_bf16_peak"],
                "counts": clip["model_flops_counts"], "passed": share >= CLIP_PEAK_SHARE_TARGET if judged else None}
        cos = [(f"{k} / {name}", v["passed"]) for k, entry in (s.get("cosine/cpu_reference") or {}).items()
               if isinstance(entry, dict) for name, v in entry.items() if isinstance(v, dict) and "passed" in v]
        out["cosines_vs_cpu_float32"] = {"checked": len(cos), "failed": [k for k, ok in cos if not ok],
                                         "passed": bool(cos) and all(ok for _, ok in cos)}
        oom = s.get("oom_backoff") or {}
        out["oom_backoff"] = {"passed": oom.get("passed"), "backoffs": oom.get("backoffs"), "mode": oom.get("mode")}
        return out

    def run(self) -> dict[str, Any]:
        r, d = self.results, self.deadline
        r.run("environment", self.environment, deadline=d, limit_s=60)
        if r.run("models", self.models, deadline=d, limit_s=90) is None:
            return r.data
        r.run("embed/minilm-256/bfloat16", lambda: self.embed("minilm-256", "bfloat16"), deadline=d, needs_s=20,
              limit_s=90)
        for b in ST_BATCHES:
            r.run(f"sentence_transformers/float16/{b}", lambda b=b: self.st("float16", b), deadline=d, needs_s=15,
                  limit_s=60)
        r.run("embed/clip-77/bfloat16", lambda: self.embed("clip-77", "bfloat16"), deadline=d, needs_s=20, limit_s=90)
        r.run("embed/minilm-256/float32", lambda: self.embed("minilm-256", "float32"), deadline=d, needs_s=20,
              limit_s=90)
        r.run("embed/clip-77/float32", lambda: self.embed("clip-77", "float32"), deadline=d, needs_s=40, limit_s=90)
        for b in ST_BATCHES:
            r.run(f"sentence_transformers/float32/{b}", lambda b=b: self.st("float32", b), deadline=d, needs_s=20,
                  limit_s=60)
        r.run("cosine/cpu_reference", self.cpu_reference, deadline=d, needs_s=45, limit_s=90)
        r.run("cosine/cross", self.cross, deadline=d, needs_s=10, limit_s=60)
        r.run("oom_backoff", self.oom, deadline=d, needs_s=20, limit_s=60)
        for set_name in layout.SETS:
            r.run(f"profile/{set_name}/bfloat16", lambda s=set_name: self.profile(s), deadline=d, needs_s=15,
                  limit_s=45)
        r.run("batch_budget_sweep", self.sweep, deadline=d, needs_s=30, limit_s=60)
        r.run("tokenize", self.tokenize, deadline=d, needs_s=15, limit_s=30)
        if self.o.full:
            from gpu_kit.full import run_full

            r.run("full", lambda: run_full(self), deadline=d, needs_s=90, limit_s=300)
        r.run("targets", self.targets, deadline=d + 60)
        r.run("import_audit", image.audit_imports, deadline=d + 60)
        return r.data
