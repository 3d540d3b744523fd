"""The README's walkthrough, run line by line as a newcomer types it, in a copy of this checkout."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_runs import REPO, cli_env

pytestmark = pytest.mark.walkthrough


def walkthrough_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```", readme, re.S)
    assert found, "README.md has no <!-- walkthrough --> bash block"
    return found.group(1)


def copy_checkout(to: Path) -> None:
    """The tracked files, with their modification times (so make sees the installed .venv as up to date)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (REPO / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, to / name)
    os.symlink(REPO / ".venv", to / ".venv")


def test_the_walkthrough_runs_as_written(tmp_path):
    stamp, project = REPO / ".venv" / ".installed", REPO / "pyproject.toml"
    # An out-of-date stamp would make `make run` reinstall, pointing the editable install at the copy.
    assert stamp.exists() and stamp.stat().st_mtime >= project.stat().st_mtime, "run `make test` first"
    checkout = tmp_path / "embedpipe"
    copy_checkout(checkout)
    script = "set -euo pipefail\nset -x\n" + walkthrough_block()
    env = {k: v for k, v in cli_env().items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS", "EMBEDPIPE_OUTPUT")}
    done = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"walkthrough failed:\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}"
    out = done.stdout
    assert "nothing to do" in out + done.stderr
    assert "out/default: OK" in out
    assert "torch.Size([4, 384])" in out
    png = checkout / "out" / "pca.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert not (checkout / "out" / "clip").exists()  # plan writes nothing
