"""Prophesee EVT 3.0 ``.raw`` files.

Binary layout: the ``% key value`` text header (see :mod:`._prophesee`), then little-endian 16-bit
words; the top 4 bits give the type, the low 12 bits the payload:

====  ============  ==========================================================================
type  name          payload
====  ============  ==========================================================================
0x0   ADDR_Y        bits 0..10 y (bit 11: system type, ignored); sets the current row
0x2   ADDR_X        bits 0..10 x, bit 11 polarity: one event at (x, current y)
0x3   VECT_BASE_X   bits 0..10 x base, bit 11 polarity of the following vectors
0x4   VECT_12       12-bit mask: events at x base + i for each set bit i; x base += 12
0x5   VECT_8        8-bit mask: the same for 8 columns; x base += 8
0x6   TIME_LOW      bits 0..11 of the time (us)
0x8   TIME_HIGH     bits 12..23 of the time (us)
0x7   CONTINUED_4   } payloads of EXT_TRIGGER / OTHERS: ignored
0xA   EXT_TRIGGER   } (external triggers are counted in stats.other_events)
0xE   OTHERS        }
0xF   CONTINUED_12  }
====  ============  ==========================================================================

Time is ``(time_high << 12) | time_low`` with each part kept until the next word of its type. The 24-bit
time wraps every 16.8 s: a time-high value lower than the previous one by more than half its range
(2048) is a wrap-around and adds 2**24 us, so times are absolute from the start of the file. Events
before the first TIME_HIGH or ADDR_Y (or vectors before their VECT_BASE_X) are skipped and counted in
``stats.no_state``. Decoding is vectorised per chunk: the state words are forward-filled onto the event
words (``searchsorted``), vector bases are a cumulative sum, and masks are expanded with ``unpackbits``.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from . import _prophesee as pro
from ._common import EventReader, OffsetOf, RecordingInfo, Source, make_events
from ._writer import EventWriter

ADDR_Y, ADDR_X, VECT_BASE_X, VECT_12, VECT_8, TIME_LOW, TIME_HIGH, EXT_TRIGGER = 0, 2, 3, 4, 5, 6, 8, 0xA
KNOWN = np.zeros(16, dtype=bool)
KNOWN[[0, 2, 3, 4, 5, 6, 7, 8, 0xA, 0xE, 0xF]] = True
EVENT_WORD = np.isin(np.arange(16), [ADDR_X, VECT_12, VECT_8])
STATE_WORD = np.isin(np.arange(16), [ADDR_Y, VECT_BASE_X, TIME_LOW, TIME_HIGH])
INC = np.zeros(16, dtype=np.int64)
INC[VECT_12], INC[VECT_8] = 12, 8
POPCOUNT = np.array([bin(i).count("1") for i in range(1 << 12)], dtype=np.int64)
BITPOS = np.zeros((1 << 12, 12), dtype=np.int64)  # BITPOS[m, r]: column of the r-th set bit of m
for _m in range(1 << 12):
    _cols = [b for b in range(12) if _m >> b & 1]
    BITPOS[_m, :len(_cols)] = _cols
HALF = 1 << 11
MAX_X = 1 << 11


class EVT3Reader(EventReader):
    """Streaming reader of Prophesee EVT 3.0 ``.raw`` files.

    ``time_low_wrap=True`` reproduces decoders that take every decrease of TIME_LOW as a 4096 us
    wrap-around (adding 4096 us each time, on top of TIME_HIGH). Real recordings contain small TIME_LOW
    glitches (e.g. 799, 811, 800 in the EVT 3.0 fixture), so that rule inserts spurious 4 ms gaps; the
    default keeps time from TIME_HIGH/TIME_LOW as written. The option exists to match such references.
    """

    format_name = "evt3"

    def __init__(self, source: Source, *, time_low_wrap: bool = False, **kwargs: Any) -> None:
        self.time_low_wrap = time_low_wrap
        super().__init__(source, **kwargs)

    def _read_header(self) -> RecordingInfo:
        header = pro.read_header(self._src, self.path)
        ver = pro.evt_version(header)
        if ver is not None and ver != "3.0":
            raise self.error(f"the header says EVT {ver}, not EVT 3.0", 0)
        w, h = pro.geometry(header, self.path)
        return RecordingInfo("evt3", width=w, height=h, header=header, data_offset=self._src.pos)

    def _decode(self) -> Iterator[tuple[np.ndarray, OffsetOf]]:
        # Carried state: raw and unwrapped time high (-1 = none yet), wraps, time low, TIME_LOW decreases,
        # row (-1 = none yet), x base at the chunk start (-1 = none yet), vector polarity.
        st = {"th_raw": 0, "th": -1, "wraps": 0, "tl": 0, "loops": 0, "y": -1, "xb": -1, "vp": 0}
        limit = self.info.width if self.info.width is not None else MAX_X
        for buf, base in self.records(2):
            w = np.frombuffer(buf, dtype="<u2")
            typ = w >> 12
            self.reject(~KNOWN[typ], "unknown_words", lambda i: f"unknown EVT 3.0 word type {typ[i]:#x}",
                        lambda i, base=base: base + 2 * i)
            self.stats.other_events += int(np.count_nonzero(typ == EXT_TRIGGER))
            yield self._chunk(typ, w & 0xFFF, st, base, limit)

    def _chunk(self, typ: np.ndarray, val: np.ndarray, st: dict[str, int], base: int,
               limit: int) -> tuple[np.ndarray, OffsetOf]:
        epos = np.flatnonzero(EVENT_WORD[typ])
        spos = np.flatnonzero(STATE_WORD[typ])
        styp, sval = typ[spos], val[spos].astype(np.int64)
        # State after each state word (index 0: the state carried in from the previous chunk).
        th_m, tl_m, y_m, b_m = styp == TIME_HIGH, styp == TIME_LOW, styp == ADDR_Y, styp == VECT_BASE_X
        thv, tlv = sval[th_m], sval[tl_m]
        wraps = np.cumsum(np.diff(thv, prepend=st["th_raw"]) < -HALF) + st["wraps"]
        th = th_written = _fill(th_m, thv + (wraps << 12), st["th"])
        if self.time_low_wrap:
            loops = np.cumsum(np.diff(tlv, prepend=st["tl"]) < 0) + st["loops"]
            th = np.where(th >= 0, th + _fill(tl_m, loops, st["loops"]), th)
            st["loops"] = int(loops[-1]) if len(loops) else st["loops"]
        tl = _fill(tl_m, tlv, st["tl"])
        y = _fill(y_m, sval[y_m] & 0x7FF, st["y"])
        # x base of vectors: the last VECT_BASE_X plus the columns of the vectors since then
        etyp, evals = typ[epos], val[epos].astype(np.int64)
        inc = INC[etyp]
        prefix = np.concatenate(([0], np.cumsum(inc)))
        bx = _fill(b_m, sval[b_m] & 0x7FF, st["xb"])
        bcs = _fill(b_m, prefix[np.searchsorted(epos, spos[b_m])], 0)
        bp = _fill(b_m, sval[b_m] >> 11, st["vp"])
        if len(thv):
            st["th_raw"], st["wraps"] = int(thv[-1]), int(wraps[-1])
        st.update(th=int(th_written[-1]), tl=int(tl[-1]), y=int(y[-1]), vp=int(bp[-1]))
        st["xb"] = int(bx[-1] + prefix[-1] - bcs[-1]) if bx[-1] >= 0 else -1
        # each event word sees the state of the last state word before it
        k = np.searchsorted(spos, epos)
        single = etyp == ADDR_X
        xb = np.where(single, evals & 0x7FF, np.where(bx[k] >= 0, bx[k] + prefix[:-1] - bcs[k], -1))
        p = np.where(single, evals >> 11, bp[k])
        mask = np.where(single, 1, np.where(etyp == VECT_12, evals & 0xFFF, evals & 0xFF))
        tk, yk = th[k], y[k]
        known = (tk >= 0) & (yk >= 0) & (xb >= 0)
        if not known.all():
            self.stats.no_state += int(POPCOUNT[mask[~known]].sum())
            epos, k, xb, p, mask, tk, yk = (a[known] for a in (epos, k, xb, p, mask, tk, yk))
        t = (tk << 12) | tl[k]
        # expand the masks: one event per set bit, in word order then column order
        counts = POPCOUNT[mask]
        if (counts == 1).all():
            rows, cols = slice(None), BITPOS[mask, 0]
            wpos = epos
        else:
            rows = np.repeat(np.arange(len(mask)), counts)
            rank = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
            cols = BITPOS[mask[rows], rank]
            wpos = epos[rows]
        x = xb[rows] + cols
        ev_t, ev_y, ev_p = t[rows], yk[rows], p[rows]
        keep = self.reject(x >= limit, "out_of_bounds", lambda i: f"vector event x={x[i]} beyond x<{limit}",
                           lambda i: base + 2 * int(wpos[i]))
        if keep is not None:
            x, ev_t, ev_y, ev_p, wpos = x[keep], ev_t[keep], ev_y[keep], ev_p[keep], wpos[keep]
        return make_events(ev_t, x, ev_y, ev_p), (lambda i: base + 2 * int(wpos[i]))


def _fill(mask: np.ndarray, values: np.ndarray, initial: int) -> np.ndarray:
    """Forward fill over the state words: element ``i + 1`` is the value of the last word ``<= i``
    flagged in ``mask`` (``values`` holds one value per flagged word, in order); element 0 and the words
    before the first flagged one get ``initial``."""
    ext = np.concatenate(([initial], values)).astype(np.int64)
    return ext[np.concatenate(([0], np.cumsum(mask)))]


class EVT3Writer(EventWriter):
    """Writer of EVT 3.0 ``.raw`` files (header ``% evt 3.0``, ``% format EVT3;height=H;width=W``).

    Emits TIME_HIGH whenever bits 12.. of the time change (stepping from 0 by at most 2047, so absolute
    times survive the 24-bit wrap-around), TIME_LOW when the time changes, ADDR_Y when the row changes.
    With ``vectorize=True`` runs of events with the same time, row and polarity and increasing x (gaps up
    to 12) become VECT_BASE_X + VECT_12/VECT_8 words; otherwise every event is an ADDR_X word.
    """

    format_name = "evt3"

    def __init__(self, dest: Source, *, width: int = 1280, height: int = 720, vectorize: bool = True) -> None:
        if not (0 < width <= MAX_X and 0 < height <= MAX_X):
            raise ValueError("EVT 3.0 coordinates are 11-bit: width and height must be in 1..2048")
        super().__init__(dest)
        self.size = (width, height)
        self.vectorize = vectorize
        self._state = {"th": 0, "started": 0, "t": -1, "y": -1}
        self._f.write(pro.header_bytes(["evt 3.0", f"format EVT3;height={height};width={width}",
                                        f"geometry {width}x{height}", "generator stoprt", "end"]))

    def write(self, events: Any) -> None:
        ev = self._prepare(events, *self.size)
        n = len(ev)
        if n == 0:
            return
        st = self._state
        t, x, y, p = ev["t"], ev["x"].astype(np.int64), ev["y"].astype(np.int64), ev["p"].astype(np.int64)
        th_idx, th_ord, th_val = pro.time_high_words(t >> 12, st["th"], bool(st["started"]), HALF - 1)
        prev_t = np.concatenate(([st["t"]], t[:-1]))
        prev_y = np.concatenate(([st["y"]], y[:-1]))
        new_t = t != prev_t
        new_t[th_idx] = True
        tl_idx = np.flatnonzero(new_t)
        y_idx = np.flatnonzero(y != prev_y)
        # segments of events that one vector can carry
        start = new_t | (y != prev_y)
        if n > 1:
            dx = np.diff(x)
            start[1:] |= (p[1:] != p[:-1]) | (dx <= 0) | (dx > 12)
        if not self.vectorize:
            start[:] = True
        seg = np.cumsum(start) - 1
        first = np.flatnonzero(start)
        length = np.diff(np.append(first, n))
        solo, multi = first[length == 1], first[length > 1]
        off = x - x[first][seg]  # column inside the segment
        # one VECT_12 word per 12 columns of each multi-event segment (VECT_8 when the last fits in 8)
        nb = off[multi + length[length > 1] - 1] // 12 + 1
        vec_seg = np.repeat(np.arange(len(multi)), nb)
        vec_first = multi[vec_seg]
        block0 = np.cumsum(nb) - nb
        vec_block = np.arange(len(vec_seg)) - block0[vec_seg]
        members = np.flatnonzero(length[seg] > 1)
        slot = block0[(np.cumsum(length > 1) - 1)[seg[members]]] + off[members] // 12
        masks = np.bincount(slot, weights=np.left_shift(1, off[members] % 12),
                            minlength=len(vec_seg)).astype(np.int64)
        short = (vec_block == nb[vec_seg] - 1) & (masks < 256)
        vec_words = np.where(short, VECT_8 << 12, VECT_12 << 12) | masks
        words = [(TIME_HIGH << 12) | (th_val & 0xFFF), (TIME_LOW << 12) | (t[tl_idx] & 0xFFF),
                 (ADDR_Y << 12) | y[y_idx], (ADDR_X << 12) | (p[solo] << 11) | x[solo],
                 (VECT_BASE_X << 12) | (p[multi] << 11) | x[multi], vec_words]
        idx = [th_idx, tl_idx, y_idx, solo, multi, vec_first]
        big_order = 1 << 40
        order = [th_ord, np.full(len(tl_idx), big_order), np.full(len(y_idx), big_order + 1),
                 np.full(len(solo), big_order + 2), np.full(len(multi), big_order + 2), big_order + 3 + vec_block]
        out = pro.assemble(idx, order, [np.asarray(a, dtype=np.int64) for a in words]).astype("<u2")
        st.update(th=int(t[-1] >> 12), started=1, t=int(t[-1]), y=int(y[-1]))
        self._commit(ev, out.tobytes())
