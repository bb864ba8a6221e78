"""A DVS (event camera) emulator: turns a video into the events a sensor watching it would emit.

Model (per pixel, after the idea behind ESIM/v2e; our own implementation):

* the pixel sees the log intensity ``L = log(eps + I)``, linearly interpolated in time between frames;
* it remembers a reference level; whenever ``L`` rises ``theta_on`` above it the pixel emits an ON
  event and raises the reference by ``theta_on`` (OFF and ``theta_off`` likewise downwards), so a
  change spanning several thresholds emits several events, each timestamped where the interpolated
  ``L`` crosses its level;
* optional per-pixel threshold mismatch (a fixed map per sensor size, drawn from the seed, as a
  given physical camera has one), refractory period and background-activity noise.

Everything is vectorised over pixels (and over a batch of recordings); only frames are looped over.

Why a second sensor model, :class:`stoprt.runtime.stream.encodings.FrameDifference`, exists: this one
makes timestamped events (numpy, sub-frame times, mismatch, refractory period, noise) to record
datasets offline; FrameDifference turns live video into per-frame ON/OFF counts in torch on the
device, with no events in between. Without mismatch, refractory period and noise their counts per
frame interval agree (both move the reference by whole thresholds).
"""

from __future__ import annotations

import numpy as np

from .events import events_from_arrays

_MIN_THRESHOLD = 0.01  # mismatch draws are clipped here: a zero threshold would fire without bound


