"""Shared machinery of the event-file readers and writers.

Conventions used by every format module:

* Events are 1-D arrays of :data:`stoprt.runtime.events.EVENT_DTYPE` (``t`` int64 microseconds,
  ``x``/``y`` uint16, ``p`` uint8 with 1 = ON).
* Readers stream: a reader is an iterator of non-empty event arrays. It reads ``chunk_size`` bytes at a
  time, carries partial records (words, events, packets) over to the next read, and never holds more
  than about one chunk plus one record in memory. The first events come out after the first chunk.
* Problems with the data raise :class:`EventFormatError` (a ``ValueError`` naming the file, the byte
  offset and the problem). With ``errors="skip"`` the per-event problems (coordinates outside the
  sensor, timestamps that go backwards, unknown words, a truncated last record) are counted in
  :attr:`EventReader.stats` and the offending events dropped instead. Problems that leave no way to
  carry on (a bad header, a corrupt packet header) always raise.
* A truncated file (one that ends inside a record, packet or frame) is one policy for every reader:
  ``errors="raise"`` raises once the events before the cut are yielded; ``errors="skip"`` keeps those
  events, counts the bytes in ``stats.truncated_bytes`` and keeps the message that would have been
  raised in :attr:`EventReader.truncation` (``stoprt stream`` reads with ``"skip"`` and prints it as
  a warning). A file cut inside its text header always raises.
* Things a format carries besides polarity events (APS frames, IMU samples, triggers, invalid events)
  are skipped by design and counted, never an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import IO, Any, Callable, ClassVar, Iterator, Literal, Mapping, Optional, Union

import numpy as np

from ..events import EVENT_DTYPE

Source = Union[str, "os.PathLike[str]", IO[bytes]]
ErrorMode = Literal["raise", "skip"]
OffsetOf = Callable[[int], Optional[int]]

DEFAULT_CHUNK_SIZE = 1 << 20
MAX_HEADER_BYTES = 16 << 20
MAX_HEADER_LINE = 1 << 20
MAX_COORD = 1 << 16


class EventFormatError(ValueError):
    """An event file that cannot be decoded (or events that cannot be encoded).

    ``path`` is the file name (``"<stream>"`` for unnamed file objects), ``offset`` the byte offset of
    the problem where known, and ``problem`` the description alone.
    """

    def __init__(self, problem: str, *, path: str | None = None, offset: int | None = None) -> None:
        self.problem = problem
        self.path = path
        self.offset = offset
        where = path or "<stream>"
        if offset is not None:
            where += f" at byte {offset}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class RecordingInfo:
    """What the file says about the recording.

    ``format`` is the short format name (``"nmnist"``, ``"aedat2"``, ``"aedat3"``, ``"aedat4"``,
    ``"evt2"``, ``"evt3"``, ``"dat"``); ``width``/``height`` the sensor geometry when the format or
    header gives it (``None`` otherwise); ``header`` the parsed text header (keys as written);
    ``data_offset`` the byte offset where the binary data starts; ``extra`` facts the reader derived
    (address layout, chip name, ...).
    """

    format: str
    width: int | None = None
    height: int | None = None
    header: Mapping[str, str] = field(default_factory=dict)
    data_offset: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def sensor_size(self) -> tuple[int, int] | None:
        """``(width, height)`` or ``None`` when unknown."""
        if self.width is None or self.height is None:
            return None
        return (self.width, self.height)


@dataclass
class ReaderStats:
    """Counters of a reader. Events counted here were not yielded."""

    bytes_read: int = 0
    events: int = 0  # events yielded
    chunks: int = 0  # arrays yielded
    out_of_bounds: int = 0  # dropped: coordinates outside the sensor (errors="skip")
    backwards: int = 0  # dropped: timestamp before an earlier one (errors="skip")
    corrupt: int = 0  # dropped: impossible field values, e.g. polarity 7 (errors="skip")
    unknown_words: int = 0  # EVT words of a type the format does not define (errors="skip")
    truncated_bytes: int = 0  # bytes of an incomplete last record (errors="skip")
    no_state: int = 0  # EVT events before the first time-high / row word: skipped by design
    invalid: int = 0  # events the file marks invalid (AEDAT 3.1 valid bit): skipped by design
    other_events: int = 0  # non-polarity events (APS, IMU, triggers, special): skipped by design
    skipped_packets: int = 0  # AEDAT 3.1 packets of other event types: skipped by design

    @property
    def skipped_events(self) -> int:
        """Events dropped because of a problem (not counting those skipped by design)."""
        return self.out_of_bounds + self.backwards + self.corrupt

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ByteSource:
    """A binary file (path or file object) read forwards, with a small look-ahead buffer."""

    def __init__(self, source: Source) -> None:
        if isinstance(source, (str, os.PathLike)):
            self.name = os.fspath(source)
            self._f: IO[bytes] = open(self.name, "rb")
            self._own = True
        elif hasattr(source, "read"):
            self._f = source  # type: ignore[assignment]
            self._own = False
            name = getattr(source, "name", None)
            self.name = name if isinstance(name, str) else "<stream>"
        else:
            raise TypeError(f"expected a path or a binary file object, got {type(source).__name__}")
        self._pending = b""
        self.pos = 0  # absolute offset of the next byte returned by read()

    def _raw(self, n: int) -> bytes:
        data = self._f.read(n)
        if data is None:  # non-blocking stream with nothing ready
            return b""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("the file object must be opened in binary mode")
        return bytes(data)

    def peek(self, n: int) -> bytes:
        """Up to ``n`` next bytes without consuming them (fewer only at end of file)."""
        while len(self._pending) < n:
            data = self._raw(max(n - len(self._pending), 4096))
            if not data:
                break
            self._pending += data
        return self._pending[:n]

    def peek_line(self, limit: int) -> bytes:
        """The next line including its ``\\n`` (or up to ``limit`` bytes / end of file)."""
        start = 0
        while True:
            i = self._pending.find(b"\n", start)
            if i >= 0:
                return self._pending[: i + 1]
            if len(self._pending) >= limit:
                return self._pending[:limit]
            start = len(self._pending)
            if not self.peek(len(self._pending) + 4096)[start:]:
                return self._pending

    def read(self, n: int) -> bytes:
        """``n`` bytes, fewer only at end of file."""
        if self._pending:
            out, self._pending = self._pending[:n], self._pending[n:]
        else:
            out = b""
        while len(out) < n:
            data = self._raw(n - len(out))
            if not data:
                break
            out = out + data if out else data
        self.pos += len(out)
        return out

    def skip(self, n: int) -> int:
        """Skip ``n`` bytes; returns how many were skipped (fewer at end of file)."""
        done = 0
        while done < n:
            got = len(self.read(min(n - done, 1 << 20)))
            if not got:
                break
            done += got
        return done

    def close(self) -> None:
        if self._own:
            self._f.close()


def is_text_line(line: bytes) -> bool:
    """True when ``line`` looks like a header text line (UTF-8, no control bytes but tab/CR/LF)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= " " or c in "\t\r\n" for c in text)


