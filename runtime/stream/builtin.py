"""A built-in labelled event stream: emulated recordings played one after another.

``BuiltinStream("digits")`` plays emulated DVS digits (or ``"gestures"``) back to back with a short
gap, as packets on a time grid, and fills the matching :class:`~stoprt.runtime.session.LabelTrack`
as it goes (each label is added just before its recording's first packet, as a labelling process
beside a camera would): a self-contained stand-in for a labelled camera stream (no download,
deterministic with a seed). With ``loop=True`` it plays forever, in bounded memory.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..datasets import emulated_digits, synthetic_gestures
from ..session import LabelTrack
from .sources import EventSource

DURATION_US = {"digits": 300_000, "gestures": 200_000}


class BuiltinStream(EventSource):
    """Recordings of a built-in source, played back to back.

    Args:
        name: ``"digits"`` or ``"gestures"``.
        n_samples: how many recordings (the first n the generator makes; both cycle their classes).
        gap_us: silence between recordings (unlabelled).
        packet_us: packet length.
        sensor_size: ``(W, H)`` of the emulated sensor.
        loop: start over after the last recording (time keeps increasing) until closed.
        start_us: seek: recordings that end before this stream time are not played (nor labelled),
            events before it are dropped (a resumed session starts where its checkpoint is).
    """

    def __init__(self, name: str = "digits", n_samples: int = 200, gap_us: int = 20_000,
                 packet_us: int = 1000, sensor_size: tuple[int, int] = (32, 32), seed: int = 0,
                 loop: bool = False, start_us: int = 0) -> None:
        super().__init__()
        if name not in DURATION_US:
            raise ValueError(f"unknown built-in stream {name!r}; choose from {sorted(DURATION_US)}")
        if n_samples < 1 or packet_us < 1 or gap_us < 0:
            raise ValueError("need n_samples >= 1, packet_us >= 1 and gap_us >= 0")
        generate = emulated_digits if name == "digits" else synthetic_gestures
        duration = DURATION_US[name]
        recordings, labels = generate(n_samples=n_samples, sensor_size=sensor_size, duration_us=duration, seed=seed)
        self.labels = LabelTrack()
        self.num_classes = 10 if name == "digits" else 8
        self.sensor_size = sensor_size
        self._recordings, self._classes = recordings, [int(c) for c in labels]
        self._duration, self._period, self._packet_us = duration, duration + gap_us, packet_us
        self.loop, self.start_us = loop, int(start_us)
        self._count = 0

    @property
    def stats(self) -> dict:
        return {"events": self._count, "recordings": len(self._recordings)}

    def _packets(self) -> Iterator[np.ndarray]:
        k = 0
        while True:
            for events, label in zip(self._recordings, self._classes):
                start = k * self._period
                k += 1
                if start + self._duration <= self.start_us:
                    continue
                self.labels.add(start, start + self._duration, label)
                if not len(events):
                    continue
                events = events.copy()
                events["t"] += start
                events = events[events["t"] >= self.start_us]
                if not len(events):
                    continue
                grid = np.arange(start, int(events["t"][-1]) + self._packet_us + 1, self._packet_us)
                edges = np.searchsorted(events["t"], grid)
                for lo, hi in zip(edges[:-1], edges[1:]):
                    if hi > lo:
                        self._count += int(hi - lo)
                        yield events[lo:hi]
            if not self.loop:
                return
