"""Event-camera file formats: streaming readers and writers of our own, all to :data:`EVENT_DTYPE`.

Readers (``chunk_size`` bytes at a time; iterate for event arrays, or ``read_all()``)::

    nmnist  NMNISTReader   N-MNIST / N-Caltech101 .bin (5-byte events)
    aedat2  AEDAT2Reader   jAER AEDAT 2.0 (.aedat), DVS128 and DAVIS address layouts
    aedat3  AEDAT3Reader   cAER AEDAT 3.1 (.aedat), polarity packets, overflow-counter wrap-around
    aedat4  AEDAT4Reader   iniVation AEDAT 4.0 (.aedat4) through the optional ``aedat`` package
    evt2    EVT2Reader     Prophesee EVT 2.0 .raw
    evt3    EVT3Reader     Prophesee EVT 3.0 .raw (vectorised words; time_low_wrap=True for the
                           TIME_LOW-decrease rule of the decoder behind the fixture's evt3_sample.npy)
    dat     DATReader      Prophesee legacy .dat (N-CARS, Gen1)

Writers: ``NMNISTWriter``, ``AEDAT2Writer``, ``AEDAT3Writer``, ``EVT2Writer``, ``EVT3Writer``,
``DATWriter`` (``write(events)`` repeatedly, then ``close()``; also context managers).

:func:`open_events` picks the reader from the extension and the sniffed header, and refuses a file
whose header contradicts its extension; :func:`read_events` reads a whole file; :func:`write_events`
writes one. Problems raise :class:`EventFormatError` (or are counted with ``errors="skip"``, see
:class:`ReaderStats`); :class:`RecordingInfo` carries the sensor size where the file gives it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _prophesee as pro
from ._common import (DEFAULT_CHUNK_SIZE, ByteSource, EventFormatError, EventReader, ReaderStats,
                      RecordingInfo, Source)
from ._writer import EventWriter
from .aedat2 import AEDAT2Reader, AEDAT2Writer
from .aedat3 import AEDAT3Reader, AEDAT3Writer
from .aedat4 import AEDAT4Reader
from .dat import DATReader, DATWriter
from .evt2 import EVT2Reader, EVT2Writer
from .evt3 import EVT3Reader, EVT3Writer
from .nmnist import SENSOR_SIZE as NMNIST_SENSOR_SIZE, NMNISTReader, NMNISTWriter

READERS: dict[str, type[EventReader]] = {
    "nmnist": NMNISTReader, "aedat2": AEDAT2Reader, "aedat3": AEDAT3Reader, "aedat4": AEDAT4Reader,
    "evt2": EVT2Reader, "evt3": EVT3Reader, "dat": DATReader,
}
WRITERS: dict[str, type[EventWriter]] = {
    "nmnist": NMNISTWriter, "aedat2": AEDAT2Writer, "aedat3": AEDAT3Writer, "evt2": EVT2Writer,
    "evt3": EVT3Writer, "dat": DATWriter,
}
EXTENSIONS: dict[str, tuple[str, ...]] = {
    ".bin": ("nmnist",), ".aedat": ("aedat2", "aedat3", "aedat4"), ".aedat4": ("aedat4",),
    ".raw": ("evt2", "evt3"), ".dat": ("dat",),
}
# The geometry of formats whose files do not state it, where the format implies one.
DEFAULT_SENSOR_SIZES: dict[str, tuple[int, int]] = {"nmnist": NMNIST_SENSOR_SIZE}
DEFAULT_WRITER = {".bin": "nmnist", ".aedat": "aedat3", ".raw": "evt3", ".dat": "dat"}
_PROPHESEE_NO_EVT = "prophesee-header"


def _name(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<stream>"


def _sniff(src: ByteSource, path: str) -> str | None:
    head = src.peek(16)
    if head.startswith(b"#!AER-DAT"):
        version = head[9:12]
        for ver, fmt in ((b"2.0", "aedat2"), (b"3.1", "aedat3"), (b"4.0", "aedat4")):
            if version == ver:
                return fmt
        raise EventFormatError(f"unsupported AEDAT version {head[:12]!r}", path=path, offset=0)
    if head.startswith(b"%"):
        header = pro.read_header(src, path)
        ver = pro.evt_version(header)
        if ver in ("2.0", "3.0"):
            return "evt2" if ver == "2.0" else "evt3"
        if ver is not None:
            raise EventFormatError(f"unsupported Prophesee encoding EVT {ver} (EVT 2.0 and 3.0 are read)",
                                   path=path, offset=0)
        if pro.get(header, "Version") is not None or pro.get(header, "Data") is not None:
            return "dat"
        return _PROPHESEE_NO_EVT
    return None


def sniff_format(source: Source) -> str | None:
    """The format a file's header names (``None`` when it has no recognisable header, as N-MNIST
    ``.bin`` files). File objects must be seekable; their position is restored."""
    path = _name(source)
    if not isinstance(source, (str, os.PathLike)):
        if not (hasattr(source, "seekable") and source.seekable()):
            raise ValueError("sniffing a file object needs it to be seekable; pass format= instead")
        pos = source.tell()
        try:
            return _sniff(ByteSource(source), path)
        finally:
            source.seek(pos)
    src = ByteSource(source)
    try:
        return _sniff(src, path)
    finally:
        src.close()


def detect_format(source: Source) -> str:
    """The reader name for a file from its extension and its header; raises
    :class:`EventFormatError` when they disagree or neither says."""
    path = _name(source)
    allowed = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    sniffed = sniff_format(source)
    if sniffed == _PROPHESEE_NO_EVT:
        if allowed is None or "dat" in allowed:
            return "dat"
        if set(allowed) <= {"evt2", "evt3"}:
            raise EventFormatError("the '%' header names no EVT encoding ('% evt 3.0' or '% format EVT3...'); "
                                   "pass format='evt2' or format='evt3'", path=path, offset=0)
        sniffed = "dat"
    if sniffed is not None:
        if allowed is not None and sniffed not in allowed:
            raise EventFormatError(f"the header says {sniffed} but the extension "
                                   f"{os.path.splitext(path)[1]!r} means {'/'.join(allowed)}; "
                                   "pass format= (stoprt stream --format) to override", path=path, offset=0)
        return sniffed
    if allowed == ("nmnist",):
        return "nmnist"
    if allowed == ("dat",):
        return "dat"  # a .dat without text header: the type/size pair follows directly
    what = f"a {'/'.join(allowed)} file needs a header that this file lacks" if allowed else \
        "unknown extension and no recognisable header"
    raise EventFormatError(f"cannot tell the format: {what}; pass format= (stoprt stream --format) to override",
                           path=path, offset=0)


def open_events(source: Source, format: str | None = None, **kwargs: Any) -> EventReader:
    """A streaming reader for ``source`` (path or binary file object).

    ``format`` (a key of :data:`READERS`) skips detection; other keyword arguments go to the reader
    (``chunk_size``, ``errors``, ``sensor_size``, ``monotonic``, and format-specific ones).
    """
    name = format or detect_format(source)
    if name not in READERS:
        raise ValueError(f"unknown event format {name!r}; known: {', '.join(READERS)}")
    return READERS[name](source, **kwargs)


def read_events(source: Source, format: str | None = None, **kwargs: Any) -> np.ndarray:
    """All events of a file as one EVENT_DTYPE array (see :func:`open_events`)."""
    with open_events(source, format, **kwargs) as reader:
        return reader.read_all()


def write_events(dest: Source, events: Any, format: str | None = None, **kwargs: Any) -> int:
    """Write ``events`` to a new file; the format comes from ``format`` or the extension (``.raw`` ->
    EVT 3.0, ``.aedat`` -> AEDAT 3.1). Keyword arguments go to the writer. Returns the event count."""
    name = format or DEFAULT_WRITER.get(os.path.splitext(_name(dest))[1].lower())
    if name not in WRITERS:
        raise ValueError(f"cannot choose a writer for {_name(dest)!r}; pass format= one of {', '.join(WRITERS)}")
    with WRITERS[name](dest, **kwargs) as writer:
        writer.write(events)
        return writer.events_written


__all__ = [
    "DEFAULT_CHUNK_SIZE", "DEFAULT_SENSOR_SIZES", "EXTENSIONS", "READERS", "WRITERS", "AEDAT2Reader", "AEDAT2Writer", "AEDAT3Reader",
    "AEDAT3Writer", "AEDAT4Reader", "DATReader", "DATWriter", "EVT2Reader", "EVT2Writer", "EVT3Reader",
    "EVT3Writer", "EventFormatError", "EventReader", "EventWriter", "NMNISTReader", "NMNISTWriter",
    "ReaderStats", "RecordingInfo", "detect_format", "open_events", "read_events", "sniff_format",
    "write_events",
]
