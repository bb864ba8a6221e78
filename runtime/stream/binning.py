"""Incremental binning of an event stream into network input frames, one time step at a time.

:class:`Binner` takes packets as they arrive (``push``) and returns the time steps they complete; it
holds at most one step (the current, partial one), never the stream. Per packet, in this order:

1. checks: events outside the sensor, with a polarity above 1, or with a timestamp before the latest
   one seen (timestamps going backwards) are dropped and counted in ``stats`` (``out_of_bounds``,
   ``bad_polarity``, ``backwards``); the stream goes on;
2. hot pixels (optional, :class:`~.filters.HotPixels`): a fixed mask, or ``"auto"``: per window of
   ``hot_window_us``, a pixel with more than ``hot_factor`` times the median count of the active
   pixels (and at least ``hot_min_events``) is masked during the next window;
3. background-activity filter (optional, ``denoise_us``; :class:`~.filters.ActivityFilter`): an event
   is kept only if one of its 8 neighbours fired within ``denoise_us`` before it;
4. region of interest (optional ``roi=(x0, y0, w, h)``) and spatial downsampling to ``out_size``: each
   event adds 1 to the output cell that contains it (integer scaling, as
   :func:`~stoprt.runtime.events.events_to_frames`; counts are preserved);
5. binning: ``mode="time"`` cuts steps of ``dt_us`` on a grid from the first event (or ``t_start``);
   a window without events is an empty step, so a gap in the stream yields its empty steps (at most
   ``max_gap_steps`` per gap: longer gaps skip ahead on the grid and count ``gap_steps_skipped``).
   ``mode="count"`` cuts a step every ``events_per_step`` kept events.

A recording held whole in memory and cut into T equal bins is
:func:`~stoprt.runtime.events.events_to_frames`'s job (datasets); this one never holds the stream.

Timestamps filtered out by steps 2-4 still advance time. Empty steps share one zero element (an
expanded, read-only view: ``.clone()`` before writing into it).

Frames are torch tensors, or float32 numpy arrays with ``frames="numpy"``: the ONNX Runtime learner
takes those, and then torch is never imported (the edge install has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..events import _pair
from .filters import ActivityFilter, HotPixels
from .sources import as_packet

_BLOCK_CELLS = 1 << 21  # counts of at most this many cells at once when a packet spans many steps


def _tensor_rows(block: Any) -> tuple[Any, Any]:
    """Frames ``[C, H, W]`` and batches ``[1, C, H, W]`` of a block ``[steps, C, H, W]`` (a float32
    array or a tensor): views of its rows, each kind made in one call."""
    import torch

    rows = torch.from_numpy(block) if isinstance(block, np.ndarray) else block
    return rows.unbind(0), rows.unsqueeze(1).unbind(0)


def host_to_device(t: Any, device: Any, dtype: Any) -> Any:
    """A copy of ``t`` (a CPU tensor) as ``dtype`` on ``device``. To a GPU through pinned memory and
    without waiting: a copy from pageable memory first waits for the GPU to finish its queued work, so
    a frame copied per step held the stream loop to the GPU's pace one step at a time."""
    if device.type == "cuda":
        return t.pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)


@dataclass(slots=True)
class Step:
    """One time step of input: ``frame`` ``[C, H', W']`` (C = 2: channel 0 OFF, 1 ON; C = 1 for
    ``polarity="sum"``), covering ``[t_start, t_end)`` microseconds, built from ``n_events`` events;
    ``index`` counts the steps of the stream from 0. ``batch`` is ``frame[None]`` (``[1, C, H', W']``,
    the same memory): what a network takes, made by the binner with a whole block of frames at once
    (a view made per step on the model's thread cost it several microseconds)."""

    frame: Any  # torch.Tensor, or np.ndarray (frames="numpy")
    t_start: int
    t_end: int
    n_events: int
    index: int
    batch: Any = None


