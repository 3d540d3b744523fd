"""Run one job with this checkout and with another commit, and compare every file the two outputs publish.

For changes that must not change what a job writes (a restructure, a speed-up):

    python tools/same_output_as.py COMMIT [CONFIG] [--set KEY=VALUE ...]

CONFIG defaults to conf/default.yaml (the sample corpus, real MiniLM). The other commit is checked out
with ``git worktree`` into a temporary folder and run from there (its own ``pipeline`` and ``jobs`` first
on PYTHONPATH, which Ray's workers inherit), in this virtualenv. Compared: every shard, datasets metadata
file and quarantine file, byte for byte (the manifest and reports hold times, so they are left out).
Exit 0 when all are identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _published(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("tokens", "embeddings", "quarantine") for p in sorted((out / folder).glob("*"))
            if p.is_file()}


def _run(tree: Path, config: str, overrides: list[str], out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    args = [sys.executable, "-m", "jobs.cli", "run", str(REPO / config), "-o", str(out), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the run in {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit")
    parser.add_argument("config", nargs="?", default="conf/default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="same-output-") as tmp:
        work = Path(tmp)
        other = work / "other"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(other), args.commit],
                       check=True, capture_output=True)
        try:
            # relative input paths in the config are relative to where the job runs: the same files for both
            overrides = args.overrides
            _run(other, args.config, overrides, work / "out-other")
            _run(REPO, args.config, overrides, work / "out-here")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], check=False)
        theirs, ours = _published(work / "out-other"), _published(work / "out-here")
        differ = sorted(name for name in theirs.keys() | ours.keys() if theirs.get(name) != ours.get(name))
        print(f"{len(ours)} files here, {len(theirs)} at {args.commit}; {len(differ)} differ")
        for name in differ:
            print(f"  differs: {name}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
