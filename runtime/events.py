"""The one event representation used across stoprt.

Every reader, live source, emulator and binner produces or consumes a 1-D numpy structured array of
:data:`EVENT_DTYPE`: ``t`` in microseconds (int64), ``x`` and ``y`` pixel coordinates (uint16) and
polarity ``p`` (uint8, 1 = ON / brighter, 0 = OFF / darker).
"""

from __future__ import annotations

import numpy as np

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])


def empty_events(n: int = 0) -> np.ndarray:
    """A zero-filled event array of length ``n``."""
    return np.zeros(n, dtype=EVENT_DTYPE)
