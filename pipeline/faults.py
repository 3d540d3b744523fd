"""Deliberate failures for the fault tests, chosen by environment variables.

``EMBEDPIPE_FAULT=<site>:<n>[:<action>][,...]`` makes the n-th arrival of any
process of the job at ``<site>`` fail: ``kill`` (the default) sends it SIGKILL,
as the OOM killer or a lost node would; ``enospc`` raises "No space left on
device" as a full disk would; ``pause`` creates ``<site>.<n>.paused`` (holding the pid) in
``EMBEDPIPE_FAULT_DIR`` and waits, as a stuck or slow process would, until ``<site>.<n>.resume``
appears there (a test's way to act while that process has work in flight). Arrivals are counted across processes (Ray workers,
actors, the driver) and across retries with files created in
``EMBEDPIPE_FAULT_DIR``, so a fault fires exactly once per job. Unset, every
:func:`fault_point` is a dictionary lookup and nothing else.

Sites: see :data:`SITES`.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

SITES = (
    "tokenize.before_commit",  # a tokenize worker, its shard computed, nothing written
    "tokenize.after_commit",   # a tokenize worker, shard renamed into place, not yet reported
    "embed.after_piece",       # an encoder actor, a piece of a shard computed, not yet returned
    "embed.before_commit",     # the task committing a shard, its pieces gathered, nothing written
    "embed.after_commit",      # the task committing a shard, shard renamed into place, not yet reported
    "commit.before_rename",    # any process: a file written and fsynced under its staging name
    "commit.write",            # any process: about to write a file's bytes (use with :enospc)
    "driver.after_record",     # the driver, a shard recorded in memory, the manifest not yet rewritten
)
ACTIONS = ("kill", "enospc", "pause")
ENV_FAULT = "EMBEDPIPE_FAULT"
ENV_FAULT_DIR = "EMBEDPIPE_FAULT_DIR"


def parse_faults(spec: str) -> dict[str, tuple[int, str]]:
    """``site:n[:action],...`` -> {site: (n, action)}; raises ValueError on a bad spec."""
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        site, _, rest = item.partition(":")
        count, _, action = rest.partition(":")
        action = action or "kill"
        if site not in SITES or action not in ACTIONS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV_FAULT}: bad item {item!r}; expected <site>:<n>[:kill|enospc|pause], sites: {SITES}")
        faults[site] = (int(count), action)
    return faults


def _fault_dir() -> Path:
    directory = Path(os.environ.get(ENV_FAULT_DIR) or "/tmp/embedpipe-faults")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _arrival_number(site: str) -> int:
    """Claim the next arrival number at ``site`` (atomic across processes: O_EXCL file creation)."""
    directory = _fault_dir()
    number = 1
    while True:
        try:
            os.close(os.open(directory / f"{site}.{number}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return number
        except FileExistsError:
            number += 1


def fault_point(site: str) -> None:
    """Fail here if ``EMBEDPIPE_FAULT`` asks for it (see the module docstring)."""
    spec = os.environ.get(ENV_FAULT)
    if not spec:
        return
    wanted = parse_faults(spec).get(site)
    if wanted is None:
        return
    count, action = wanted
    if _arrival_number(site) != count:
        return
    if action == "pause":
        directory = _fault_dir()
        (directory / f"{site}.{count}.paused").write_text(str(os.getpid()))
        while not (directory / f"{site}.{count}.resume").exists():
            time.sleep(0.05)
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL)