def read_text_header(src: ByteSource, prefix: bytes, path: str, *, stop: Callable[[str], bool] | None = None,
                     max_bytes: int = MAX_HEADER_BYTES) -> list[str]:
    """Consume the text lines that start with ``prefix``; returns them without prefix and newline.

    A line that does not decode as text is taken as the start of the binary data. ``stop(line)``
    ends the header after the line it accepts (e.g. ``% end``).
    """
    lines: list[str] = []
    total = 0
    while src.peek(len(prefix)) == prefix:
        line = src.peek_line(MAX_HEADER_LINE)
        if not line.endswith(b"\n") and len(line) >= MAX_HEADER_LINE:
            raise EventFormatError(f"header line longer than {MAX_HEADER_LINE} bytes", path=path, offset=src.pos)
        if not is_text_line(line):
            break
        if not line.endswith(b"\n") and len(src.peek(len(line) + 1)) == len(line):
            shown = line.decode("utf-8", "replace")[:60]
            raise EventFormatError(f"file ends inside the text header (last line {shown!r} has no end of line; "
                                   "truncated file?)", path=path, offset=src.pos)
        total += len(line)
        if total > max_bytes:
            raise EventFormatError(f"text header longer than {max_bytes} bytes", path=path, offset=src.pos)
        src.read(len(line))
        text = line.decode("utf-8")[len(prefix):].rstrip("\r\n")
        lines.append(text)
        if stop is not None and stop(text):
            break
    return lines


