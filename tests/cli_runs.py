"""Running the embedpipe command in real subprocesses, and comparing what it wrote."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cli_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", **extra)


def embedpipe(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m jobs.cli ARGS`` and wait for it."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_embedpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m jobs.cli ARGS`` without waiting."""
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def digests(directory: Path, pattern: str = "*.arrow") -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).glob(pattern))
            if p.is_file()}


def output_files(out: Path) -> dict[str, str]:
    """sha256 of every file a job publishes except the manifest (which records times): shards, metadata, quarantine."""
    found = {}
    for stage in ("tokens", "embeddings", "quarantine"):
        for name, digest in digests(out / stage, "*").items():
            found[f"{stage}/{name}"] = digest
    return found


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / "manifest.json").read_text())
