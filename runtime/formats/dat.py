"""Prophesee legacy ``.dat`` files (e.g. N-CARS, the Gen1 automotive dataset).

Binary layout: text header lines starting with ``%`` (``% Data file containing Event2D events.``,
``% Version 2``, ``% Date ...``, optionally ``% Width W`` / ``% Height H`` or ``% geometry WxH``), then two
bytes: the event type (0x00 Event2D or 0x0C EventCD) and the event size (8), then 8-byte little-endian
events::

    uint32 timestamp (microseconds)
    uint32 data: bits 0..13 x, bits 14..27 y, bits 28..31 polarity (0 or 1)

This 14/14/4 layout is the one of "% Version 2" files and was checked against the N-CARS sample (x, y
within its 78x42 crop, polarity 0/1, monotonic time). Other versions raise :class:`EventFormatError`.
Timestamps are 32-bit and unwrapped when they wrap around.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from . import _prophesee as pro
from ._common import EventReader, OffsetOf, RecordingInfo, Source, make_events, unwrap_u32
from ._writer import EventWriter

EVENT_TYPES = {0x00: "Event2D", 0x0C: "EventCD"}
EVENT_SIZE = 8
MAX_XY = 1 << 14


class DATReader(EventReader):
    """Streaming reader of Prophesee ``.dat`` CD event files."""

    format_name = "dat"

    def _read_header(self) -> RecordingInfo:
        header = pro.read_header(self._src, self.path)
        version = pro.get(header, "Version")
        if version is not None and version.strip() != "2":
            raise self.error(f"unsupported .dat '% Version {version}' (only version 2 is read)", 0)
        if pro.evt_version(header) is not None:
            raise self.error("the header names an EVT encoding: this is a .raw file, not a .dat file", 0)
        w, h = pro.geometry(header, self.path)
        extra: dict[str, str] = {}
        offset = self._src.pos
        pair = self._src.read(2)
        if len(pair) == 1:
            self.truncated(1, offset, "event type/size pair")
        elif len(pair) == 2:
            etype, esize = pair[0], pair[1]
            if etype not in EVENT_TYPES or esize != EVENT_SIZE:
                raise self.error(f"unsupported .dat event type {etype:#04x} with size {esize} "
                                 "(expected CD events 0x00 or 0x0c of 8 bytes)", offset)
            extra["event_type"] = EVENT_TYPES[etype]
        return RecordingInfo("dat", width=w, height=h, header=header, data_offset=self._src.pos, extra=extra)

    def _decode(self) -> Iterator[tuple[np.ndarray, OffsetOf]]:
        wrap = [0, 0]
        for buf, base in self.records(EVENT_SIZE):
            raw = np.frombuffer(buf, dtype="<u4").reshape(-1, 2)
            t = unwrap_u32(raw[:, 0], wrap)
            d = raw[:, 1]
            p = d >> 28
            of = (lambda i, base=base: base + EVENT_SIZE * i)
            keep = self.reject(p > 1, "corrupt", lambda i: f"polarity field {p[i]} is not 0 or 1", of)
            ev = make_events(t, d & 0x3FFF, (d >> 14) & 0x3FFF, p)
            if keep is not None:
                idx = np.flatnonzero(keep)
                ev, of = ev[idx], (lambda i, base=base, idx=idx: base + EVENT_SIZE * int(idx[i]))
            yield ev, of


class DATWriter(EventWriter):
    """Writer of ``.dat`` Event2D files (Version 2 layout, ``% Width``/``% Height`` in the header)."""

    format_name = "dat"

    def __init__(self, dest: Source, *, width: int = 304, height: int = 240) -> None:
        if not (0 < width <= MAX_XY and 0 < height <= MAX_XY):
            raise ValueError("legacy .dat coordinates are 14-bit: width and height must be in 1..16384")
        super().__init__(dest)
        self.size = (width, height)
        lines = ["Data file containing Event2D events.", "Version 2", "Date 1970-01-01 00:00:00",
                 f"Height {height}", f"Width {width}"]
        self._f.write(pro.header_bytes(lines) + bytes([0x00, EVENT_SIZE]))

    def write(self, events: Any) -> None:
        ev = self._prepare(events, *self.size)
        out = np.empty((len(ev), 2), dtype="<u4")
        out[:, 0] = self._u32_timestamps(ev["t"])
        out[:, 1] = ((ev["p"].astype(np.uint32) << 28) | (ev["y"].astype(np.uint32) << 14)
                     | ev["x"].astype(np.uint32))
        self._commit(ev, out.tobytes())
