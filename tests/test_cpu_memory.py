import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
import radapter
import radapter.models.registry  # a process as the command lines run it: open_clip and its libraries loaded
applied = radapter.keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(3):  # 64 MB blocks: above glibc's default mmap threshold; the heap grows to them first
    torch.empty(2**24).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(2**24).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_keep_freed_memory_reuses_big_blocks_without_page_faults():
    _, stock = _faults("stock")
    applied, kept = _faults("keep")
    assert applied == "True"
    assert stock > 8 * 16_000  # 4 KiB pages: every 64 MB block is faulted in again
    # Reused: mostly no page is faulted in again (glibc now and then places one block afresh).
    assert kept < stock / 3
