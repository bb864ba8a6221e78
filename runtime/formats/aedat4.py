"""AEDAT 4.0 (iniVation DV) files, decoded by the optional ``aedat`` package (MIT; ``pip install
stoprt[aedat]``).

AEDAT 4.0 is ``#!AER-DAT4.0\\r\\n``, a little-endian uint32 size and a flatbuffers IOHeader of that
size (compression, the byte offset of the file's data table or -1, an XML description), then packets
of several streams (events, frames, IMU, triggers): uint32 stream id, uint32 size, that many bytes of
an LZ4/zstd-compressed flatbuffer. The data table (an index of the packets, one compressed frame)
runs from its offset to the end of the file.

Only the polarity event streams are read: ``aedat`` gives structured arrays with ``t`` (uint64 us),
``x``, ``y`` and ``on``; other streams are counted in ``stats.other_events``. The sensor size comes
from the (first) events stream. Reading is packet by packet (``chunk_size`` does not apply: DV
packets are already small).

``aedat`` allocates what a size field says before reading it, so a corrupt 4 GiB field aborts the
process where that much memory cannot be had. Before ``aedat`` sees a file, :func:`scan_layout`
checks the IOHeader and every packet's size field against the bytes left, and that the data table
is a whole compressed frame. A bad IOHeader always raises; a file cut inside a packet or the data
table is a truncated file (``errors``, see :mod:`._common`): the packets before the cut are read.
"""

from __future__ import annotations

import importlib
import os
import struct
from dataclasses import dataclass
from typing import IO, Any, Iterator

import numpy as np

from ._common import EventFormatError, EventReader, OffsetOf, RecordingInfo, Source, make_events

MAGIC = b"#!AER-DAT4.0"
PREAMBLE = MAGIC + b"\r\n"
U32 = struct.Struct("<I")
COMPRESSIONS = ("none", "lz4", "lz4-high", "zstd", "zstd-high")
LZ4_MAGIC, ZSTD_MAGIC = 0x184D2204, 0xFD2FB528


@dataclass(frozen=True)
class Layout:
    """What :func:`scan_layout` found: ``packets`` whole packets; ``cut`` = ``(offset, bytes, what,
    detail)`` when the file ends inside a packet or the data table."""

    compression: str
    packets: int
    cut: tuple[int, int, str, str] | None = None


def _fail(problem: str, path: str, offset: int) -> EventFormatError:
    return EventFormatError(problem, path=path, offset=offset)


def _flatbuffer_field(buf: bytes, index: int, size: int) -> int | None:
    """The offset in ``buf`` of field ``index`` of the root table (``None``: absent), with every
    offset followed checked against ``len(buf)``; ValueError when one points outside."""
    n = len(buf)
    if n < 8:
        raise ValueError("shorter than a flatbuffer")
    table = U32.unpack_from(buf, 0)[0]
    if table + 4 > n:
        raise ValueError("root table outside the buffer")
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    if not 0 <= vtable <= n - 4:
        raise ValueError("vtable outside the buffer")
    vsize, tsize = struct.unpack_from("<HH", buf, vtable)
    if vsize < 4 or vtable + vsize > n or table + tsize > n:
        raise ValueError("vtable or table runs past the buffer")
    slot = 4 + 2 * index
    if slot + 2 > vsize:
        return None
    off = struct.unpack_from("<H", buf, vtable + slot)[0]
    if not off:
        return None
    if off + size > tsize:
        raise ValueError(f"field {index} runs past its table")
    return table + off


