"""What the process has used: the one reading of peak memory that train, demo and stream report."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
