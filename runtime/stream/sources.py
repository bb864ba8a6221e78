"""Event sources: iterables of :data:`~stoprt.runtime.events.EVENT_DTYPE` packets.

Every source yields non-empty 1-D event arrays ("packets") in time order, has ``close()`` (safe to
call from another thread and more than once), works as a context manager, and exposes
``sensor_size`` (``(W, H)`` or ``None`` when unknown), ``live`` (True when the data arrives in real
time and cannot wait for a slow consumer) and ``stats`` (a dict of counters, read at any time).

:class:`FileSource` replays a recording through the streaming readers of
:mod:`stoprt.runtime.formats`; live sources are in :mod:`.udp` and :mod:`.cameras`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator

import numpy as np

from ..events import EVENT_DTYPE
from ..formats import DEFAULT_CHUNK_SIZE, DEFAULT_SENSOR_SIZES, EventReader, open_events


class EventSource:
    """Base class of the sources (see the module docstring). Subclasses implement :meth:`_packets`."""

    live: bool = False

    def __init__(self) -> None:
        self.sensor_size: tuple[int, int] | None = None
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def stats(self) -> dict[str, Any]:
        return {}

    def _packets(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.closed:
            raise ValueError(f"{type(self).__name__} is closed")
        try:
            for packet in self._packets():
                if self.closed:
                    return
                yield packet
        except Exception:
            if self.closed:  # closed from another thread mid-read: the error is the interruption
                return
            raise

    def close(self) -> None:
        self._closed.set()

    def __enter__(self) -> "EventSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileSource(EventSource):
    """Replay an event file as packets, in bounded memory (one reader chunk plus one packet).

    Args:
        path: any file :func:`stoprt.runtime.formats.open_events` reads (format from the extension and
            header, or ``format=``).
        packet_us: cut packets on a time grid of this many microseconds from the first event (the
            default, 1000 us, when ``packet_events`` is not given). Windows without events yield no
            packet: the binner turns the gap into empty steps.
        packet_events: cut packets of exactly this many events instead (the last one may be shorter).
        realtime: pace packets by their timestamps: a packet is yielded when the wall clock since the
            first packet reaches the end of its window (``packet_us``) or its last event (``packet_events``),
            divided by ``speed``. Makes the source ``live``.
        speed: replay speed factor for ``realtime`` (2.0 = twice as fast as recorded).
        loop: start over at the end of the file; timestamps keep increasing (each pass is shifted
            by the duration of the previous ones), so downstream time never goes backwards.
        sensor_size: ``(W, H)`` overriding or supplying the file's geometry (default: the header's, or
            the format's own, e.g. 34x34 for N-MNIST ``.bin``); events outside it are counted and
            skipped by the reader.
        errors: the reader's error mode; ``"skip"`` (default) counts per-event problems in
            ``stats["reader"]`` and drops those events, ``"raise"`` stops the stream at the first.
        format, chunk_size: passed to :func:`~stoprt.runtime.formats.open_events`.
        start_us: seek: events before this stream time are read but dropped here, before any packet
            is cut (a resumed session starts where its checkpoint is without binning the past);
            counted in ``stats["seek_skipped_events"]``.

    Raises OSError when the file cannot be opened, :class:`~stoprt.runtime.formats.EventFormatError`
    (a ValueError) when its header is unreadable, both at construction.
    """

    def __init__(self, path: str | os.PathLike, packet_us: int | None = None, packet_events: int | None = None,
                 realtime: bool = False, speed: float = 1.0, loop: bool = False,
                 sensor_size: tuple[int, int] | None = None, errors: str = "skip", format: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, start_us: int | None = None) -> None:
        super().__init__()
        if packet_us is not None and packet_events is not None:
            raise ValueError("give packet_us or packet_events, not both")
        if packet_events is None and packet_us is None:
            packet_us = 1000
        for name, value in (("packet_us", packet_us), ("packet_events", packet_events)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.path = os.fspath(path)
        self.packet_us = None if packet_us is None else int(packet_us)
        self.packet_events = None if packet_events is None else int(packet_events)
        self.realtime, self.speed, self.loop = bool(realtime), float(speed), bool(loop)
        self.live = self.realtime
        self._open_args = {"format": format, "sensor_size": sensor_size, "errors": errors, "chunk_size": chunk_size}
        self._reader: EventReader = self._open()
        implied = DEFAULT_SENSOR_SIZES.get(self._reader.info.format)
        if self._reader.info.sensor_size is None and implied is not None:
            self._reader.close()
            self._open_args["sensor_size"] = implied
            self._reader = self._open()
        self.format = self._reader.info.format
        self.sensor_size = self._reader.info.sensor_size
        self.start_us = start_us
        self._counts = {"packets": 0, "events": 0, "loops": 0, "seek_skipped_events": 0}
        self._skipped_before = 0  # reader-skipped events of earlier passes
        self._started = False

    def _open(self) -> EventReader:
        return open_events(self.path, **self._open_args)

    @property
    def stats(self) -> dict[str, Any]:
        reader = self._reader.stats
        return {**self._counts, "skipped_events": self._skipped_before + reader.skipped_events,
                "reader": reader.as_dict(), "truncation": self._reader.truncation}

    def problems(self, share: float = 0.01) -> list[str]:
        """One line per problem with the data read so far: the file was cut (see
        :attr:`EventReader.truncation`), or more than ``share`` of its events (or EVT words) were dropped."""
        r = self._reader.stats
        out = [self._reader.truncation] if self._reader.truncation else []
        dropped = {"backwards": r.backwards, "outside the sensor": r.out_of_bounds, "corrupt": r.corrupt}
        total = r.skipped_events + r.events
        if r.skipped_events and r.skipped_events > share * total:
            why = ", ".join(f"{n:,} {k}" for k, n in dropped.items() if n)
            hint = (f"is the {self.sensor_size[0]}x{self.sensor_size[1]} sensor size right?"
                    if r.out_of_bounds > r.skipped_events // 2 and self.sensor_size else
                    f"is this really a {self.format} file?")
            out.append(f"{self.path}: {r.skipped_events:,} of {total:,} events dropped "
                       f"({100 * r.skipped_events / total:.1f}%: {why}); {hint}")
        if r.unknown_words and r.unknown_words > share * (r.unknown_words + r.events):
            out.append(f"{self.path}: {r.unknown_words:,} words of unknown type skipped "
                       f"(is this really a {self.format} file?)")
        return out

    def _next_pass(self) -> None:
        self._skipped_before += self._reader.stats.skipped_events
        self._reader = self._open()

    def _events(self) -> Iterator[np.ndarray]:
        """Reader chunks over all passes, shifted so that time keeps increasing across passes."""
        offset = 0
        while True:
            first = last = None
            for chunk in self._reader:
                if first is None:
                    first = int(chunk["t"][0])
                last = int(chunk["t"][-1])
                if offset:
                    chunk["t"] += offset
                if self.start_us is not None and int(chunk["t"][0]) < self.start_us:
                    keep = chunk["t"] >= self.start_us
                    self._counts["seek_skipped_events"] += int(len(chunk) - keep.sum())
                    chunk = chunk[keep]
                    if not len(chunk):
                        continue
                yield chunk
            if not self.loop or first is None or self.closed:
                return  # a file without events cannot be looped: it would spin for ever
            offset += last + 1 - first
            self._counts["loops"] += 1
            self._next_pass()

    def _packets(self) -> Iterator[np.ndarray]:
        if self._started:
            self._next_pass()  # a second iteration replays from the start
        self._started = True
        cut = self._by_count if self.packet_events is not None else self._by_time
        wall0 = t0 = None
        for packet, due in cut(self._events()):
            if self.realtime:
                if wall0 is None:
                    wall0, t0 = time.monotonic(), int(packet["t"][0])
                delay = wall0 + (due - t0) / (1e6 * self.speed) - time.monotonic()
                if delay > 0 and self._closed.wait(delay):
                    return
            self._counts["packets"] += 1
            self._counts["events"] += len(packet)
            yield packet

    def _by_time(self, chunks: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, int]]:
        dt = self.packet_us
        t0 = current = None
        pending: list[np.ndarray] = []
        for chunk in chunks:
            if t0 is None:
                t0 = int(chunk["t"][0])
            k = (chunk["t"] - t0) // dt
            cuts = np.flatnonzero(np.diff(k)) + 1
            for start, stop in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(k)]))):
                kk = int(k[start])
                if current is not None and kk != current and pending:
                    yield _join(pending), t0 + (current + 1) * dt
                    pending = []
                current = kk
                pending.append(chunk[start:stop])
        if pending:
            yield _join(pending), t0 + (current + 1) * dt

    def _by_count(self, chunks: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, int]]:
        n = self.packet_events
        pending: list[np.ndarray] = []
        have = 0
        for chunk in chunks:
            while len(chunk):
                take = min(n - have, len(chunk))
                pending.append(chunk[:take])
                have += take
                chunk = chunk[take:]
                if have == n:
                    packet = _join(pending)
                    yield packet, int(packet["t"][-1])
                    pending, have = [], 0
        if pending:
            packet = _join(pending)
            yield packet, int(packet["t"][-1])

    def close(self) -> None:
        super().close()
        self._reader.close()  # kept for its stats

    def __repr__(self) -> str:
        cut = f"packet_us={self.packet_us}" if self.packet_events is None else f"packet_events={self.packet_events}"
        return f"FileSource({self.path!r}, {cut}, realtime={self.realtime}, loop={self.loop})"


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """One contiguous packet that owns its memory (never a view into a reader's chunk)."""
    return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)


def as_packet(events: Any) -> np.ndarray:
    """``events`` as a 1-D EVENT_DTYPE array; ValueError naming what is wrong otherwise."""
    if not isinstance(events, np.ndarray) or events.dtype != EVENT_DTYPE:
        got = getattr(events, "dtype", type(events).__name__)
        raise ValueError(f"a packet must be a numpy array of EVENT_DTYPE {EVENT_DTYPE}, got {got}")
    if events.ndim != 1:
        raise ValueError(f"a packet must be 1-D, got shape {events.shape}")
    return events
