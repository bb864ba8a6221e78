"""A built-in labelled event stream: emulated recordings played one after another.

``BuiltinStream("digits")`` plays emulated DVS digits (or ``"gestures"``) back to back with a short
gap and fills the matching :class:`~stoprt.runtime.stream.labels.LabelTrack` as it goes (each label is
added just before its recording's first packet, as a labelling process beside a camera would): a
self-contained stand-in for a labelled camera stream (no download, deterministic with a seed). With
``loop=True`` it plays forever, in bounded memory.

Nothing is rendered while streaming, so the source never starves the model: the recordings are
emulated once and kept in the cache folder (``$STOPRT_CACHE_DIR``, default ``~/.cache/stoprt``) as
one ``.npz`` per configuration, laid end to end on the stream's time line and cut into packets when
the source is made. The stream is not live, so by default a packet holds :data:`RECORDINGS_PER_PACKET`
whole recordings: the binner then cuts all of their steps in one call (a 1 ms packet costs the binner
about as much as a whole recording, and each call, with the switch between it and the model, holds
the model up: on the demo network, binning a packet per recording cost about 22 us per step of a
300 us step, eight recordings a packet about 7 us).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..cache import CACHE_VERSION, cache_dir, load_npz, save_npz
from ..events import EVENT_DTYPE
from .labels import LabelTrack
from .sources import EventSource

DURATION_US = {"digits": 300_000, "gestures": 200_000}
RECORDINGS_PER_PACKET = 8  # with packet_us=None (see the module docstring); labels still come first


def recordings(name: str, n_samples: int, sensor_size: tuple[int, int], duration_us: int, seed: int,
               cache: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(events, bounds [n + 1], labels [n])`` of a built-in generator, from the cache when there:
    recording k is ``events[bounds[k]:bounds[k + 1]]`` (one array: the stream lays them end to end)."""
    w, h = sensor_size
    path = cache_dir() / f"stream-{name}-v{CACHE_VERSION}-n{n_samples}-{w}x{h}-d{duration_us}-seed{seed}.npz"
    stored = load_npz(path) if cache else None
    if stored is not None and {"events", "bounds", "labels"} <= stored.keys():
        events, bounds, labels = stored["events"], stored["bounds"], stored["labels"]
        if events.dtype == EVENT_DTYPE and len(bounds) == len(labels) + 1:
            return events, bounds, labels
    try:
        from .. import datasets  # rendering takes torch; a cached stream plays without it
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "torch":
            raise
        raise ImportError(f"builtin:{name} renders its recordings with torch the first time (pip install "
                          f"stoprt[torch]); they are then cached in {cache_dir()} and play without it") from err
    generate = datasets.emulated_digits if name == "digits" else datasets.synthetic_gestures
    parts, labels = generate(n_samples=n_samples, sensor_size=sensor_size, duration_us=duration_us, seed=seed)
    events = np.concatenate(parts) if parts else np.zeros(0, EVENT_DTYPE)
    bounds = np.cumsum([0] + [len(e) for e in parts])
    labels = np.asarray(labels, dtype=np.int64)
    if cache:
        save_npz(path, events=events, bounds=bounds, labels=labels)
    return events, bounds, labels


