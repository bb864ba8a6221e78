"""Built-in event datasets that need no download, recorded with :class:`~.emulator.DVSEmulator`.

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled smoothly and moved in three
  small saccades in front of the emulated sensor, as N-MNIST was recorded from MNIST.
* ``gestures``: synthetic textured shapes performing one of eight motions (moves, turns, zooms).

:func:`load_builtin` bins either into an :class:`EventFrames` dataset with a fixed train/test split.
"""

from __future__ import annotations

import functools
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .cache import CACHE_VERSION, cache_dir, load_npz, save_npz
from .emulator import DVSEmulator
from .events import events_to_frames

DIGIT_CLASSES = tuple(str(d) for d in range(10))
GESTURE_CLASSES = ("right", "left", "up", "down", "rotate_cw", "rotate_ccw", "expand", "contract")
_CHUNK = 128  # recordings rendered and emulated together: bounds memory to ~100 MB at 32x32


class EventFrames(torch.utils.data.Dataset):
    """Event-count frames with labels.

    Attributes:
        frames: integer tensor ``[N, T, 2, H, W]`` of events per time bin (channel 0 OFF, 1 ON);
            uint8 unless counts need a wider type (few, large bins).
        labels: int64 tensor ``[N]``.
        class_names: one name per class; ``num_classes``, ``T`` and ``input_shape`` ``(2, H, W)``
            follow from the tensors.
    """

    def __init__(self, frames: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...]) -> None:
        if frames.ndim != 5 or frames.shape[2] != 2:
            raise ValueError(f"frames must be [N, T, 2, H, W], got {tuple(frames.shape)}")
        if labels.shape != (frames.shape[0],):
            raise ValueError(f"labels must be [{frames.shape[0]}], got {tuple(labels.shape)}")
        self.frames = frames
        self.labels = labels.to(torch.int64)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.T = int(frames.shape[1])
        self.input_shape = tuple(int(s) for s in frames.shape[2:])

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(frames [T, 2, H, W] float32, label)``."""
        return self.frames[index].float(), int(self.labels[index])


# ----------------------------------------------------------------------------------------------- digits


def emulated_digits(
    n_samples: int | None = None,
    sensor_size: tuple[int, int] = (32, 32),
    digit_size: float | None = None,
    saccade_px: float | None = None,
    duration_us: int = 300_000,
    frames_per_saccade: int = 20,
    jitter_px: float = 1.0,
    seed: int = 0,
    emulator: DVSEmulator | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Record scikit-learn's 8x8 digits with an emulated DVS, N-MNIST style.

    Each digit is drawn bright on a dim background, bicubically upsampled to ``digit_size`` pixels
    (default 22/32 of the sensor's smaller side), placed at the sensor centre plus a random offset of
    up to ``jitter_px``, and moved along a triangle of side ``saccade_px`` (default 3/32 of the side) in
    three saccades of ``duration_us / 3`` each; the eased motion stops between saccades, so the event
    rate shows three bursts.

    Args:
        n_samples: use the first ``n_samples`` digits (all 1,797 when None).
        sensor_size: ``(W, H)`` of the emulated sensor.
        emulator: the camera; default: thresholds 0.2 with 0.02 mismatch, 0.1 Hz noise, seeded.

    Returns:
        ``(events, labels)``: one EVENT_DTYPE array per digit with times in ``[0, duration_us]``, and
        int64 labels ``[n]``.
    """
    all_images, all_labels = digit_images()
    if n_samples is not None and not 1 <= n_samples <= len(all_labels):
        raise ValueError(f"n_samples must be in [1, {len(all_labels)}], got {n_samples}")
    images = all_images[:n_samples].astype(np.float32) / 16.0
    labels = all_labels[:n_samples].astype(np.int64)
    width, height = sensor_size
    side = min(width, height)
    digit_size = digit_size or 22 / 32 * side
    saccade_px = saccade_px or 3 / 32 * side
    emulator = emulator or DVSEmulator(threshold_sigma=0.02, noise_rate_hz=0.1, seed=seed)
    path = _saccade_path(saccade_px, frames_per_saccade)
    times = np.linspace(0, duration_us, len(path)).round()
    offsets = np.random.default_rng([seed, 2]).uniform(-jitter_px, jitter_px, (len(images), 1, 2))
    events = []
    for start in range(0, len(images), _CHUNK):
        chunk = slice(start, start + _CHUNK)
        video = _render_digits(images[chunk], path + offsets[chunk], (width, height), digit_size)
        events += emulator.simulate_batch(video, times)
    return events, labels


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images [1797, 8, 8] uint8 in 0..16, labels [1797] int64)``.

    Kept as a small ``.npz`` in the cache folder: scikit-learn (about 2 s to import) is loaded only the
    first time, so streams and training start without it.
    """
    path = cache_dir() / "sklearn-digits-v1.npz"
    stored = load_npz(path)
    if stored is not None and {"images", "labels"} <= stored.keys():
        return stored["images"], stored["labels"]
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.images.astype(np.uint8), digits.target.astype(np.int64)
    save_npz(path, images=images, labels=labels)
    return images, labels


def _saccade_path(side: float, frames_per_saccade: int) -> np.ndarray:
    """Offsets ``[3 * frames_per_saccade + 1, 2]`` (x, y) in pixels around an equilateral triangle.

    Each leg follows a raised-cosine profile: zero speed at the corners, as an eye (or N-MNIST's pan
    tilt unit) settles between saccades.
    """
    h = side * math.sqrt(3) / 2
    corners = np.array([[-side / 2, -h / 3], [side / 2, -h / 3], [0.0, 2 * h / 3], [-side / 2, -h / 3]])
    s = np.arange(frames_per_saccade) / frames_per_saccade
    eased = (1 - np.cos(np.pi * s))[:, None] / 2
    legs = [a + (b - a) * eased for a, b in zip(corners[:-1], corners[1:])]
    return np.concatenate(legs + [corners[-1:]])


def _render_digits(
    images: np.ndarray, offsets: np.ndarray, sensor_size: tuple[int, int], digit_size: float,
    background: float = 0.1,
) -> np.ndarray:
    """Videos ``[B, F, H, W]`` in [0, 1] of ``images`` ``[B, 8, 8]`` shifted by ``offsets`` ``[B, F, 2]``.

    One bicubic resampling per frame maps each sensor pixel straight into the 8x8 source, so the
    upsampling and the subpixel shift are a single smooth interpolation.
    """
    width, height = sensor_size
    batch, n_frames = offsets.shape[:2]
    # grid_sample reads normalised [-1, 1] coordinates of the digit (align_corners=False): pixel
    # index c of the sensor lies at (c + 0.5 - centre - offset) * 2 / digit_size.
    shift = torch.from_numpy(offsets.reshape(-1, 1, 1, 2)).float()
    gx = (torch.arange(width) + 0.5 - width / 2)[None, None, :].expand(1, height, width)
    gy = (torch.arange(height) + 0.5 - height / 2)[None, :, None].expand(1, height, width)
    grid = (torch.stack([gx, gy], dim=-1) - shift) * (2 / digit_size)  # [B * F, H, W, 2]
    source = torch.from_numpy(images)[:, None, None].expand(-1, n_frames, 1, -1, -1).reshape(-1, 1, 8, 8)
    video = F.grid_sample(source, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    video = video.clamp_(0, 1).reshape(batch, n_frames, height, width).numpy()
    video *= 1 - background  # in place: the same float32 values, without two fresh video-sized arrays
    video += background
    return video


# --------------------------------------------------------------------------------------------- gestures


def synthetic_gestures(
    n_samples: int = 1600,
    sensor_size: tuple[int, int] = (32, 32),
    duration_us: int = 200_000,
    n_frames: int = 48,
    seed: int = 0,
    emulator: DVSEmulator | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Record synthetic gestures: a random textured shape performs one motion of :data:`GESTURE_CLASSES`.

    Shapes are lobed blobs (2-5 lobes) with a sinusoidal texture that moves with them; positions,
    sizes, brightness, textures and speeds (distance, angle or zoom covered in ``duration_us``) are
    random per sample. Classes cycle, so every class has ``n_samples // 8`` or one more samples.

    The rotations turn the shape rigidly about a pivot off its centre (0.15-0.22 of the sensor side
    away), by 180-270 degrees: the shape circles the pivot while it turns, as a hand does in DVS128
    Gesture's arm rotations. A shape spinning about its own centre would show its direction only in
    which side of each lobe's edge fires ON and which OFF, a pixel apart: a mirror-image pair that
    downsampled frames nearly erase (no network of the peer benchmark learned it in 3 epochs at
    16x16, T=10). The path around the
    pivot shows the direction at any resolution, in the order the bins light up.

    Returns:
        ``(events, labels)`` as :func:`emulated_digits`.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    labels = np.arange(n_samples, dtype=np.int64) % len(GESTURE_CLASSES)
    params = _gesture_params(labels, sensor_size, np.random.default_rng([seed, 3]))
    emulator = emulator or DVSEmulator(threshold_sigma=0.02, noise_rate_hz=0.1, seed=seed)
    progress = np.linspace(0.0, 1.0, n_frames)
    times = (progress * duration_us).round()
    events = []
    for start in range(0, n_samples, _CHUNK):
        chunk = {k: v[start : start + _CHUNK] for k, v in params.items()}
        events += emulator.simulate_batch(_render_gestures(chunk, progress, sensor_size), times)
    return events, labels


def _gesture_params(labels: np.ndarray, sensor_size: tuple[int, int], rng: np.random.Generator) -> dict:
    """Per-sample shape, texture and motion parameters, each an array ``[n]`` (pixels, radians)."""
    n = len(labels)
    width, height = sensor_size
    side = min(width, height)
    u = functools.partial(rng.uniform, size=n)
    # Motion per class, as (direction x, direction y, spin sign, zoom sign).
    motion = np.array([[1, 0, 0, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 1, 0, 0],
                       [0, 0, 1, 0], [0, 0, -1, 0], [0, 0, 0, 1], [0, 0, 0, -1]], dtype=np.float64)[labels]
    heading = np.arctan2(motion[:, 1], motion[:, 0]) + u(-0.25, 0.25)
    moving = np.abs(motion[:, :2]).sum(1)
    distance = moving * u(0.3, 0.5) * side
    lo, hi = np.log(u(0.5, 0.7)), np.log(u(1.1, 1.3))
    zoom_in = motion[:, 3] >= 0
    spinning = motion[:, 2] != 0
    # rotations circle a pivot that stays nearer the centre, so the shape stays on the sensor
    centre_jitter = np.select([moving > 0, spinning], [0.1, 0.06], 0.12) * side
    return {
        "cx0": width / 2 - moving * np.cos(heading) * distance / 2 + u(-1, 1) * centre_jitter,
        "cy0": height / 2 - moving * np.sin(heading) * distance / 2 + u(-1, 1) * centre_jitter,
        "vx": np.cos(heading) * distance,
        "vy": np.sin(heading) * distance,
        "angle0": u(0, 2 * np.pi),
        "spin": motion[:, 2] * u(1.0, 1.5) * np.pi,
        "log_scale0": np.where(motion[:, 3] == 0, 0.0, np.where(zoom_in, lo, hi)),
        "log_zoom": motion[:, 3] * (hi - lo),
        "radius": u(0.15, 0.22) * side,
        "lobes": rng.integers(2, 6, n).astype(np.float64),
        "lobe_depth": u(0.15, 0.3),
        "lobe_phase": u(0, 2 * np.pi),
        "foreground": u(0.55, 1.0),
        "background": u(0.02, 0.25),
        "texture_depth": u(0.15, 0.4),
        "texture_freq": u(0.08, 0.2) * 2 * np.pi,
        "texture_angle": u(0, np.pi),
        "texture_phase": u(0, 2 * np.pi),
        # drawn last: the draws above, and with them every move and zoom, are those of cache version 1
        "orbit": spinning * u(0.15, 0.22) * side,  # the shape centre's distance from the pivot
        "orbit_phase": u(0, 2 * np.pi),
    }


def _render_gestures(params: dict, progress: np.ndarray, sensor_size: tuple[int, int]) -> np.ndarray:
    """Videos ``[B, F, H, W]`` in [0, 1] for parameter arrays ``[B]`` at ``progress`` ``[F]`` in [0, 1].

    Each pixel is mapped back into the shape's own (rotated, scaled) frame, where the outline and the
    texture are fixed, so texture moves with the shape; outlines get a one-pixel soft edge.
    The shape centre moves from ``(cx0, cy0)`` by ``(vx, vy)`` and circles that point at distance
    ``orbit``, turning by ``spin`` as the shape itself does (a rigid rotation about the pivot).
    Positive angles turn clockwise on screen (y points down).
    """
    width, height = sensor_size
    b = {k: v[:, None, None, None].astype(np.float32) for k, v in params.items()}  # [B, 1, 1, 1]
    s = progress.astype(np.float32)[None, :, None, None]  # [1, F, 1, 1]
    x = np.arange(width, dtype=np.float32)[None, None, None, :] + 0.5
    y = np.arange(height, dtype=np.float32)[None, None, :, None] + 0.5
    angle = b["angle0"] + b["spin"] * s
    scale = np.exp(b["log_scale0"] + b["log_zoom"] * s)
    orbit_angle = b["orbit_phase"] + b["spin"] * s
    dx = x - (b["cx0"] + b["vx"] * s + b["orbit"] * np.cos(orbit_angle))
    dy = y - (b["cy0"] + b["vy"] * s + b["orbit"] * np.sin(orbit_angle))
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * dx + sin * dy) / scale
    v = (cos * dy - sin * dx) / scale
    outline = b["radius"] * (1 + b["lobe_depth"] * np.cos(b["lobes"] * np.arctan2(v, u) + b["lobe_phase"]))
    inside = np.clip(0.5 + (outline - np.hypot(u, v)) * scale, 0, 1)
    wave = u * np.cos(b["texture_angle"]) + v * np.sin(b["texture_angle"])
    grating = np.sin(b["texture_freq"] * wave + b["texture_phase"])
    texture = b["foreground"] * (1 + b["texture_depth"] * grating)
    return np.clip(b["background"] + inside * (texture - b["background"]), 0, 1)


# -------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Builtin:
    generate: Callable[..., tuple[list[np.ndarray], np.ndarray]]
    duration_us: int
    class_names: tuple[str, ...]
    n_samples: int  # recordings generated; the split is always made over all of them


_BUILTINS = {
    "digits": _Builtin(emulated_digits, 300_000, DIGIT_CLASSES, n_samples=1797),
    "gestures": _Builtin(synthetic_gestures, 200_000, GESTURE_CLASSES, n_samples=1600),
}
_SPLITS = ("train", "test")


def load_builtin(
    name: str,
    split: str = "train",
    T: int = 10,
    size: int = 32,
    seed: int = 0,
    n_samples: int | None = None,
    *,
    disk_cache: bool = True,
) -> EventFrames:
    """A built-in dataset as ``[T, 2, size, size]`` event-count frames.

    Recordings use a square sensor of ``size * ceil(32 / size)`` pixels (at least 32, so small outputs
    are area-pooled from a real resolution by an integer factor); their whole duration is split into T
    equal bins. All recordings (1,797 digits, 1,600 gestures) are generated and split by a stratified
    80/20 that depends only on ``seed``, so train and test never share a recording.

    Args:
        name: ``"digits"`` or ``"gestures"``.
        split: ``"train"`` or ``"test"``.
        n_samples: keep only the first ``n_samples`` of the split (quick runs); default: all of it.
        disk_cache: also keep the frames under ``$STOPRT_CACHE_DIR`` (default ``~/.cache/stoprt``).
            Generated data is cached in memory in any case, so train and test are generated once.
    """
    if name not in _BUILTINS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose from {sorted(_BUILTINS)}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {_SPLITS}")
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    from sklearn.model_selection import train_test_split  # lazily: a 2 s import, needed only here

    frames, labels = _cached_frames(name, T, size, seed, disk_cache)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=seed, stratify=labels.numpy()
    )
    index = np.sort(train_idx if split == "train" else test_idx)
    if n_samples is not None:
        if not 1 <= n_samples <= len(index):
            raise ValueError(f"n_samples must be in [1, {len(index)}] for {name}/{split}, got {n_samples}")
        index = index[:n_samples]
    index = torch.from_numpy(index)
    return EventFrames(frames[index], labels[index], _BUILTINS[name].class_names)


@functools.lru_cache(maxsize=4)
def _cached_frames(
    name: str, T: int, size: int, seed: int, disk_cache: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(frames [n, T, 2, size, size] integer counts, labels [n] int64)``, from disk when cached there."""
    path = cache_dir() / f"{name}-v{CACHE_VERSION}-T{T}-s{size}-seed{seed}.pt"
    if disk_cache and path.is_file():
        try:
            stored = torch.load(path, weights_only=True)
            return stored["frames"], stored["labels"]
        except (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError):
            pass  # unreadable (e.g. truncated by a crash before atomic writes): regenerate below
    frames, labels = _generate_frames(name, T, size, seed)
    if disk_cache:
        _atomic_save({"frames": frames, "labels": labels}, path)
    return frames, labels


def _generate_frames(name: str, T: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _BUILTINS[name]
    sensor = size * math.ceil(32 / size)
    events, labels = spec.generate(
        n_samples=spec.n_samples, sensor_size=(sensor, sensor), duration_us=spec.duration_us, seed=seed
    )
    frames = torch.stack([
        events_to_frames(ev, (sensor, sensor), T, out_size=size, t_start=0, t_end=spec.duration_us + 1)
        for ev in events
    ])
    return frames.to(_count_dtype(int(frames.max()))), torch.from_numpy(labels)


def _count_dtype(largest: int) -> torch.dtype:
    """The smallest integer dtype that holds every count exactly (uint8 at the default T and size)."""
    for dtype in (torch.uint8, torch.int16):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


def _atomic_save(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a partial file.

    A read-only or full disk only costs the cache, never the data, so errors are swallowed.
    """
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except OSError:
        pass
