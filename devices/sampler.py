"""Sample telemetry in a background thread around a run: peaks, means and energy.

::

    with TelemetrySampler(["sysfs", "process"], interval_s=0.05) as sampler:
        run(steps=1000)
    print(sampler.summary(steps=1000).to_dict())

Peaks, means and energy are accumulated as samples arrive, so they cover the whole run even when the
bounded ring buffer of raw samples (``maxlen``) has dropped the oldest ones. A sample is taken at
start and at stop, so even a run shorter than one interval has two points to integrate between.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from . import rootfs
from .backends import POWER_PREFIX, Backend, make_backends

# Rails that measure the whole module's input; when one is present it is the total, else the rails
# are summed (as on AGX Orin, whose monitors see separate supplies but no input rail).
INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN")


@dataclass
class Sample:
    """One tick: seconds since start and the figures read then."""

    t: float
    values: dict[str, float]


@dataclass
class FigureStats:
    """Peak, sample mean and last value of one figure over the run."""

    peak: float
    mean: float
    last: float
    count: int


@dataclass
class TelemetrySummary:
    """What the sampler saw. Energy in J, per rail and in total (see ``total_rail``)."""

    duration_s: float
    samples: int
    figures: dict[str, FigureStats]
    energy_j: dict[str, float]
    total_rail: str | None  # an input rail's name, "sum" of all rails, or None without rails
    total_energy_j: float | None
    steps: int | None = None
    energy_per_step_j: float | None = None
    final: dict[str, float] = field(default_factory=dict)  # figures known only at the end
    errors: dict[str, int] = field(default_factory=dict)  # failed reads per backend

    def to_dict(self) -> dict:
        """Plain JSON-ready data."""
        return asdict(self)


class _Running:
    """Running statistics of one figure."""

    __slots__ = ("peak", "total", "last", "count")

    def __init__(self, value: float):
        self.peak = self.total = self.last = value
        self.count = 1

    def add(self, value: float) -> None:
        self.peak = max(self.peak, value)
        self.total += value
        self.last = value
        self.count += 1


class TelemetrySampler:
    """Samples backends every ``interval_s`` seconds in a daemon thread.

    One sampler measures one run. ``backends`` are names for :func:`stoprt.devices.backends.make_backends` or instances; when two
    backends give the same figure in one tick, the later one wins. ``clock`` is injectable for tests.
    """

    def __init__(self, backends: Sequence[str | Backend] | str = ("sysfs", "process"),
                 interval_s: float = 0.1, root: rootfs.PathLike = "/", maxlen: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.backends = make_backends(backends, root, interval_s)
        self._clock = clock
        self._buffer: deque[Sample] = deque(maxlen=maxlen)
        self._stats: dict[str, _Running] = {}
        self._energy_mj: dict[str, float] = {}
        self._last_power: dict[str, tuple[float, float]] = {}
        self._errors: dict[str, int] = {}
        self._ticks = 0
        self._final: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = self._t_end = 0.0

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> TelemetrySampler:
        """Start the backends, take the first sample and start the thread."""
        if self._thread is not None or self._ticks:
            raise RuntimeError("a sampler measures one run: create a new one")
        started: list[Backend] = []
        try:
            for backend in self.backends:
                backend.start()
                started.append(backend)
        except Exception:
            for backend in started:  # do not leave a subprocess or client running behind us
                backend.stop()
            raise
        self._t0 = self._clock()
        self._stop.clear()
        self._take()
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> TelemetrySummary:
        """Stop the thread, take the last sample, stop the backends; returns the summary."""
        if self._thread is None:
            return self.summary()
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._take()
        for backend in self.backends:
            try:
                final = backend.stop()
                with self._lock:
                    self._final.update(final)
            except Exception:  # one backend failing to close must not hide the others' results
                self._count_error(backend)
        return self.summary()

    def _run(self) -> None:
        # Deadline-based, so the period does not stretch by the time each sample takes; ticks
        # missed while a slow sample ran are skipped rather than taken in a burst.
        deadline = self._clock()
        while True:
            deadline += self.interval_s
            now = self._clock()
            if deadline < now:
                deadline = now + self.interval_s
            if self._stop.wait(deadline - now):
                return
            self._take()

    def _take(self) -> None:
        values: dict[str, float] = {}
        for backend in self.backends:
            try:
                values.update(backend.sample())
            except Exception:  # telemetry is best effort: count the failure, keep sampling
                self._count_error(backend)
        t = self._clock() - self._t0
        with self._lock:
            self._record(t, values)

    def _count_error(self, backend: Backend) -> None:
        with self._lock:
            self._errors[backend.name] = self._errors.get(backend.name, 0) + 1

    def _record(self, t: float, values: dict[str, float]) -> None:
        self._t_end = t
        self._ticks += 1
        self._buffer.append(Sample(t, values))
        for key, value in values.items():
            running = self._stats.get(key)
            if running is None:
                self._stats[key] = _Running(value)
            else:
                running.add(value)
            if key.startswith(POWER_PREFIX):
                rail = key[len(POWER_PREFIX):]
                # Trapezoid between this and the rail's previous reading (skipped ticks included).
                if rail in self._last_power:
                    t_prev, p_prev = self._last_power[rail]
                    self._energy_mj[rail] = (self._energy_mj.get(rail, 0.0)
                                             + (p_prev + value) / 2 * (t - t_prev))
                else:
                    self._energy_mj.setdefault(rail, 0.0)
                self._last_power[rail] = (t, value)

    @property
    def samples(self) -> list[Sample]:
        """The retained raw samples (the newest ``maxlen``)."""
        with self._lock:
            return list(self._buffer)

    def summary(self, steps: int | None = None) -> TelemetrySummary:
        """Peak/mean per figure and energy so far; per time step when ``steps`` is given."""
        with self._lock:
            figures = {k: FigureStats(r.peak, r.total / r.count, r.last, r.count)
                       for k, r in self._stats.items()}
            energy = {rail: mj / 1000.0 for rail, mj in self._energy_mj.items()}
            n_samples = self._ticks
            duration = self._t_end
            final, errors = dict(self._final), dict(self._errors)
        total_rail = next((r for r in INPUT_RAILS if r in energy), "sum" if energy else None)
        if total_rail == "sum":
            total = sum(energy.values())
        else:
            total = energy.get(total_rail) if total_rail else None
        per_step = total / steps if total is not None and steps else None
        return TelemetrySummary(duration_s=duration, samples=n_samples, figures=figures,
                                energy_j=energy, total_rail=total_rail, total_energy_j=total,
                                steps=steps, energy_per_step_j=per_step, final=final, errors=errors)