def _read_ioheader(buf: bytes) -> tuple[int, int]:
    """``(compression, data table offset)`` of an IOHeader flatbuffer (schema: compression int32 = 0,
    file_data_position int64 = -1, description string); ValueError when it is malformed."""
    at = _flatbuffer_field(buf, 0, 4)
    compression = 0 if at is None else struct.unpack_from("<i", buf, at)[0]
    at = _flatbuffer_field(buf, 1, 8)
    table_pos = -1 if at is None else struct.unpack_from("<q", buf, at)[0]
    at = _flatbuffer_field(buf, 2, 4)
    if at is None:
        raise ValueError("no description")
    start = at + U32.unpack_from(buf, at)[0]
    if start + 4 > len(buf) or start + 4 + U32.unpack_from(buf, start)[0] > len(buf):
        raise ValueError("description string runs past the header")
    if not 0 <= compression < len(COMPRESSIONS):
        raise ValueError(f"unknown compression {compression}")
    return compression, table_pos


def _frame_end(f: IO[bytes], start: int, size: int, compression: str) -> int | None:
    """Where the LZ4 or zstd frame at ``start`` ends (``None``: past ``size``, i.e. cut)."""
    def read(pos: int, n: int) -> bytes | None:
        if pos + n > size:
            return None
        f.seek(pos)
        return f.read(n)

    head = read(start, 7)
    if head is None:
        return None
    magic = U32.unpack_from(head, 0)[0]
    if compression.startswith("lz4") and magic == LZ4_MAGIC:
        flg = head[4]
        pos = start + 7 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0)
        while (word := read(pos, 4)) is not None:
            block = U32.unpack_from(word, 0)[0]
            pos += 4
            if block == 0:  # end mark, then the optional content checksum
                pos += 4 if flg & 0x04 else 0
                return pos if pos <= size else None
            pos += (block & 0x7FFFFFFF) + (4 if flg & 0x10 else 0)
        return None
    if compression.startswith("zstd") and magic == ZSTD_MAGIC:
        fhd = head[4]
        single = fhd >> 5 & 1
        fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
        pos = start + 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
        while (word := read(pos, 3)) is not None:
            bh = int.from_bytes(word, "little")
            kind = bh >> 1 & 3
            if kind == 3:
                raise ValueError("reserved zstd block type")
            pos += 3 + (1 if kind == 1 else bh >> 3)
            if bh & 1:
                pos += 4 if fhd & 0x04 else 0
                return pos if pos <= size else None
        return None
    raise ValueError(f"the data table is not a {compression} frame")


