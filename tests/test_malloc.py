"""pipeline.encode.malloc: freed activation-sized blocks stay in the heap instead of being faulted in again."""

import subprocess
import sys

PROBE = """
import resource, numpy as np
from pipeline.encode.malloc import keep_freed_memory
tuned = {tuned} and keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds = []
for _ in range(20):
    before = faults()
    blocks = [np.ones(n, dtype=np.float32) for n in (3_000_000, 1_500_000, 3_000_000)]  # 12, 6, 12 MB
    del blocks
    rounds.append(faults() - before)
print(tuned, sum(rounds[1:]))
"""


def _later_faults(tuned: bool) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(tuned=tuned)], capture_output=True, text=True, check=True)
    flag, later = out.stdout.split()
    return flag, int(later)


def test_tuned_heap_does_not_fault_the_same_blocks_in_again():
    flag, later = _later_faults(tuned=True)
    assert flag == "True"
    pages_per_round = 30_000_000 // 4096
    assert later < pages_per_round // 10  # after the first round, the blocks come back from the heap


def test_untuned_glibc_faults_them_in_every_round():
    # The reason the module exists: without it, glibc maps and unmaps these blocks each time.
    _, later = _later_faults(tuned=False)
    assert later > 30_000_000 // 4096