class Binner:
    """Bin packets into steps (see the module docstring).

    Args:
        sensor_size: ``(W, H)`` of the sensor.
        out_size: ``(W', H')`` or one int (square); default the ROI (or sensor) size.
        mode: ``"time"`` (steps of ``dt_us``) or ``"count"`` (steps of ``events_per_step`` events).
        polarity: ``"split"`` (2 channels) or ``"sum"`` (1 channel).
        denoise_us: background-activity filter window, or ``None`` for no filter.
        hot_pixels: ``None``, a boolean mask ``[H, W]`` (True = drop), or ``"auto"``.
        roi: ``(x0, y0, w, h)`` inside the sensor, or ``None``.
        t_start: origin of the time grid (default: the first event); earlier events count as backwards.
        dtype, device: of the frames (torch).
        frames: ``"torch"`` (tensors) or ``"numpy"`` (float32 arrays; ``dtype``/``device`` do not apply).
    """

    def __init__(self, sensor_size: tuple[int, int], out_size: int | tuple[int, int] | None = None,
                 mode: str = "time", dt_us: int = 1000, events_per_step: int = 1000, polarity: str = "split",
                 denoise_us: int | None = None, hot_pixels: Any = None, roi: tuple[int, int, int, int] | None = None,
                 dtype: Any = None, device: Any = "cpu", t_start: int | None = None,
                 hot_window_us: int = 1_000_000, hot_factor: float = 20.0, hot_min_events: int = 20,
                 max_gap_steps: int = 100_000, frames: str = "torch") -> None:
        if sensor_size is None:
            raise ValueError("the sensor size is unknown (the source does not state it): pass sensor_size=(W, H)")
        self.sensor_size = _pair(sensor_size, "sensor_size")
        if mode not in ("time", "count"):
            raise ValueError(f"mode must be 'time' or 'count', got {mode!r}")
        if polarity not in ("split", "sum"):
            raise ValueError(f"polarity must be 'split' or 'sum', got {polarity!r}")
        for name, value in (("dt_us", dt_us), ("events_per_step", events_per_step), ("hot_window_us", hot_window_us),
                            ("max_gap_steps", max_gap_steps)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        w, h = self.sensor_size
        self.roi = (0, 0, w, h) if roi is None else self._check_roi(roi)
        self.out_size = _pair(out_size, "out_size") if out_size is not None else self.roi[2:]
        self.mode, self.polarity = mode, polarity
        self.dt_us, self.events_per_step, self.max_gap_steps = int(dt_us), int(events_per_step), int(max_gap_steps)
        self._hot = None if hot_pixels is None else HotPixels(self.sensor_size, hot_pixels, int(hot_window_us),
                                                               hot_factor, hot_min_events)
        self._activity = None if denoise_us is None else ActivityFilter(self.sensor_size, denoise_us)
        if frames not in ("torch", "numpy"):
            raise ValueError(f"frames must be 'torch' or 'numpy', got {frames!r}")
        self.frames = frames
        if frames == "torch":
            import torch  # only for tensor frames
            self.dtype, self.device = dtype or torch.float32, torch.device(device)
            self._to_frame = lambda a: host_to_device(torch.from_numpy(a), self.device, self.dtype)
            # A whole block of steps becomes frames (and batches) in one call each (a conversion per
            # step held the model up): float32 on the CPU, views of the counts (no copy); else one
            # converted copy of the block.
            self._frames_are_views = self.device.type == "cpu" and self.dtype == torch.float32
            self._rows_as_frames = _tensor_rows if self._frames_are_views else (
                lambda a: _tensor_rows(self._to_frame(a)))
        else:
            self.dtype, self.device = np.float32, None
            self._to_frame = lambda a: a  # the float32 accumulator itself
            self._frames_are_views = True
            self._rows_as_frames = lambda a: (list(a), list(a[:, None]))
        self.t_start = None if t_start is None else int(t_start)
        self._cell_of = self._cell_table()
        self._roi_cropped = self.roi != (0, 0, w, h)
        self._channel_cells = self.out_size[0] * self.out_size[1]
        channels = 2 if polarity == "split" else 1
        self.frame_shape = (channels, self.out_size[1], self.out_size[0])
        self._zero = (np.zeros(1, np.float32) if frames == "numpy" else
                      torch.zeros(1, dtype=self.dtype, device=self.device))
        self._counts = dict.fromkeys(("events_in", "events_binned", "out_of_bounds", "bad_polarity", "backwards",
                                      "hot_dropped", "denoised", "roi_dropped", "steps", "empty_steps",
                                      "gap_steps_skipped"), 0)
        self.reset()

    # -- configuration checks -------------------------------------------------------------------------
    def _check_roi(self, roi: Any) -> tuple[int, int, int, int]:
        x0, y0, w, h = (int(v) for v in roi)
        if x0 < 0 or y0 < 0 or w < 1 or h < 1 or x0 + w > self.sensor_size[0] or y0 + h > self.sensor_size[1]:
            raise ValueError(f"roi {tuple(roi)} (x0, y0, w, h) is not inside the {self.sensor_size[0]}x"
                             f"{self.sensor_size[1]} sensor")
        return x0, y0, w, h

    # -- state ---------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        return {**self._counts, "hot_pixels": 0 if self._hot is None else self._hot.pixels}

    @property
    def buffered_events(self) -> int:
        """Events in the current, partial step."""
        return self._n

    def reset(self) -> None:
        """Forget the stream: drop the partial step, the time grid and the filters' history. The
        counters in ``stats`` and the hot-pixel mask (a property of the sensor) are kept."""
        # The open step's counts; ``_blank`` (read-only zeros) until an event arrives, so that an
        # emitted frame never shares memory with the counts that follow it.
        self._blank = np.zeros(int(np.prod(self.frame_shape)), dtype=np.float32)
        self._blank.flags.writeable = False
        self._acc = self._blank
        self._frame = None  # the open step's (frame, batch) when made with its block (views of ``_acc`` or of a copy)
        self._n = 0
        self._k: int | None = 0 if self.t_start is not None else None  # current step on the time grid
        self._t0 = self.t_start
        self._last_t: int | None = self.t_start
        self._count_t0 = self._count_t1 = 0
        self._index = 0
        for f in (self._hot, self._activity):
            if f is not None:
                f.reset()

    # -- public API ----------------------------------------------------------------------------------
    def push(self, packet: np.ndarray) -> list[Step]:
        """Add a packet (1-D EVENT_DTYPE array, time-ordered); returns the steps it completed."""
        ev = as_packet(packet)
        self._counts["events_in"] += len(ev)
        if not len(ev):
            return []
        t, pix, p = self._checked(ev)
        if not len(t):
            return []
        keep = np.ones(len(t), dtype=bool)
        if self._hot is not None:
            self._counts["hot_dropped"] += self._hot.apply(t, pix, keep)
        if self._activity is not None:
            self._counts["denoised"] += self._activity.apply(t, pix, keep)
        flat = self._cells(pix, p, keep)
        return self._bin_time(t, flat, keep) if self.mode == "time" else self._bin_count(t[keep], flat[keep])

    def advance(self, t_us: int) -> list[Step]:
        """Declare that no event before ``t_us`` will come (e.g. a live source was silent): returns the
        time steps that end at or before ``t_us``. Later events before ``t_us`` count as backwards.
        Nothing happens in count mode or before the first event."""
        if self.mode != "time" or self._t0 is None:
            return []
        self._last_t = max(self._last_t, int(t_us)) if self._last_t is not None else int(t_us)
        return self._advance_to((int(t_us) - self._t0) // self.dt_us)

    def flush(self) -> list[Step]:
        """End the stream: returns the partial step (if it holds events, or in time mode if one is
        open) and resets, so that the next push starts a new stream."""
        out = []
        if self.mode == "time" and self._k is not None and self._t0 is not None:
            out.append(self._emit(self._t0 + self._k * self.dt_us, self._t0 + (self._k + 1) * self.dt_us))
        elif self.mode == "count" and self._n:
            out.append(self._emit(self._count_t0, self._count_t1 + 1))
        self.reset()
        return out

    # -- stages --------------------------------------------------------------------------------------
    def _checked(self, ev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Timestamps, pixel indices and polarities of the events that pass the checks."""
        w, h = self.sensor_size
        x, y, p, t = ev["x"], ev["y"], ev["p"], ev["t"]
        floor = self._last_t if self._last_t is not None else int(t[0])
        # the usual packet, nothing to drop or count: checked with reductions (no per-event masks)
        if t[0] >= floor and x.max() < w and y.max() < h and p.max() <= 1 and (t[1:] >= t[:-1]).all():
            self._last_t = int(t[-1])
            return t, y.astype(np.int64) * w + x, p
        inside = (x < w) & (y < h)
        good_p = p <= 1
        ok = inside & good_p
        self._counts["out_of_bounds"] += int((~inside).sum())
        self._counts["bad_polarity"] += int((inside & ~good_p).sum())
        # An event is backwards when it is earlier than any event before it (or the stream so far).
        before = np.maximum.accumulate(np.concatenate(([floor], np.where(ok, t, floor)[:-1])))
        forward = t >= before
        self._counts["backwards"] += int((ok & ~forward).sum())
        ok &= forward
        if not ok.all():
            x, y, p, t = x[ok], y[ok], p[ok], t[ok]
        if len(t):
            self._last_t = int(t[-1])
        return t, y.astype(np.int64) * w + x, p

    def _cells(self, pix: np.ndarray, p: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Flat output-cell index of each event; events outside the ROI are removed from ``keep``."""
        cell = self._cell_of[pix]  # one gather: the ROI crop and the downsampling of every pixel, made once
        if self._roi_cropped:
            inside = cell >= 0
            self._counts["roi_dropped"] += int((keep & ~inside).sum())
            keep &= inside
            cell = np.maximum(cell, 0)
        if self.polarity == "split":
            cell = cell + p.astype(np.int64) * self._channel_cells  # (p is 0 or 1: the checks dropped the others)
        return cell

    def _cell_table(self) -> np.ndarray:
        """Output cell (channel 0) of each sensor pixel, -1 outside the ROI (integer scaling, as
        :func:`~stoprt.runtime.events.events_to_frames`)."""
        w, h = self.sensor_size
        x0, y0, rw, rh = self.roi
        ow, oh = self.out_size
        xr, yr = np.arange(w) - x0, np.arange(h) - y0
        xo = np.where((xr >= 0) & (xr < rw), xr * ow // rw, -1)
        yo = np.where((yr >= 0) & (yr < rh), yr * oh // rh, -1)
        table = yo[:, None] * ow + xo[None, :]
        table[(yo[:, None] < 0) | (xo[None, :] < 0)] = -1
        return table.reshape(-1).astype(np.int64)

    def _accumulate(self, flat: np.ndarray) -> None:
        if self._acc is self._blank:
            self._acc = np.zeros_like(self._blank)
        if len(flat) * 8 < len(self._acc):
            np.add.at(self._acc, flat, 1.0)
        else:
            self._acc += np.bincount(flat, minlength=len(self._acc)).astype(np.float32)
        self._n += len(flat)

    def _bin_time(self, t: np.ndarray, flat: np.ndarray, keep: np.ndarray) -> list[Step]:
        """The steps of a packet, counted in one ``bincount`` per chunk of steps (a recording held in
        memory comes as one packet of many steps: a count and a copy per step would hold the model up).
        Every step an event falls in is opened, kept or not (filtered events still advance time)."""
        if self._t0 is None:
            self._t0 = int(t[0])
        dt, t0 = self.dt_us, self._t0
        k = (t - t0) // dt
        fast_steps = fast_events = 0
        filtered = not keep.all()
        cells = len(self._acc)
        out: list[Step] = []
        chunk = max(1, _BLOCK_CELLS // cells)  # steps counted per bincount (bounded memory)
        # k is sorted: a chunk of steps is a slice of the packet, and its rows are steps from its first.
        i, last_k = 0, int(k[-1])
        while i < len(k):
            lo_k = int(k[i])
            j = len(k) if last_k < lo_k + chunk else int(np.searchsorted(k, lo_k + chunk, side="left"))
            rows = k[i:j] - lo_k
            span = int(rows[-1]) + 1
            visits = np.bincount(rows, minlength=span)  # events per step, kept or not
            steps = np.flatnonzero(visits).tolist()
            index = rows * cells + flat[i:j]
            if filtered:
                rows, index = rows[keep[i:j]], index[keep[i:j]]
                visits = np.bincount(rows, minlength=span)
            block = np.bincount(index, minlength=span * cells).astype(np.float32).reshape(span, cells)
            counts = visits.tolist()
            frames, batches = self._rows_as_frames(block.reshape(span, *self.frame_shape))
            opened = None  # the last row opened as a step of its own: its counts become ``_acc`` below
            for r in steps:
                kr = lo_k + r
                if self._n and self._frame is not None and kr == self._k + 1:
                    # The common case, the next step after one made with its block: the open step is
                    # emitted here as _emit would (a step per row of a recording, next to the model:
                    # two calls and a list less each)
                    frame, batch = self._frame
                    out.append(Step(frame, t0 + self._k * dt, t0 + kr * dt, self._n, self._index, batch))
                    self._index += 1
                    fast_steps += 1
                    fast_events += self._n
                    self._k, self._n = kr, 0
                else:
                    out += self._advance_to(kr)
                if self._n:  # the open step already holds events of an earlier packet
                    self._acc += block[r]  # (in place: a frame made of the row sees it)
                else:  # a row of its own: becomes the frame, no copy
                    self._frame, opened = (frames[r], batches[r]), r
                self._n += counts[r]
            if opened is not None:  # only the step left open needs its counts (a later packet may add
                self._acc = block[opened]  # to them; a copied frame is made from them when emitted)
            i = j
        self._counts["steps"] += fast_steps
        self._counts["events_binned"] += fast_events
        if not self._frames_are_views:  # a copy cannot see events a later packet adds to the open step:
            self._frame = None          # that one is converted when it is emitted
        return out

    def _advance_to(self, k: int) -> list[Step]:
        """Emit the open step and the empty ones before step ``k``, which becomes the open step."""
        if self._k is None:
            self._k = k
            return []
        if k <= self._k:
            return []
        dt, t0 = self.dt_us, self._t0
        out = [self._emit(t0 + self._k * dt, t0 + (self._k + 1) * dt)]
        gap = k - self._k - 1
        if gap:
            shown = min(gap, self.max_gap_steps)
            self._counts["gap_steps_skipped"] += gap - shown
            out += [self._emit(t0 + j * dt, t0 + (j + 1) * dt) for j in range(self._k + 1, self._k + 1 + shown)]
        self._k = k
        return out

    def _bin_count(self, t: np.ndarray, flat: np.ndarray) -> list[Step]:
        out: list[Step] = []
        i = 0
        while i < len(t):
            if self._n == 0:
                self._count_t0 = int(t[i])
            j = min(len(t), i + self.events_per_step - self._n)
            self._accumulate(flat[i:j])
            self._count_t1 = int(t[j - 1])
            if self._n == self.events_per_step:
                out.append(self._emit(self._count_t0, self._count_t1 + 1))
            i = j
        return out

    def _emit(self, t_start: int, t_end: int) -> Step:
        if self._n:
            if self._frame is not None:
                frame, batch = self._frame
            else:
                frame = self._to_frame(self._acc.reshape(self.frame_shape))
                batch = frame[None]
            self._acc, self._frame = self._blank, None  # replaced (not written) by the next events: see _accumulate
        else:
            shape = (1, *self.frame_shape)
            batch = np.broadcast_to(self._zero, shape) if self.frames == "numpy" else self._zero.expand(shape)
            frame = batch[0]
            self._counts["empty_steps"] += 1
        step = Step(frame, t_start, t_end, self._n, self._index, batch)
        self._counts["steps"] += 1
        self._counts["events_binned"] += self._n
        self._index += 1
        self._n = 0
        return step

    def __repr__(self) -> str:
        what = f"dt_us={self.dt_us}" if self.mode == "time" else f"events_per_step={self.events_per_step}"
        return (f"Binner(sensor_size={self.sensor_size}, out_size={self.out_size}, mode={self.mode!r}, {what}, "
                f"polarity={self.polarity!r})")
