"""The output directory's layout (DESIGN.md "Output directory"): every name in it is defined here, once.

Writers (the stages, the driver), the read-only commands and the training readers in ``pipeline.data``
all take the layout from this module, which imports nothing heavier than the standard library, so a
reader never has to re-declare a name to avoid importing the encoder.
"""

from __future__ import annotations

import re
from typing import Any

TOKENS = "tokens"
EMBEDDINGS = "embeddings"
STAGES = (TOKENS, EMBEDDINGS)
"""The stage folders, in the order they are made."""
MANIFEST_NAME = "manifest.json"
QUARANTINE_DIR = "quarantine"
STAGING_DIR = ".staging"
"""Per stage folder: files being committed (never read; removed on the next run)."""
LOCK_NAME = ".lock"
REPORTS_DIR = "reports"
"""Run reports (one JSON file per command run)."""
DATASET_INFO_NAME = "dataset_info.json"
DATASET_STATE_NAME = "state.json"
"""The two ``datasets`` metadata files of a complete stage folder."""
DTYPE_METADATA_KEY = b"embedpipe.dtype"
"""Field metadata of an embedding column naming its stored dtype (bfloat16 is stored as uint16 bits)."""
DIM_METADATA_KEY = b"embedpipe.dim"
"""Field metadata of a binary / ubinary embedding column: D, the bits packed 8 per byte in each row."""
RANGES_METADATA_KEY = b"embedpipe.quantize_ranges"
"""Field metadata of an int8 / uint8 embedding column: its (2, D) calibration ranges as JSON (min row, max row)."""


# What embedpipe writes inside each folder, by name: the rule for what --force may remove.
SHARD_FILE = re.compile(r"data-\d{5}-of-\d{5}\.arrow")
QUARANTINE_FILE = re.compile(r"tokens-data-\d{5}-of-\d{5}\.jsonl")
REPORT_FILE = re.compile(r"\d{8}T\d{6}\.\d{6}Z\.json")


def shard_name(index: int, total: int) -> str:
    """``data-0000i-of-0000N.arrow``, the datasets naming scheme."""
    return f"data-{index:05d}-of-{total:05d}.arrow"


def plan_names(plan: dict[str, Any]) -> list[str]:
    """Shard names of a manifest's plan (plans written before increments existed have no "names")."""
    return plan.get("names") or [shard_name(u["index"], plan["shards"]) for u in plan["units"]]
