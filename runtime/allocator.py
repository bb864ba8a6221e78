"""glibc malloc settings for a learner that runs one time step at a time on a CPU.

glibc serves an allocation above its mmap threshold with a fresh mapping and hands freed heap above
its trim threshold back to the OS. Both thresholds start small (128 KiB, 256 KiB) and move with what
the program frees, so a per-step learner, which allocates and frees the same few-MiB tensors (membranes,
spikes, traces, gradients) at every step, keeps faulting their pages in again: on the benchmark VGG-11
(width 0.5, batch 8) about 1,000 page faults a step, against about 300 for a plain forward+backward of
the same network, and a step time that depends on where the thresholds happened to settle in that
process. Fixed thresholds keep those tensors on the heap. The price: the resident size stays at its peak
between samples instead of shrinking (a learner's peak comes back at every step anyway).

The ``stoprt`` commands that train (``demo``, ``train``, ``stream``) call :func:`steady_malloc`; a
program using the Python API calls it itself if it wants the same. CUDA memory is unaffected (torch's
caching allocator already keeps its blocks).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MIB = 1 << 20
ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def steady_malloc(mmap_threshold_mib: int = 32, trim_threshold_mib: int = 128) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module docstring).

    Allocations up to ``mmap_threshold_mib`` come from the heap; free heap is returned to the OS only
    beyond ``trim_threshold_mib``. Returns whether the settings took effect: False off Linux/glibc, and
    when the user chose thresholds through ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    (which are left as they are).
    """
    if not sys.platform.startswith("linux") or any(v in os.environ for v in ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to set
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold_mib * MIB)
                and mallopt(M_TRIM_THRESHOLD, trim_threshold_mib * MIB))