def check_geometry(width: Any, height: Any, path: str) -> tuple[int | None, int | None]:
    """Validate a sensor geometry (both or neither given, 1..65536 each)."""
    if width is None and height is None:
        return None, None
    if width is None or height is None:
        given, value, missing = ("height", height, "width") if width is None else ("width", width, "height")
        raise EventFormatError(f"the sensor {given} is given ({value}) but not its {missing}", path=path)
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError):
        raise EventFormatError(f"bad sensor size {width!r}x{height!r}", path=path) from None
    if not (0 < w <= MAX_COORD and 0 < h <= MAX_COORD):
        raise EventFormatError(f"sensor size {w}x{h} outside 1..{MAX_COORD}", path=path)
    return w, h


def unwrap_u32(ts: np.ndarray, state: list[int]) -> np.ndarray:
    """Unwrap 32-bit timestamps: a backward jump of more than 2**31 is a wrap-around.

    ``state`` is ``[last_raw, epoch]``, updated in place (start with ``[0, 0]``).
    """
    ts64 = ts.astype(np.int64)
    if len(ts64) == 0:
        return ts64
    d = np.diff(ts64, prepend=state[0])
    wraps = np.cumsum(d < -(1 << 31)) + state[1]
    state[0], state[1] = int(ts64[-1]), int(wraps[-1])
    return ts64 + (wraps << 32)


def ffill(pos: np.ndarray, values: np.ndarray, query: np.ndarray, initial: int) -> np.ndarray:
    """For each query position, the value of the last ``pos`` before it (``initial`` if none).

    ``pos`` is sorted ascending, ``values`` aligned with it.
    """
    k = np.searchsorted(pos, query, side="right") - 1
    if len(values) == 0:
        return np.full(len(query), initial, dtype=np.int64)
    out = values.astype(np.int64)[np.maximum(k, 0)]
    out[k < 0] = initial
    return out


