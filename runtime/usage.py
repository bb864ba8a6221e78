"""What the process has used: the one reading of peak memory that train, demo and stream report."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def seconds_since_process_start() -> float:
    """Wall time since this process was started, to about 10 ms.

    Linux: from ``/proc`` (the start in clock ticks after boot against the uptime). ``psutil``'s
    ``create_time()`` is built from a boot time in whole seconds and can be a second early; it is the
    fallback elsewhere.
    """
    import os
    import time
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        import psutil
        return time.time() - psutil.Process().create_time()
