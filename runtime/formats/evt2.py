"""Prophesee EVT 2.0 ``.raw`` files.

Binary layout: the ``% key value`` text header (see :mod:`._prophesee`), then little-endian 32-bit
words; bits 28..31 give the type:

====  =============  =====================================================================
type  name           payload
====  =============  =====================================================================
0x0   CD_OFF         bits 22..27 time bits 0..5, bits 11..21 x, bits 0..10 y (polarity 0)
0x1   CD_ON          the same, polarity 1
0x8   EVT_TIME_HIGH  bits 0..27: time bits 6..33
0xA   EXT_TRIGGER    external trigger: counted in stats.other_events, not decoded
0xE   OTHERS         vendor events: ignored
0xF   CONTINUED      continuation payload: ignored
====  =============  =====================================================================

Time is ``(time_high << 6) | time_low`` microseconds. The 34-bit time wraps every 4.8 hours: a
time-high value lower than the previous by more than half its range is a wrap-around (+2**34 us).
Events before the first EVT_TIME_HIGH are skipped and counted in ``stats.no_state``.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from . import _prophesee as pro
from ._common import EventReader, OffsetOf, RecordingInfo, Source, ffill, make_events
from ._writer import EventWriter

CD_OFF, CD_ON, TIME_HIGH, EXT_TRIGGER = 0x0, 0x1, 0x8, 0xA
KNOWN = np.zeros(16, dtype=bool)
KNOWN[[0x0, 0x1, 0x8, 0xA, 0xE, 0xF]] = True
HALF = 1 << 27
MAX_XY = 1 << 11


class EVT2Reader(EventReader):
    """Streaming reader of Prophesee EVT 2.0 ``.raw`` files."""

    format_name = "evt2"

    def _read_header(self) -> RecordingInfo:
        header = pro.read_header(self._src, self.path)
        ver = pro.evt_version(header)
        if ver is not None and ver != "2.0":
            raise self.error(f"the header says EVT {ver}, not EVT 2.0", 0)
        w, h = pro.geometry(header, self.path)
        return RecordingInfo("evt2", width=w, height=h, header=header, data_offset=self._src.pos)

    def _decode(self) -> Iterator[tuple[np.ndarray, OffsetOf]]:
        th_raw, wraps_before, th_last = 0, 0, -1
        for buf, base in self.records(4):
            w = np.frombuffer(buf, dtype="<u4")
            typ = w >> 28
            self.reject(~KNOWN[typ], "unknown_words", lambda i: f"unknown EVT 2.0 word type {typ[i]:#x}",
                        lambda i, base=base: base + 4 * i)
            self.stats.other_events += int(np.count_nonzero(typ == EXT_TRIGGER))
            tpos = np.flatnonzero(typ == TIME_HIGH)
            thv = (w[tpos] & 0x0FFFFFFF).astype(np.int64)
            wraps = np.cumsum(np.diff(thv, prepend=th_raw) < -HALF) + wraps_before
            th_full = thv + (wraps << 28)
            cpos = np.flatnonzero(typ <= CD_ON)
            th = ffill(tpos, th_full, cpos, th_last)
            if len(thv):
                th_raw, wraps_before, th_last = int(thv[-1]), int(wraps[-1]), int(th_full[-1])
            known = th >= 0
            if not known.all():
                self.stats.no_state += int(np.count_nonzero(~known))
                cpos, th = cpos[known], th[known]
            cw = w[cpos].astype(np.int64)
            ev = make_events((th << 6) | ((cw >> 22) & 0x3F), (cw >> 11) & 0x7FF, cw & 0x7FF, typ[cpos])
            yield ev, (lambda i, base=base, cpos=cpos: base + 4 * int(cpos[i]))


class EVT2Writer(EventWriter):
    """Writer of EVT 2.0 ``.raw`` files (header ``% evt 2.0``, ``% format EVT2;height=H;width=W``).

    Emits EVT_TIME_HIGH whenever bits 6.. of the time change, stepping from 0 by less than half the
    28-bit range so that absolute times survive the wrap-around; one CD word per event.
    """

    format_name = "evt2"

    def __init__(self, dest: Source, *, width: int = 640, height: int = 480) -> None:
        if not (0 < width <= MAX_XY and 0 < height <= MAX_XY):
            raise ValueError("EVT 2.0 coordinates are 11-bit: width and height must be in 1..2048")
        super().__init__(dest)
        self.size = (width, height)
        self._th = 0
        self._started = False
        self._f.write(pro.header_bytes(["evt 2.0", f"format EVT2;height={height};width={width}",
                                        f"geometry {width}x{height}", "generator stoprt", "end"]))

    def write(self, events: Any) -> None:
        ev = self._prepare(events, *self.size)
        if len(ev) == 0:
            return
        t = ev["t"]
        th_idx, th_ord, th_val = pro.time_high_words(t >> 6, self._th, self._started, HALF - 1)
        cd = ((ev["p"].astype(np.int64) << 28) | ((t & 0x3F) << 22) | (ev["x"].astype(np.int64) << 11)
              | ev["y"].astype(np.int64))
        words = [(TIME_HIGH << 28) | (th_val & 0x0FFFFFFF), cd]
        order = [th_ord, np.full(len(ev), 1 << 40)]
        out = pro.assemble([th_idx, np.arange(len(ev))], order, words).astype("<u4")
        self._th, self._started = int(t[-1] >> 6), True
        self._commit(ev, out.tobytes())