def make_events(t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    ev = np.empty(len(t), dtype=EVENT_DTYPE)
    ev["t"] = t
    ev["x"] = x
    ev["y"] = y
    ev["p"] = p
    return ev


class EventReader:
    """Base class: an iterator of event arrays read from one file.

    Subclasses implement :meth:`_read_header` (returns a :class:`RecordingInfo`, called by the
    constructor) and :meth:`_decode` (yields ``(events, offset_of)`` with ``offset_of(i)`` the byte
    offset of event ``i``'s record, for error messages). The base class checks coordinates against
    the sensor size and timestamp order, applies ``errors`` and keeps :attr:`stats`.

    Parameters common to all readers: ``chunk_size`` (bytes read at a time), ``errors`` (``"raise"``
    or ``"skip"``), ``sensor_size`` (``(width, height)`` overriding or supplying the geometry) and
    ``monotonic`` (check that timestamps never go backwards).
    """

    format_name: ClassVar[str] = "?"

    def __init__(self, source: Source, *, chunk_size: int = DEFAULT_CHUNK_SIZE, errors: ErrorMode = "raise",
                 sensor_size: tuple[int, int] | None = None, monotonic: bool = True) -> None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        self.chunk_size = int(chunk_size)
        self.errors: ErrorMode = errors
        self.monotonic = monotonic
        self.stats = ReaderStats()
        self._src = ByteSource(source)
        self.path = self._src.name
        self._last_t: int | None = None
        self.truncation: str | None = None  # errors="skip": why the file's end was not read
        self._gen: Iterator[tuple[np.ndarray, OffsetOf]] | None = None
        try:
            info = self._read_header()
            if sensor_size is not None:
                w, h = check_geometry(sensor_size[0], sensor_size[1], self.path)
                info = replace(info, width=w, height=h)
        except BaseException:
            self._src.close()
            raise
        self.info: RecordingInfo = info

    # -- subclass hooks -------------------------------------------------------------------------
    def _read_header(self) -> RecordingInfo:
        return RecordingInfo(self.format_name, data_offset=self._src.pos)

    def _decode(self) -> Iterator[tuple[np.ndarray, OffsetOf]]:
        raise NotImplementedError

    # -- helpers for subclasses -----------------------------------------------------------------
    def error(self, problem: str, offset: int | None = None) -> EventFormatError:
        return EventFormatError(problem, path=self.path, offset=offset)

    def reject(self, bad: np.ndarray, counter: str, describe: Callable[[int], str], offset_of: OffsetOf,
               weight: np.ndarray | None = None) -> np.ndarray | None:
        """Raise for (errors="raise") or count (errors="skip") the flagged items; returns the mask of
        items to keep, or ``None`` when nothing is flagged. ``weight`` counts events per item."""
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        if self.errors == "raise":
            raise self.error(describe(i), offset_of(i))
        n = int(bad.sum()) if weight is None else int(weight[bad].sum())
        setattr(self.stats, counter, getattr(self.stats, counter) + n)
        return ~bad

    def records(self, size: int) -> Iterator[tuple[memoryview, int]]:
        """Whole ``size``-byte records, about ``chunk_size`` bytes at a time, with the offset of the
        first; a trailing partial record raises or is counted as truncated."""
        carry = b""
        while True:
            data = self._src.read(self.chunk_size)
            if not data:
                break
            buf = carry + data if carry else data
            n = len(buf) - len(buf) % size
            if n:
                yield memoryview(buf)[:n], self._src.pos - len(buf)
            carry = buf[n:]
        if carry:
            self.truncated(len(carry), self._src.pos - len(carry), f"{size}-byte record")

    def truncated(self, nbytes: int, offset: int, what: str, detail: str | None = None) -> None:
        """The file ends inside a record: raise, or count and remember it (see the module docstring)."""
        left = detail or f"{nbytes} byte{'s' if nbytes != 1 else ''} left over"
        err = self.error(f"file ends inside a {what} ({left}; truncated file?)", offset)
        if self.errors == "raise":
            raise err
        self.stats.truncated_bytes += nbytes
        self.truncation = str(err)

    # -- iteration ------------------------------------------------------------------------------
    def _check(self, ev: np.ndarray, offset_of: OffsetOf) -> np.ndarray:
        w, h = self.info.width, self.info.height
        if len(ev) and w is not None and h is not None:
            x, y = ev["x"], ev["y"]
            keep = self.reject((x >= w) | (y >= h), "out_of_bounds",
                               lambda i: f"event x={x[i]}, y={y[i]} outside the {w}x{h} sensor", offset_of)
            if keep is not None:
                idx = np.flatnonzero(keep)
                ev = ev[keep]
                offset_of = (lambda of, ix: (lambda i: of(int(ix[i]))))(offset_of, idx)
        if len(ev) and self.monotonic:
            t = ev["t"]
            start = self._last_t if self._last_t is not None else int(t[0])
            before = np.maximum.accumulate(np.concatenate(([start], t[:-1])))
            keep = self.reject(t < before, "backwards",
                               lambda i: f"timestamp {t[i]} us goes backwards (after {before[i]} us)", offset_of)
            if keep is not None:
                ev = ev[keep]
            if len(ev):
                self._last_t = max(start, int(ev["t"].max()))
        return ev

    def __iter__(self) -> "EventReader":
        return self

    def __next__(self) -> np.ndarray:
        if self._gen is None:
            self._gen = self._decode()
        for ev, offset_of in self._gen:
            self.stats.bytes_read = self._src.pos
            ev = self._check(ev, offset_of)
            if len(ev):
                self.stats.events += len(ev)
                self.stats.chunks += 1
                return ev
        self.stats.bytes_read = self._src.pos
        self.close()
        raise StopIteration

    def read_all(self) -> np.ndarray:
        """All remaining events as one array."""
        parts = list(self)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=EVENT_DTYPE)

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> "EventReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, sensor_size={self.info.sensor_size})"
