"""Keep freed CPU memory for reuse instead of handing it back to the kernel.

glibc's malloc serves big blocks (every activation of a training step) with fresh ``mmap``
pages and unmaps them on free, so each step page-faults its whole activation footprint in
again, and the kernel zeroes every page first. On the offline default model that was half
of a CPU training step (measured in docs/training.md). Raising the mmap and trim thresholds
makes freed blocks stay in the heap and be reused: no page faults after the first steps, at
the price of a resident size that stays near its peak (and some fragmentation on top).
"""

from __future__ import annotations

import argparse
import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (glibc 2.26+ accepts up to half the address space).
DEFAULT_MMAP_THRESHOLD = 2**30


def keep_freed_memory(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Tune glibc's malloc for reuse (process-wide, from now on). Returns whether it applied:
    ``False`` off Linux, on another C library, or when glibc refuses the values."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    threshold = min(int(mmap_threshold), 2**31 - 1)
    # Setting either also turns off glibc's dynamic threshold adjustment, which is the point.
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def add_keep_freed_memory_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The command lines' ``--keep-freed-memory`` / ``--no-keep-freed-memory`` (on by default):
    whether the command calls :func:`keep_freed_memory` before it loads a model."""
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="on CPU, keep freed memory for reuse (radapter.keep_freed_memory): no page faults per "
                             "batch; --no-keep-freed-memory: glibc's defaults")
