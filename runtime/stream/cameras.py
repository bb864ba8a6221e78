"""Live event cameras through optional vendor-neutral drivers, imported only when a source is made.

* :class:`DVProcessingSource`: iniVation cameras (DVXplorer, DAVIS, DVS128) through ``dv-processing``
  (Apache-2.0; ``pip install 'stoprt[dv]'``).
* :class:`NeuromorphicDriversSource`: Prophesee EVK3/EVK4 and iniVation DVXplorer/DAVIS346 over libusb
  through ``neuromorphic-drivers`` (MIT; ``pip install 'stoprt[nd]'``).

Both yield EVENT_DTYPE packets with the camera's own microsecond timestamps (dv-processing: Unix-epoch
microseconds; neuromorphic-drivers: microseconds of the camera clock since it started). A missing
package raises :class:`MissingExtraError` (an ImportError naming the extra to install); no camera,
or one that cannot be opened, raises :class:`CameraError` (an OSError).
"""

from __future__ import annotations

import importlib
import time
from typing import Any, Iterator

import numpy as np

from ..events import EVENT_DTYPE
from .sources import EventSource


class MissingExtraError(ImportError):
    """An optional package needed by a source is not installed."""


class CameraError(OSError):
    """No camera found, or it could not be opened or read."""


def _import(module: str, extra: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"this source needs the optional '{package}' package: "
                                f"pip install 'stoprt[{extra}]' (or pip install {package})") from exc


def _polarity_field(names: tuple[str, ...], what: str) -> str:
    for name in ("p", "on", "polarity"):
        if name in names:
            return name
    raise CameraError(f"{what} gave events without a polarity field (fields: {', '.join(names)})")


def convert_events(batch: np.ndarray, t: str = "t", what: str = "the camera") -> np.ndarray:
    """A driver's structured event array (``t``/``timestamp``, ``x``, ``y``, ``p``/``on``/``polarity``)
    as EVENT_DTYPE (copied: drivers may reuse their buffers)."""
    names = batch.dtype.names or ()
    if t not in names or "x" not in names or "y" not in names:
        raise CameraError(f"{what} gave events with unexpected fields {names}")
    events = np.empty(len(batch), dtype=EVENT_DTYPE)
    events["t"] = batch[t]
    events["x"] = batch["x"]
    events["y"] = batch["y"]
    events["p"] = batch[_polarity_field(names, what)] != 0
    return events


def _size_of(resolution: Any) -> tuple[int, int] | None:
    """``(W, H)`` from a driver's resolution (a pair, or an object with width/height or x/y)."""
    if resolution is None:
        return None
    for w, h in (("width", "height"), ("x", "y")):
        if hasattr(resolution, w) and hasattr(resolution, h):
            return int(getattr(resolution, w)), int(getattr(resolution, h))
    w, h = resolution
    return int(w), int(h)


class DVProcessingSource(EventSource):
    """An iniVation camera through ``dv_processing.io.camera``.

    Args:
        serial: the camera's serial number (default: the first camera found).
        timeout_s: iteration ends after this many seconds without events (``None``: until :meth:`close`
            or until the camera stops running).
        poll_s: sleep between polls when the camera has no new batch.
    """

    live = True

    def __init__(self, serial: str | None = None, timeout_s: float | None = None, poll_s: float = 0.001) -> None:
        super().__init__()
        dv = _import("dv_processing", "dv", "dv-processing")
        try:
            found = list(dv.io.camera.discover())
        except Exception as exc:  # the library reports USB problems with its own exception types
            raise CameraError(f"dv-processing could not list cameras: {exc}") from exc
        if not found:
            raise CameraError("no iniVation camera found by dv-processing (is one connected, and are its udev "
                              "rules installed?)")
        try:
            self._camera = dv.io.camera.open(serial) if serial else dv.io.camera.open()
        except Exception as exc:
            which = f"camera {serial!r}" if serial else "the first camera"
            raise CameraError(f"dv-processing could not open {which}: {exc}") from exc
        if not self._camera.isEventStreamAvailable():
            raise CameraError(f"camera {self._camera.getCameraName()} has no event stream")
        self.name = str(self._camera.getCameraName())
        self.sensor_size = _size_of(self._camera.getEventResolution())
        self.timeout_s, self.poll_s = timeout_s, float(poll_s)
        self._counts = {"packets": 0, "events": 0}

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._counts)

    def _packets(self) -> Iterator[np.ndarray]:
        last = time.monotonic()
        while not self.closed and self._camera.isRunning():
            batch = self._camera.getNextEventBatch()
            if batch is None or batch.size() == 0:
                if self.timeout_s is not None and time.monotonic() - last >= self.timeout_s:
                    return
                self._closed.wait(self.poll_s)
                continue
            last = time.monotonic()
            events = convert_events(batch.numpy(), t="timestamp", what="dv-processing")
            self._counts["packets"] += 1
            self._counts["events"] += len(events)
            yield events

    def close(self) -> None:
        super().close()
        # dv-processing releases the camera when the object is dropped; it has no close().
        self._camera = _Stopped()

    def __repr__(self) -> str:
        return f"DVProcessingSource({getattr(self, 'name', '?')!r}, sensor_size={self.sensor_size})"


