"""The functions the engines run as tasks: light to import, so that a fresh worker starts fast.

Both engines (:mod:`pipeline.run.engine`) pickle these by reference; a worker that unpickles one
imports this module and the stage code it calls, never the driver.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.encode.pieces import Piece, assemble_shard
from pipeline.inputs.plan import WorkUnit
from pipeline.run.engine import WORKER_ENV, current_node
from pipeline.run.report import peak_rss_mb
from pipeline.tokenize.core import TokenizeSpec
from pipeline.tokenize.stage import ReadSpec, run_unit


def tokenize_task(unit: WorkUnit, name: str, read: ReadSpec, spec: TokenizeSpec, out_dir: str,
                  threads: int = 1) -> dict[str, Any]:
    """Tokenize one work unit into ``tokens/<name>`` on ``threads`` threads and return its report (where it
    ran, its peak memory)."""
    os.environ.update(WORKER_ENV)
    report = run_unit(unit, name, read, spec, out_dir, threads)
    report["node"] = current_node()
    report["peak_rss_mb"] = peak_rss_mb()
    return report


def assemble_task(out_dir: str, name: str, schema: Any, output_dtype: str, stats: dict[str, Any],
                  *pieces: Piece) -> dict[str, Any]:
    """Commit one embedding shard from its pieces (the engine resolves the piece handles into the arguments)."""
    report = assemble_shard(out_dir, name, schema, output_dtype, pieces)
    report["peak_rss_mb"] = max(peak_rss_mb(), stats.pop("peak_rss_mb"))
    return report | stats
