"""The one event representation used across stoprt.

Every reader, live source, emulator and binner produces or consumes a 1-D numpy structured array of
:data:`EVENT_DTYPE`: ``t`` in microseconds (int64), ``x`` and ``y`` pixel coordinates (uint16) and
polarity ``p`` (uint8, 1 = ON / brighter, 0 = OFF / darker).
"""

from __future__ import annotations

import numpy as np

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])


def empty_events(n: int = 0) -> np.ndarray:
    """A zero-filled event array of length ``n``."""
    return np.zeros(n, dtype=EVENT_DTYPE)


def events_from_arrays(t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Pack four equal-length 1-D arrays into an :data:`EVENT_DTYPE` array (no sorting, no checks)."""
    events = empty_events(len(t))
    events["t"], events["x"], events["y"], events["p"] = t, x, y, p
    return events


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``(W, H)`` from an int (square) or a pair, each a positive int; ValueError otherwise."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (W, H) pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_events(events: np.ndarray, sensor_size: tuple[int, int] | None = None) -> None:
    """Raise ValueError unless ``events`` is a 1-D EVENT_DTYPE array with valid polarities and,
    when ``sensor_size=(W, H)`` is given, every coordinate inside the sensor."""
    if not isinstance(events, np.ndarray) or events.dtype != EVENT_DTYPE:
        got = getattr(events, "dtype", type(events).__name__)
        raise ValueError(f"events must be a numpy array of EVENT_DTYPE {EVENT_DTYPE}, got {got}")
    if events.ndim != 1:
        raise ValueError(f"events must be 1-D, got shape {events.shape}")
    if events.size and events["p"].max() > 1:
        raise ValueError(f"polarity must be 0 (OFF) or 1 (ON), got {events['p'].max()}")
    if sensor_size is not None and events.size:
        width, height = _pair(sensor_size, "sensor_size")
        x_max, y_max = int(events["x"].max()), int(events["y"].max())
        if x_max >= width or y_max >= height:
            raise ValueError(
                f"event coordinates outside the {width}x{height} sensor: max x={x_max}, max y={y_max}"
            )


def events_to_frames(
    events: np.ndarray,
    sensor_size: tuple[int, int],
    T: int,
    out_size: int | tuple[int, int] | None = None,
    t_start: int | None = None,
    t_end: int | None = None,
) -> torch.Tensor:
    """Bin events into ``T`` equal-time frames of per-polarity counts.

    A whole recording at once, its window split into T equal bins (datasets, folders). Streams use
    :class:`~stoprt.runtime.stream.binning.Binner` instead: incremental, on a fixed ``dt_us`` grid,
    with filters and at most one partial step in memory; both downsample by the same cell rule.

    Args:
        events: 1-D EVENT_DTYPE array (need not be sorted).
        sensor_size: ``(W, H)`` of the sensor the events come from.
        T: number of time bins, >= 1.
        out_size: ``(W', H')`` (or one int for a square) of the output; each sensor pixel adds its count
            to the output cell that contains its centre, so for integer ratios this is sum (area)
            pooling and the total count is always preserved. Default: the sensor size.
        t_start, t_end: the window ``[t_start, t_end)`` in microseconds split into the T bins; events
            outside it are dropped. Defaults: first event, last event + 1 us. Pass them explicitly to
            align bins across recordings.

    Returns:
        float32 tensor ``[T, 2, H', W']``; channel 0 counts OFF events, channel 1 ON events.
    """
    check_events(events, sensor_size)
    if not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    width, height = _pair(sensor_size, "sensor_size")
    out_w, out_h = _pair(out_size, "out_size") if out_size is not None else (width, height)
    t = events["t"]
    if t_start is None:
        t_start = int(t.min()) if t.size else 0
    if t_end is None:
        t_end = int(t.max()) + 1 if t.size else t_start + 1
    if t_end <= t_start:
        raise ValueError(f"t_end ({t_end}) must be greater than t_start ({t_start})")
    inside = (t >= t_start) & (t < t_end)
    ev = events[inside]
    # Integer arithmetic keeps the bin of an event exact even for long recordings.
    bins = (ev["t"] - t_start) * T // (t_end - t_start)
    xs = ev["x"].astype(np.int64) * out_w // width
    ys = ev["y"].astype(np.int64) * out_h // height
    flat = ((bins * 2 + ev["p"]) * out_h + ys) * out_w + xs
    counts = np.bincount(flat, minlength=T * 2 * out_h * out_w).astype(np.float32)
    import torch  # here only: the event readers and binner run without torch (the edge install)
    return torch.from_numpy(counts.reshape(T, 2, out_h, out_w))
