"""AEDAT 3.1 (cAER / DV legacy) files, as used by DVS128 Gesture.

Binary layout: text header lines starting with ``#`` and ending ``\\r\\n``, the first ``#!AER-DAT3.1``
and the last ``#!END-HEADER``; ``#Format: RAW`` (the only format read here) and ``#Source <id>: <name>``
name the sensor. Then packets, all little-endian:

* 28-byte packet header: ``int16 eventType, int16 eventSource, int32 eventSize, int32 eventTSOffset,
  int32 eventTSOverflow, int32 eventCapacity, int32 eventNumber, int32 eventValid``;
* ``eventNumber * eventSize`` bytes of events.

Polarity packets (``eventType == 1``) hold 8-byte events ``uint32 data, int32 timestamp``::

    data bit 0 = valid, bit 1 = polarity (1 = ON), bits 2..16 = y, bits 17..31 = x

The event timestamp is 31 bits; the full time is ``(eventTSOverflow << 31) | timestamp`` microseconds.
Packets of other types (special, frame, IMU, ...) are skipped and counted; events whose valid bit is 0
are skipped and counted. A packet's payload is read ``chunk_size`` bytes at a time, so huge packets
stay within bounded memory.
"""

from __future__ import annotations

import re
import struct
from typing import Any, Iterator

import numpy as np

from ._common import (EventFormatError, EventReader, OffsetOf, RecordingInfo, Source, check_geometry, make_events,
                      read_text_header)
from ._writer import EventWriter

MAGIC = "!AER-DAT3.1"
END = "!END-HEADER"
PACKET_HEADER = struct.Struct("<hhiiiiii")
POLARITY = 1
EVENT = np.dtype([("data", "<u4"), ("ts", "<i4")])
# Sensor sizes by the source names cAER/DV write.
SOURCE_SIZES = {"DVS128": (128, 128), "DAVIS240": (240, 180), "DAVIS346": (346, 260), "DAVIS640": (640, 480),
                "DVXPLORER_LITE": (320, 240), "DVXPLORER": (640, 480)}


def source_geometry(name: str) -> tuple[int, int] | None:
    key = name.upper().replace(" ", "_")
    for prefix, size in SOURCE_SIZES.items():  # DVXPLORER_LITE is tried before DVXPLORER
        if key.startswith(prefix):
            return size
    return None


class AEDAT3Reader(EventReader):
    """Streaming reader of AEDAT 3.1 polarity events."""

    format_name = "aedat3"

    def _read_header(self) -> RecordingInfo:
        lines = read_text_header(self._src, b"#", self.path, stop=lambda s: s.strip() == END)
        if not lines or not lines[0].startswith("!AER-DAT"):
            raise self.error("missing '#!AER-DAT3.1' header line: not an AEDAT 3.1 file", 0)
        if lines[0].strip() != MAGIC:
            raise self.error(f"unsupported AEDAT version '#{lines[0].strip()}' (this reader reads #{MAGIC})", 0)
        if lines[-1].strip() != END:
            raise self.error("header does not end with '#!END-HEADER' (truncated or not AEDAT 3.1)",
                             self._src.pos)
        header: dict[str, str] = {"version": MAGIC}
        for line in lines[1:-1]:
            m = re.match(r"-?([A-Za-z][\w -]*?)\s*:\s*(.*)$", line)
            if m and m.group(1) not in header:
                header[m.group(1)] = m.group(2).strip()
        fmt = header.get("Format", "RAW")
        if fmt.upper() != "RAW":
            raise self.error(f"unsupported AEDAT 3.1 '#Format: {fmt}' (only RAW is read)", 0)
        size = None
        m = re.match(r"(\d+)\s*x\s*(\d+)$", header.get("Sensor-Size", ""))
        if m:
            size = check_geometry(m.group(1), m.group(2), self.path)
        source = next((v for k, v in header.items() if k.startswith("Source")), "")
        size = size or source_geometry(source)
        return RecordingInfo("aedat3", width=size[0] if size else None, height=size[1] if size else None,
                             header=header, data_offset=self._src.pos, extra={"source": source})

    def _packet_error(self, problem: str, offset: int) -> EventFormatError:
        return self.error(f"corrupt packet header: {problem}", offset)

    def _decode(self) -> Iterator[tuple[np.ndarray, OffsetOf]]:
        step = max(8, self.chunk_size - self.chunk_size % 8)
        while True:
            hdr_off = self._src.pos
            hdr = self._src.read(PACKET_HEADER.size)
            if not hdr:
                return
            if len(hdr) < PACKET_HEADER.size:
                self.truncated(len(hdr), hdr_off, "28-byte packet header")
                return
            etype, _source, esize, tsoff, overflow, _cap, number, _valid = PACKET_HEADER.unpack(hdr)
            if esize <= 0 or number < 0 or overflow < 0 or not 0 <= tsoff <= esize - 4:
                raise self._packet_error(f"type {etype}, event size {esize}, timestamp offset {tsoff}, "
                                         f"overflow {overflow}, number {number}", hdr_off)
            payload = number * esize
            if etype != POLARITY:
                got = self._src.skip(payload)
                self.stats.skipped_packets += 1
                if got < payload:
                    self.truncated(got, hdr_off + PACKET_HEADER.size, f"packet of type {etype}")
                    return
                self.stats.other_events += number
                continue
            if esize != 8 or tsoff != 4:
                raise self._packet_error(f"polarity packet with event size {esize}, timestamp offset {tsoff} "
                                         "(expected 8 and 4)", hdr_off)
            left = payload
            while left:
                base, want = self._src.pos, min(step, left)
                buf = self._src.read(want)
                left -= len(buf)
                whole = len(buf) - len(buf) % 8
                if whole:
                    yield self._polarity(buf[:whole], overflow, base)
                if len(buf) < want:  # end of file inside the packet
                    self.truncated(len(buf) - whole, base + whole, f"polarity packet ({left} bytes missing)")
                    return

    def _polarity(self, buf: bytes, overflow: int, base: int) -> tuple[np.ndarray, OffsetOf]:
        raw = np.frombuffer(buf, dtype=EVENT)
        d, ts = raw["data"], raw["ts"]
        valid = (d & 1).astype(bool)
        self.stats.invalid += len(d) - int(valid.sum())
        idx = np.flatnonzero(valid)
        keep = self.reject(ts[idx] < 0, "corrupt", lambda i: f"negative event timestamp {ts[idx[i]]}",
                           lambda i: base + 8 * int(idx[i]))
        if keep is not None:
            idx = idx[keep]
        d = d[idx]
        t = (np.int64(overflow) << 31) | ts[idx].astype(np.int64)
        ev = make_events(t, (d >> 17) & 0x7FFF, (d >> 2) & 0x7FFF, (d >> 1) & 1)
        return ev, (lambda i: base + 8 * int(idx[i]))