class _Stopped:
    """Stands in for a released dv-processing camera."""

    def isRunning(self) -> bool:  # noqa: N802 (dv-processing's method names)
        return False

    def getNextEventBatch(self) -> None:  # noqa: N802
        return None


class NeuromorphicDriversSource(EventSource):
    """A Prophesee or iniVation camera through ``neuromorphic_drivers``.

    Args:
        serial: the camera's serial number (default: the first camera found).
        timeout_s: iteration ends after this many seconds without events (``None``: until :meth:`close`).
        poll_s: the driver's iterator timeout, i.e. how often a waiting read checks for :meth:`close`.
        configuration: a ``neuromorphic_drivers`` configuration object (biases, rate limiter, ...).
    """

    live = True

    def __init__(self, serial: str | None = None, timeout_s: float | None = None, poll_s: float = 0.05,
                 configuration: Any = None) -> None:
        super().__init__()
        nd = _import("neuromorphic_drivers", "nd", "neuromorphic-drivers")
        try:
            found = nd.list_devices()
        except Exception as exc:  # libusb errors (no USB subsystem, permissions) surface as RuntimeError
            raise CameraError(f"no event camera found by neuromorphic-drivers (listing USB devices failed: "
                              f"{exc})") from exc
        if not found:
            raise CameraError("no event camera found by neuromorphic-drivers (is one connected, and are its "
                              "udev rules installed? see neuromorphic_drivers.install_udev_rules)")
        try:
            self._device = nd.open(configuration=configuration, serial=serial, iterator_timeout=poll_s)
        except Exception as exc:
            which = f"camera {serial!r}" if serial else "the first camera"
            raise CameraError(f"neuromorphic-drivers could not open {which}: {exc}") from exc
        self.name = str(getattr(self._device.name(), "value", self._device.name()))
        self.sensor_size = _size_of(self._device.properties())
        self.timeout_s = timeout_s
        self._counts = {"packets": 0, "events": 0, "overflows": 0}

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._counts)

    def _packets(self) -> Iterator[np.ndarray]:
        last = time.monotonic()
        for _status, packet in self._device:
            if self.closed:
                return
            raw = None if packet is None else getattr(packet, "polarity_events", None)
            if raw is None or len(raw) == 0:
                if self.timeout_s is not None and time.monotonic() - last >= self.timeout_s:
                    return
                continue
            last = time.monotonic()
            overflows = getattr(packet, "polarity_events_overflow_indices", None)
            if overflows is not None:
                self._counts["overflows"] += len(overflows)
            events = convert_events(raw, what="neuromorphic-drivers")
            self._counts["packets"] += 1
            self._counts["events"] += len(events)
            yield events

    def close(self) -> None:
        super().close()
        device, self._device = getattr(self, "_device", None), None
        if device is not None:
            device.close()

    def __repr__(self) -> str:
        return f"NeuromorphicDriversSource({getattr(self, 'name', '?')!r}, sensor_size={self.sensor_size})"
