"""N-MNIST / N-Caltech101 ``.bin`` files (Orchard et al., 2015).

Binary layout: no header; 5 bytes per event, big-endian bit order across the 40 bits::

    byte 0: x (8 bit)
    byte 1: y (8 bit)
    byte 2: bit 7 = polarity (1 = ON), bits 6..0 = timestamp bits 22..16
    byte 3: timestamp bits 15..8
    byte 4: timestamp bits 7..0          (timestamp in microseconds, 23 bits: < 8.39 s)

The format stores no sensor size: N-MNIST is always 34x34 (:data:`SENSOR_SIZE`, which
:class:`~stoprt.runtime.stream.sources.FileSource` and ``stoprt stream`` assume for ``.bin``), N-Caltech101
up to 240x180. The reader itself checks coordinates only when given ``sensor_size``. The original MATLAB tools mark timestamp overflows with
special events at y = 240; they are not interpreted here (no N-MNIST or N-Caltech101 sample needs it).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ._common import EventReader, OffsetOf, RecordingInfo, make_events
from ._writer import EventWriter

RECORD = 5
MAX_T = 1 << 23
SENSOR_SIZE = (34, 34)  # N-MNIST's ATIS crop


class NMNISTReader(EventReader):
    """Streaming reader of N-MNIST / N-Caltech101 ``.bin`` files."""

    format_name = "nmnist"

    def _read_header(self) -> RecordingInfo:
        return RecordingInfo("nmnist", data_offset=0)

    def _decode(self) -> Iterator[tuple[np.ndarray, OffsetOf]]:
        for buf, base in self.records(RECORD):
            b = np.frombuffer(buf, dtype=np.uint8).reshape(-1, RECORD)
            t = ((b[:, 2].astype(np.int64) & 0x7F) << 16) | (b[:, 3].astype(np.int64) << 8) | b[:, 4]
            yield make_events(t, b[:, 0], b[:, 1], b[:, 2] >> 7), (lambda i, base=base: base + RECORD * i)


class NMNISTWriter(EventWriter):
    """Writer of N-MNIST ``.bin`` files: x, y < 256, timestamps < 2**23 us."""

    format_name = "nmnist"

    def write(self, events: Any) -> None:
        ev = self._prepare(events, 256, 256)
        if len(ev) and int(ev["t"][-1]) >= MAX_T:
            raise self.error(f"N-MNIST timestamps must be below {MAX_T} us (23 bits)")
        out = np.empty((len(ev), RECORD), dtype=np.uint8)
        t = ev["t"]
        out[:, 0] = ev["x"]
        out[:, 1] = ev["y"]
        out[:, 2] = (ev["p"].astype(np.int64) << 7) | (t >> 16)
        out[:, 3] = (t >> 8) & 0xFF
        out[:, 4] = t & 0xFF
        self._commit(ev, out.tobytes())