class AEDAT3Writer(EventWriter):
    """Writer of AEDAT 3.1 polarity packets.

    ``write(events)`` splits the events into packets of at most ``packet_events`` events and at every
    change of ``t >> 31`` (the packet's overflow counter), so any timestamp below 2**62 us can be written.
    ``write_packet(events)`` writes exactly one packet (an empty one for no events). The header names
    ``source_name`` and also records ``#Sensor-Size: WxH`` (ignored by other tools).
    """

    format_name = "aedat3"

    def __init__(self, dest: Source, *, width: int = 128, height: int = 128, source_name: str = "DVS128",
                 source_id: int = 1, packet_events: int = 4096) -> None:
        if not (0 < width <= 1 << 15 and 0 < height <= 1 << 15):
            raise ValueError("AEDAT 3.1 coordinates are 15-bit: width and height must be in 1..32768")
        if packet_events < 1:
            raise ValueError("packet_events must be >= 1")
        super().__init__(dest)
        self.size = (width, height)
        self.source_id = source_id
        self.packet_events = packet_events
        self._overflow = 0
        lines = ["#" + MAGIC, "#Format: RAW", f"#Source {source_id}: {source_name}", f"#Sensor-Size: {width}x{height}",
                 "#Start-Time: 1970-01-01 00:00:00 (TZ+0000)", "#" + END]
        self._f.write("".join(line + "\r\n" for line in lines).encode("ascii"))

    def _encode_packet(self, ev: np.ndarray, overflow: int) -> bytes:
        n = len(ev)
        head = PACKET_HEADER.pack(POLARITY, self.source_id, 8, 4, overflow, n, n, n)
        body = np.empty(n, dtype=EVENT)
        body["data"] = ((ev["x"].astype(np.uint32) << 17) | (ev["y"].astype(np.uint32) << 2)
                        | (ev["p"].astype(np.uint32) << 1) | 1)
        body["ts"] = ev["t"] & 0x7FFFFFFF
        return head + body.tobytes()

    def write(self, events: Any) -> None:
        ev = self._prepare(events, *self.size)
        if len(ev) == 0:
            return
        if int(ev["t"][-1]) >= 1 << 62:
            raise self.error("timestamps must be below 2**62 us")
        epoch = ev["t"] >> 31
        cuts = np.flatnonzero(np.diff(epoch)) + 1
        parts = []
        for run in np.split(np.arange(len(ev)), cuts):
            for start in range(0, len(run), self.packet_events):
                sel = run[start:start + self.packet_events]
                parts.append(self._encode_packet(ev[sel], int(epoch[sel[0]])))
        self._overflow = int(epoch[-1])
        self._commit(ev, b"".join(parts))

    def write_packet(self, events: Any) -> None:
        """Write ``events`` as one packet (all must share ``t >> 31``; none gives an empty packet)."""
        ev = self._prepare(events, *self.size)
        if len(ev) and int(ev["t"][0] >> 31) != int(ev["t"][-1] >> 31):
            raise self.error("one packet cannot span a timestamp overflow (t >> 31 must be constant)")
        overflow = int(ev["t"][0] >> 31) if len(ev) else self._overflow
        self._overflow = overflow
        self._commit(ev, self._encode_packet(ev, overflow))