class BuiltinStream(EventSource):
    """Recordings of a built-in source, played back to back.

    Args:
        name: ``"digits"`` or ``"gestures"``.
        n_samples: how many recordings (the first n the generator makes; both cycle their classes).
        gap_us: silence between recordings (unlabelled).
        packet_us: cut each recording into packets of this many microseconds (a camera's packets);
            ``None``: :data:`RECORDINGS_PER_PACKET` whole recordings per packet (the fastest; the
            steps are the same).
        sensor_size: ``(W, H)`` of the emulated sensor.
        loop: start over after the last recording (time keeps increasing) until closed.
        cache: keep the rendered recordings in the cache folder (see the module docstring).
        start_us: seek: recordings that end before this stream time are not played (nor labelled),
            events before it are dropped (a resumed session starts where its checkpoint is).
    """

    in_memory = True  # its packets are views of arrays made up front: a pipeline needs no thread

    def __init__(self, name: str = "digits", n_samples: int = 200, gap_us: int = 20_000,
                 packet_us: int | None = None, sensor_size: tuple[int, int] = (32, 32), seed: int = 0,
                 loop: bool = False, cache: bool = True, start_us: int = 0) -> None:
        super().__init__()
        if name not in DURATION_US:
            raise ValueError(f"unknown built-in stream {name!r}; choose from {sorted(DURATION_US)}")
        if n_samples < 1 or (packet_us is not None and packet_us < 1) or gap_us < 0:
            raise ValueError("need n_samples >= 1, packet_us >= 1 (or None) and gap_us >= 0")
        duration = DURATION_US[name]
        self._events, starts, labels = recordings(name, n_samples, sensor_size, duration, seed, cache)
        self.labels = LabelTrack()
        self.num_classes = 10 if name == "digits" else 8
        self.sensor_size = sensor_size
        self._classes = [int(c) for c in labels]
        self._duration, self._period = duration, duration + gap_us
        self.loop, self.start_us = loop, int(start_us)
        self._count = 0
        # One pass on the stream's time line: recording k starts at k * period (in place: the array is
        # this source's own). ``_packets_of[k]`` holds the packet boundaries (indices into ``_events``)
        # of recording k.
        self._events["t"] += np.repeat(np.arange(len(labels), dtype=np.int64) * self._period, np.diff(starts))
        self._whole = packet_us is None
        self._packets_of = [self._cut(lo, hi, k, packet_us) for k, (lo, hi) in enumerate(zip(starts[:-1], starts[1:]))]
        self._events.flags.writeable = False  # packets are views of it, shared by every lap

    def _cut(self, lo: int, hi: int, k: int, packet_us: int | None) -> np.ndarray:
        """Packet boundaries ``[lo, ..., hi]`` of recording k (empty windows dropped)."""
        if hi == lo or packet_us is None:
            return np.array([lo, hi])
        start = k * self._period
        t = self._events["t"][lo:hi]
        grid = np.arange(start, int(t[-1]) + packet_us + 1, packet_us)
        edges = np.unique(lo + np.searchsorted(t, grid))
        return np.concatenate(([lo], edges[(edges > lo) & (edges < hi)], [hi]))

    def _packet(self, events: np.ndarray, lo: int, hi: int) -> Iterator[np.ndarray]:
        if hi > lo:
            self._count += int(hi - lo)
            yield events[lo:hi]

    @property
    def stats(self) -> dict:
        return {"events": self._count, "recordings": len(self._classes)}

    def _packets(self) -> Iterator[np.ndarray]:
        n, events = len(self._classes), self._events
        laps = 0
        while True:
            if laps:  # the next lap: the same recordings, later on the time line (one copy per lap)
                events = self._events.copy()
                events["t"] += laps * n * self._period
            held, held_lo, held_hi = 0, 0, 0  # whole recordings gathered into the next packet (packet_us=None)
            for k, (label, edges) in enumerate(zip(self._classes, self._packets_of)):
                start = (laps * n + k) * self._period
                if start + self._duration <= self.start_us:
                    continue
                self.labels.add(start, start + self._duration, label)  # before any of its events
                if start < self.start_us:  # the recording the seek lands in: drop its earlier events
                    first = edges[0] + int(np.searchsorted(events["t"][edges[0]:edges[-1]], self.start_us))
                    edges = np.concatenate(([first], edges[edges > first]))
                if self._whole:  # one range per recording, each starting where the previous ended
                    held, held_lo, held_hi = held + 1, held_lo if held else int(edges[0]), int(edges[-1])
                    if held == RECORDINGS_PER_PACKET:
                        yield from self._packet(events, held_lo, held_hi)
                        held = 0
                    continue
                for lo, hi in zip(edges[:-1], edges[1:]):
                    yield from self._packet(events, lo, hi)
            if held:
                yield from self._packet(events, held_lo, held_hi)
            laps += 1
            if not self.loop:
                return
