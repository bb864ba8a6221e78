"""The event filters of a :class:`~stoprt.runtime.stream.binning.Binner`, applied per packet after its checks.

* :class:`HotPixels`: a fixed mask, or ``"auto"``: per window of ``window_us``, a pixel with more than
  ``factor`` times the median count of the active pixels (and at least ``min_events``) is masked
  during the next window (the first window is never masked);
* :class:`ActivityFilter` (the classic background-activity filter): an event is kept only if one of
  its 8 neighbours fired within ``window_us`` before it; every event it sees updates the
  neighbourhood map, kept or not.

Each works on a packet's timestamps ``t``, flat pixel indices ``pix`` (``y * W + x``) and the boolean
``keep`` of the events still kept, which it narrows in place; it returns how many it dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_NEIGHBOURS = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dx or dy]
_NEVER = np.iinfo(np.int64).min // 2


class HotPixels:
    """Drop the events of hot pixels: ``mask`` a boolean ``[H, W]`` (True = drop) or ``"auto"``."""

    def __init__(self, sensor_size: tuple[int, int], mask: Any, window_us: int, factor: float,
                 min_events: int) -> None:
        w, h = sensor_size
        self.auto = isinstance(mask, str)
        if self.auto and mask != "auto":
            raise ValueError(f"hot_pixels must be None, a [H, W] mask or 'auto', got {mask!r}")
        self.fixed = None if self.auto else _checked_mask(mask, w, h)
        self.window_us, self.factor, self.min_events = int(window_us), float(factor), min_events
        # The mask in force: a property of the sensor, kept when the stream starts over
        self.mask = self.fixed.copy() if self.fixed is not None else np.zeros(w * h, bool)
        self._counts = np.zeros(w * h, dtype=np.int64) if self.auto else None
        self._window: int | None = None

    @property
    def pixels(self) -> int:
        """How many pixels are masked now."""
        return int(self.mask.sum())

    def reset(self) -> None:
        """A new stream: the counting window starts over (the mask stays)."""
        if self._counts is not None:
            self._counts[:] = 0
        self._window = None

    def apply(self, t: np.ndarray, pix: np.ndarray, keep: np.ndarray) -> int:
        if not self.auto:
            keep &= ~self.mask[pix]
        else:
            if self._window is None:
                self._window = int(t[0])
            i, n = 0, len(t)
            while i < n:
                j = max(int(np.searchsorted(t, self._window + self.window_us, side="left")), i)
                np.add.at(self._counts, pix[i:j], 1)
                keep[i:j] &= ~self.mask[pix[i:j]]
                if j < n:  # the window ended: the next one is masked by what this one counted
                    self._update_mask()
                    self._window += (int(t[j]) - self._window) // self.window_us * self.window_us
                i = j
        return int((~keep).sum())

    def _update_mask(self) -> None:
        counts = self._counts
        active = counts[counts > 0]
        limit = max(self.factor * float(np.median(active)), self.min_events) if len(active) else np.inf
        self.mask = counts > limit
        if self.fixed is not None:
            self.mask |= self.fixed
        counts[:] = 0


def _checked_mask(mask: Any, w: int, h: int) -> np.ndarray:
    arr = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)  # a tensor, or array-like
    if arr.shape != (h, w):
        raise ValueError(f"hot_pixels mask must have shape (H, W) = ({h}, {w}), got {arr.shape}")
    return arr.astype(bool).reshape(-1)


class ActivityFilter:
    """The background-activity filter with a support window of ``window_us``."""

    def __init__(self, sensor_size: tuple[int, int], window_us: int) -> None:
        if not isinstance(window_us, (int, np.integer)) or window_us < 0:
            raise ValueError(f"denoise_us must be an int >= 0 or None, got {window_us!r}")
        self.sensor_size, self.window_us = sensor_size, int(window_us)
        w, h = sensor_size
        self._last = np.full(w * h, _NEVER, dtype=np.int64)  # the latest event of each pixel

    def reset(self) -> None:
        """A new stream: no pixel has fired."""
        self._last[:] = _NEVER

    def apply(self, t: np.ndarray, pix: np.ndarray, keep: np.ndarray) -> int:
        """Filter the events still kept; updates the neighbourhood map."""
        idx = np.flatnonzero(keep)
        if not len(idx):
            return 0
        tk, pk = t[idx], pix[idx]
        w, h = self.sensor_size
        n = len(tk)
        # Work in (pixel, arrival) order: the keys and, for each offset, the queries are then sorted,
        # which keeps the binary searches cache-friendly.
        order = np.lexsort((np.arange(n), pk))
        sp, st = pk[order], tk[order]
        keys = sp * n + order
        xs, ys = sp % w, sp // w
        support = np.full(n, _NEVER, dtype=np.int64)
        for dx, dy in _NEIGHBOURS:
            valid = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
            q = sp + (dy * w + dx)
            # The latest earlier event of this packet at pixel q, else the map from earlier packets.
            pos = np.searchsorted(keys, q * n + order, side="left") - 1
            pos_ok = np.maximum(pos, 0)
            same = (pos >= 0) & (sp[pos_ok] == q)
            seen = np.where(same, st[pos_ok], self._last[np.where(valid, q, 0)])
            np.maximum(support, np.where(valid, seen, _NEVER), out=support)
        support[order] = support.copy()  # back to arrival order
        passed = tk - support <= self.window_us
        np.maximum.at(self._last, pk, tk)
        keep[idx[~passed]] = False
        return int((~passed).sum())
