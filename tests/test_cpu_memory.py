import subprocess
import sys

import pytest

# One process (a process as the command lines run it: open_clip and its libraries loaded), first
# with glibc's defaults, then tuned: the tuning applies from the moment it is made.
PROBE = """
import resource, torch
import radapter
import radapter.models.registry


def faults() -> int:
    for _ in range(3):  # 64 MB blocks: above glibc's default mmap threshold; a tuned heap grows to them first
        torch.empty(2**24).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.empty(2**24).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


stock = faults()
applied = radapter.keep_freed_memory()
print(applied, stock, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_keep_freed_memory_reuses_big_blocks_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    applied, stock, kept = out.stdout.split()
    stock, kept = int(stock), int(kept)
    assert applied == "True"
    assert stock > 8 * 16_000  # 4 KiB pages: every 64 MB block is faulted in again
    # Reused: mostly no page is faulted in again (glibc now and then places one block afresh).
    assert kept < stock / 3