class DVSEmulator:
    """Simulates an event camera from frames in [0, 1] with timestamps in microseconds.

    Args:
        threshold_on, threshold_off: nominal contrast thresholds in log-intensity units.
        threshold_sigma: standard deviation of the per-pixel threshold mismatch (log units).
        refractory_us: after an emitted event a pixel stays silent this long. Crossings inside the
            refractory period are dropped but still move the reference level, so the pixel does not
            catch up with a burst afterwards.
        noise_rate_hz: background-activity rate per pixel; noise events have random polarity, uniform
            times over the recording and do not affect the reference level.
        eps: offset inside the log; keeps black pixels finite and damps contrast in dark regions.
        seed: makes the mismatch map and the noise reproducible: two emulators built with the same
            arguments produce identical events for the same sequence of calls.
    """

    def __init__(
        self,
        threshold_on: float = 0.2,
        threshold_off: float = 0.2,
        threshold_sigma: float = 0.0,
        refractory_us: float = 0.0,
        noise_rate_hz: float = 0.0,
        eps: float = 1e-2,
        seed: int = 0,
    ) -> None:
        if min(threshold_on, threshold_off) < _MIN_THRESHOLD:
            raise ValueError(f"thresholds must be >= {_MIN_THRESHOLD}, got {threshold_on}, {threshold_off}")
        if threshold_sigma < 0 or refractory_us < 0 or noise_rate_hz < 0:
            raise ValueError("threshold_sigma, refractory_us and noise_rate_hz must be >= 0")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.threshold_on = float(threshold_on)
        self.threshold_off = float(threshold_off)
        self.threshold_sigma = float(threshold_sigma)
        self.refractory_us = float(refractory_us)
        self.noise_rate_hz = float(noise_rate_hz)
        self.eps = float(eps)
        self.seed = int(seed)
        # Separate streams: the mismatch map depends only on (seed, sensor size), never on call order.
        self._noise_rng = np.random.default_rng([self.seed, 1])

    def threshold_maps(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel ``(theta_on, theta_off)``, each float64 ``[H, W]``; the same for every call."""
        rng = np.random.default_rng([self.seed, 0, height, width])
        maps = []
        for nominal in (self.threshold_on, self.threshold_off):
            theta = nominal + self.threshold_sigma * rng.standard_normal((height, width))
            maps.append(np.maximum(theta, _MIN_THRESHOLD))
        return maps[0], maps[1]

    def simulate(self, frames: np.ndarray, times_us: np.ndarray) -> np.ndarray:
        """Events of one recording.

        Args:
            frames: float ``[N, H, W]`` intensities in [0, 1], N >= 2.
            times_us: ``[N]`` strictly increasing frame times in microseconds.

        Returns:
            1-D EVENT_DTYPE array sorted by ``t``.
        """
        frames = np.asarray(frames)
        if frames.ndim != 3:
            raise ValueError(f"frames must be [N, H, W], got shape {frames.shape}")
        return self.simulate_batch(frames[None], times_us)[0]

    def simulate_batch(self, frames: np.ndarray, times_us: np.ndarray) -> list[np.ndarray]:
        """Events of B recordings made with this camera over the same frame times.

        Args:
            frames: float ``[B, N, H, W]`` intensities in [0, 1], N >= 2.
            times_us: ``[N]`` strictly increasing frame times in microseconds.

        Returns:
            B EVENT_DTYPE arrays, each sorted by ``t``.
        """
        frames, times = _check_inputs(frames, times_us)
        batch, n_frames, height, width = frames.shape
        on_map, off_map = self.threshold_maps(height, width)
        theta = {1: np.tile(on_map.ravel(), batch), 0: np.tile(off_map.ravel(), batch)}
        log_prev = self._log(frames[:, 0])
        ref = log_prev.copy()  # the sensor starts adapted to the first frame
        last_event = np.full(ref.shape, -np.inf)
        parts = []  # (flat pixel index over the batch, time in us as float, polarity)
        for k in range(1, n_frames):
            log_next = self._log(frames[:, k])
            for polarity, sign in ((1, 1.0), (0, -1.0)):
                pix, t, n = self._crossings(
                    log_prev, log_next, ref, theta[polarity], sign, times[k - 1 : k + 1], last_event
                )
                ref += sign * n * theta[polarity]
                parts.append((pix, t, np.full(pix.size, polarity, np.uint8)))
            log_prev = log_next
        parts.append(self._noise(batch, height * width, times[0], times[-1]))
        pix, t, p = (np.concatenate(column) for column in zip(*parts))
        return _split_by_recording(pix, np.rint(t).astype(np.int64), p, batch, width, height)

    def _log(self, frame: np.ndarray) -> np.ndarray:
        return np.log(self.eps + frame.reshape(-1).astype(np.float64))

    def _crossings(
        self,
        log0: np.ndarray,
        log1: np.ndarray,
        ref: np.ndarray,
        theta: np.ndarray,
        sign: float,
        t_pair: np.ndarray,
        last_event: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Threshold crossings of one polarity between two frames.

        Returns the flat pixel index and float time of each emitted event and, per pixel, the number
        ``n`` of levels crossed (emitted or suppressed by the refractory period).
        """
        n = np.floor(np.maximum(sign * (log1 - ref), 0.0) / theta).astype(np.int64)
        hit = np.flatnonzero(n)
        counts = n[hit]
        pix = np.repeat(hit, counts)
        level = np.arange(pix.size) - np.repeat(np.cumsum(counts) - counts, counts) + 1  # 1..n per pixel
        # |log1 - log0| > 0 wherever a level was crossed: the reference stays within one threshold of L.
        rise = sign * (log1 - log0)[pix]
        frac = (sign * (ref - log0)[pix] + level * theta[pix]) / rise
        t0, t1 = float(t_pair[0]), float(t_pair[1])
        t = t0 + (t1 - t0) * np.clip(frac, 0.0, 1.0)
        if self.refractory_us > 0 and pix.size:
            keep = self._refractory_keep(pix, level, t, (t1 - t0) * theta[pix] / rise, last_event)
            pix, t = pix[keep], t[keep]
        return pix, t, n

    def _refractory_keep(
        self, pix: np.ndarray, level: np.ndarray, t: np.ndarray, spacing: np.ndarray, last_event: np.ndarray
    ) -> np.ndarray:
        """Mask of crossings that survive the refractory period; updates ``last_event`` in place.

        Within one frame interval a pixel's crossings are equally spaced in time (``spacing``), so the
        sequential rule "emit if at least R after the last emitted event" has a closed form: the first
        crossing clear of the previous event is emitted, then every m-th with ``m = ceil(R / spacing)``.
        """
        clear = t >= last_event[pix] + self.refractory_us
        blocked_before = np.bincount(pix[~clear], minlength=last_event.size)[pix]
        first = blocked_before + 1
        every = np.maximum(np.ceil(self.refractory_us / spacing), 1).astype(np.int64)
        keep = clear & ((level - first) % every == 0)
        np.maximum.at(last_event, pix[keep], t[keep])
        return keep

    def _noise(self, batch: int, n_pixels: int, t0: float, t1: float) -> tuple[np.ndarray, ...]:
        """Background activity: Poisson counts per recording, uniform pixels, times and polarities."""
        rng = self._noise_rng
        rate = self.noise_rate_hz * n_pixels * (t1 - t0) * 1e-6
        counts = rng.poisson(rate, size=batch) if rate > 0 else np.zeros(batch, np.int64)
        total = int(counts.sum())
        pix = np.repeat(np.arange(batch) * n_pixels, counts) + rng.integers(0, n_pixels, total)
        t = rng.uniform(t0, t1, total)
        p = rng.integers(0, 2, total).astype(np.uint8)
        return pix, t, p


def _check_inputs(frames: np.ndarray, times_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    times = np.asarray(times_us, dtype=np.float64)
    if frames.ndim != 4:
        raise ValueError(f"frames must be [B, N, H, W], got shape {frames.shape}")
    if frames.shape[1] < 2:
        raise ValueError(f"need at least 2 frames, got {frames.shape[1]}")
    if times.shape != (frames.shape[1],):
        raise ValueError(f"times_us must have shape ({frames.shape[1]},), got {times.shape}")
    if np.any(np.diff(times) <= 0):
        raise ValueError("times_us must be strictly increasing")
    if frames.size and (np.nanmin(frames) < 0 or np.nanmax(frames) > 1 or np.isnan(frames).any()):
        raise ValueError("frames must be intensities in [0, 1] without NaN")
    return frames, times


def _split_by_recording(
    pix: np.ndarray, t: np.ndarray, p: np.ndarray, batch: int, width: int, height: int
) -> list[np.ndarray]:
    """Sort events by (recording, time) and cut them into one EVENT_DTYPE array per recording."""
    recording, within = np.divmod(pix, width * height)
    # One stable sort on a combined key (much faster than lexsort); ties keep pixel order.
    t_min = int(t.min()) if t.size else 0
    key = recording * (int(t.max()) - t_min + 1 if t.size else 1) + (t - t_min)
    order = np.argsort(key, kind="stable")
    events = events_from_arrays(t[order], within[order] % width, within[order] // width, p[order])
    bounds = np.searchsorted(recording[order], np.arange(1, batch))
    return np.split(events, bounds)
