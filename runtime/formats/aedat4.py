"""AEDAT 4.0 (iniVation DV) files, decoded by the optional ``aedat`` package (MIT; ``pip install
stoprt[aedat]``).

AEDAT 4.0 is ``#!AER-DAT4.0\\r\\n``, a flatbuffers IOHeader, then LZ4/zstd-compressed flatbuffers
packets of several streams (events, frames, IMU, triggers). Only the polarity event streams are read:
``aedat`` gives structured arrays with ``t`` (uint64 us), ``x``, ``y`` and ``on``; other streams are
counted in ``stats.other_events``. The sensor size comes from the (first) events stream. Reading is
packet by packet (``chunk_size`` does not apply: DV packets are already small).
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator

import numpy as np

from ._common import EventReader, OffsetOf, RecordingInfo, Source, make_events

MAGIC = b"#!AER-DAT4.0"


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
        while True:
            try:
                packet = next(it)
            except StopIteration:
                return
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
