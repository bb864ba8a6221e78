"""Base class of the event-file writers (see :mod:`._common` for the conventions)."""

from __future__ import annotations

import os
from typing import IO, Any, ClassVar

import numpy as np

from ..events import EVENT_DTYPE
from ._common import MAX_COORD, EventFormatError, Source, make_events


def as_events(events: Any) -> np.ndarray:
    """Events as an EVENT_DTYPE array (any structured array with t, x, y, p fields is converted)."""
    arr = np.asarray(events)
    if arr.dtype == EVENT_DTYPE:
        return arr.reshape(-1)
    if arr.dtype.names is None or not {"t", "x", "y", "p"} <= set(arr.dtype.names):
        raise TypeError("events must be a structured array with fields t, x, y, p")
    arr = arr.reshape(-1)
    for name, limit in (("x", MAX_COORD), ("y", MAX_COORD), ("p", 256)):
        v = arr[name]
        if len(v) and (v.min() < 0 or v.max() >= limit):
            raise EventFormatError(f"field {name} out of range for EVENT_DTYPE")
    return make_events(arr["t"], arr["x"], arr["y"], arr["p"])


class EventWriter:
    """Base class of the writers: ``write(events)`` any number of times, then ``close()``.

    Timestamps must be >= 0 and non-decreasing across all writes; events the format cannot represent
    raise :class:`EventFormatError` before anything of that call is written.
    """

    format_name: ClassVar[str] = "?"

    def __init__(self, dest: Source) -> None:
        if isinstance(dest, (str, os.PathLike)):
            self.path = os.fspath(dest)
            self._f: IO[bytes] = open(self.path, "wb")
            self._own = True
        elif hasattr(dest, "write"):
            self._f = dest  # type: ignore[assignment]
            self._own = False
            name = getattr(dest, "name", None)
            self.path = name if isinstance(name, str) else "<stream>"
        else:
            raise TypeError(f"expected a path or a binary file object, got {type(dest).__name__}")
        self._last_t: int | None = None
        self.events_written = 0

    def error(self, problem: str) -> EventFormatError:
        return EventFormatError(problem, path=self.path)

    def _prepare(self, events: Any, max_x: int, max_y: int) -> np.ndarray:
        """Validate events (timestamps, coordinates < max_x/max_y, p in {0, 1})."""
        ev = as_events(events)
        if len(ev) == 0:
            return ev
        t = ev["t"]
        if t.min() < 0:
            raise self.error("negative timestamps cannot be written")
        last = self._last_t if self._last_t is not None else int(t[0])
        if t[0] < last or (len(t) > 1 and (np.diff(t) < 0).any()):
            raise self.error("timestamps must be non-decreasing")
        if int(ev["x"].max()) >= max_x or int(ev["y"].max()) >= max_y:
            raise self.error(f"coordinates must be below x<{max_x}, y<{max_y} for {self.format_name}")
        if int(ev["p"].max()) > 1:
            raise self.error("polarity must be 0 or 1")
        return ev

    def _u32_timestamps(self, t: np.ndarray) -> np.ndarray:
        """Timestamps modulo 2**32 for formats that readers unwrap with :func:`unwrap_u32`: the first
        must be below 2**32 and no step may reach 2**31 us (about 36 minutes)."""
        if len(t) == 0:
            return t.astype(np.uint32)
        if self._last_t is None and int(t[0]) >= 1 << 32:
            raise self.error("the first timestamp must be below 2**32 us in a 32-bit timestamp format")
        prev = t[0] if self._last_t is None else self._last_t
        if int(np.diff(t, prepend=prev).max()) >= 1 << 31:
            raise self.error("a gap of 2**31 us or more between events cannot be written with 32-bit timestamps")
        return (t & 0xFFFFFFFF).astype(np.uint32)

    def _commit(self, ev: np.ndarray, data: bytes) -> None:
        self._f.write(data)
        if len(ev):
            self._last_t = int(ev["t"][-1])
            self.events_written += len(ev)

    def write(self, events: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._own:
            self._f.close()
        else:
            self._f.flush()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
