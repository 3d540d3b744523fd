"""What the kit folder holds, named once (``gpu-kit/`` in the repository root, ignored by git).

    gpu-kit/
      kit.json                      what was prepared: sets, shards, rows, tokens, wheels, sizes
      wheels/*.whl                  packages the core imports that the GPU machine's Python lacks
      tokenizer/                    the MiniLM tokenizer files (tokenizer.json, vocab.txt, ...)
      models/<name>/config.json     model shapes; weights are drawn at random on the GPU machine
      texts.jsonl.gz                the texts the shards were made from (for SentenceTransformer.encode)
      shards/<set>/data-*.arrow     token shards, Arrow IPC streams compressed with zstd to travel; the
                                    check rewrites them uncompressed with the pipeline's own write_shard
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_KIT = REPO / "gpu-kit"
KIT_JSON = "kit.json"
WHEELS = "wheels"
TOKENIZER = "tokenizer"
MODELS = "models"
TEXTS = "texts.jsonl.gz"
SHARDS = "shards"
# The tokenizer files copied from the MiniLM package (no weights: they would not fit the 64 MiB).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@dataclass(frozen=True)
class ShardSet:
    """One set of token shards and how the check embeds it."""

    name: str
    max_length: int
    pooling: str  # "mean" (pooled) or "none" (per-token)
    use_attention_mask: bool
    model: str  # models/<model>/config.json: the real shape
    quick_model: str  # the tiny stand-in used by --quick


SETS = {
    # all-MiniLM-L6-v2's own shape and settings: max_seq_length 256, mean pooling.
    "minilm-256": ShardSet("minilm-256", 256, "mean", True, "minilm", "tiny-bert"),
    # CLIP ViT-L/14's text encoder as Stable Diffusion 1.x runs it: 77 x 768 per token, no attention mask.
    "clip-77": ShardSet("clip-77", 77, "none", False, "clip-l", "tiny-clip"),
}


def read_kit(kit: Path) -> dict[str, Any]:
    """The kit's ``kit.json``; SystemExit with the command to run when the kit is missing."""
    path = Path(kit) / KIT_JSON
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `python benchmarks/gpu_check.py prepare` first "
                         "(on the CPU machine), and carry the kit folder with the device call")
    return json.loads(path.read_text(encoding="utf-8"))


def shard_paths(kit: Path, set_name: str) -> list[Path]:
    return sorted((Path(kit) / SHARDS / set_name).glob("data-*.arrow"))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