def scan_layout(f: IO[bytes], path: str) -> Layout:
    """Check an AEDAT 4.0 file's size fields against its length (see the module docstring)."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(len(PREAMBLE) + 4)
    if not head.startswith(PREAMBLE):
        raise _fail("missing '#!AER-DAT4.0\\r\\n' magic: not an AEDAT 4.0 file", path, 0)
    if len(head) < len(PREAMBLE) + 4:
        raise _fail("file ends inside the IOHeader size field (truncated file?)", path, len(PREAMBLE))
    n = U32.unpack_from(head, len(PREAMBLE))[0]
    pos = len(head)
    if n > size - pos:
        raise _fail(f"IOHeader size field says {n} bytes but {size - pos} are left (corrupt or truncated file)",
                    path, len(PREAMBLE))
    try:
        code, table_pos = _read_ioheader(f.read(n))
    except ValueError as exc:
        raise _fail(f"corrupt IOHeader: {exc}", path, pos) from None
    compression = COMPRESSIONS[code]
    pos += n
    if table_pos != -1 and table_pos < pos:
        raise _fail(f"IOHeader data table offset {table_pos} is inside the header", path, pos - n)
    end = size if table_pos == -1 else min(table_pos, size)
    packets = 0
    while pos < end:
        if end - pos < 8:
            return Layout(compression, packets, (pos, end - pos, "packet header", f"{end - pos} of 8 bytes"))
        f.seek(pos)
        length = U32.unpack_from(f.read(8), 4)[0]
        if length > end - pos - 8:
            detail = f"its size field at byte {pos + 4} says {length} bytes but {end - pos - 8} are left"
            if pos + 8 + length <= size:  # inside the file but across the data table: not a cut
                raise _fail(f"packet runs into the data table ({detail})", path, pos)
            return Layout(compression, packets, (pos, size - pos, "packet", detail))
        pos += 8 + length
        packets += 1
    if table_pos == -1:
        return Layout(compression, packets)
    if table_pos > size:
        return Layout(compression, packets, (size, 0, "packet stream",
                                             f"the data table should start at byte {table_pos}, the file has {size}"))
    if compression != "none":
        try:
            frame_end = _frame_end(f, table_pos, size, compression)
        except ValueError as exc:
            raise _fail(f"corrupt data table: {exc}", path, table_pos) from None
        if frame_end is None:
            return Layout(compression, packets, (table_pos, size - table_pos, "data table",
                                                 f"its {compression} frame needs more than the {size - table_pos} "
                                                 "bytes left"))
    return Layout(compression, packets)


def _aedat() -> Any:
    try:
        return importlib.import_module("aedat")
    except ImportError as exc:
        raise ImportError("reading AEDAT 4.0 files needs the optional 'aedat' package: "
                          "pip install 'stoprt[aedat]' (or pip install aedat)") from exc


def _is_library_error(exc: BaseException) -> bool:
    # aedat is a Rust extension: a Rust panic surfaces as pyo3's PanicException (a BaseException).
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class AEDAT4Reader(EventReader):
    """Reader of AEDAT 4.0 polarity events through ``aedat.Decoder`` (needs a file path)."""

    format_name = "aedat4"

    def __init__(self, source: Source, **kwargs: Any) -> None:
        self._aedat = _aedat()
        super().__init__(source, **kwargs)

    def _read_header(self) -> RecordingInfo:
        if self._src.peek(len(MAGIC)) != MAGIC:
            raise self.error("missing '#!AER-DAT4.0' magic: not an AEDAT 4.0 file", 0)
        if self.path == "<stream>":
            raise self.error("AEDAT 4.0 files are read by path (the aedat decoder opens the file itself)")
        with open(self.path, "rb") as f:
            self._layout = scan_layout(f, self.path)
        try:
            self._decoder = self._aedat.Decoder(self.path)
            streams = dict(self._decoder.id_to_stream())
        except BaseException as exc:
            if not _is_library_error(exc):
                raise
            raise self.error(f"aedat could not open the file: {exc}") from None
        events = {k: v for k, v in streams.items() if v.get("type") == "events"}
        self._event_ids = set(events)
        w = h = None
        if events:
            first = events[min(events)]
            w, h = first.get("width"), first.get("height")
        return RecordingInfo("aedat4", width=w, height=h, data_offset=len(MAGIC),
                             header={str(k): str(v.get("type")) for k, v in streams.items()})

    def _decode(self) -> Iterator[tuple[np.ndarray, OffsetOf]]:
        it = iter(self._decoder)
        for _ in range(self._layout.packets):  # never the cut packet: aedat would allocate its size
            try:
                packet = next(it)
            except StopIteration:
                break
            except BaseException as exc:
                if not _is_library_error(exc):
                    raise
                raise self.error(f"aedat failed to decode a packet: {exc}") from None
            ev = packet.get("events")
            if ev is None or packet.get("stream_id") not in self._event_ids:
                for key in ("imus", "triggers", "frame"):
                    if key in packet:
                        self.stats.other_events += len(packet[key]) if key != "frame" else 1
                continue
            if len(ev) and int(ev["t"].max()) >= 1 << 63:
                raise self.error("timestamp beyond int64")
            yield make_events(ev["t"].astype(np.int64), ev["x"], ev["y"], ev["on"].astype(np.uint8)), (lambda i: None)
        if self._layout.cut is not None:
            offset, nbytes, what, detail = self._layout.cut
            self.truncated(nbytes, offset, what, detail)

    def close(self) -> None:
        self._decoder = None
        super().close()


def check_available() -> bool:
    """True when the optional ``aedat`` package can be imported."""
    try:
        _aedat()
    except ImportError:
        return False
    return True
