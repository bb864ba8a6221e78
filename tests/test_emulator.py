"""DVS emulator, event binning and the built-in datasets (digits, gestures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from stoprt.runtime import datasets
from stoprt.runtime.datasets import EventFrames, emulated_digits, load_builtin, synthetic_gestures
from stoprt.runtime.emulator import DVSEmulator
from stoprt.runtime.events import EVENT_DTYPE, events_from_arrays, events_to_frames


@pytest.fixture(autouse=True, scope="module")
def _private_cache_dir(tmp_path_factory):
    """Keep every on-disk cache these tests might write out of the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STOPRT_CACHE_DIR", str(tmp_path_factory.mktemp("stoprt-cache")))
        yield


# ------------------------------------------------------------------------------------------- emulator


def _ramp(levels: list[float], shape=(3, 4)) -> tuple[np.ndarray, np.ndarray]:
    """Uniform frames at the given intensities, 1 ms apart: ``([N, H, W], [N] us)``."""
    frames = np.stack([np.full(shape, level) for level in levels])
    return frames, np.arange(len(levels)) * 1000


@pytest.mark.parametrize("log_change, polarity", [(0.65, 1), (-0.65, 0), (1.05, 1), (-1.05, 0)])
def test_one_event_per_threshold_crossed(log_change: float, polarity: int) -> None:
    frames, times = _ramp([0.2, 0.2 * np.exp(log_change)])
    events = DVSEmulator(threshold_on=0.2, threshold_off=0.2, eps=1e-9).simulate(frames, times)
    per_pixel = int(abs(log_change) // 0.2)
    assert len(events) == per_pixel * frames[0].size
    assert np.all(events["p"] == polarity)
    # Crossing k of 0.2 * k is interpolated at time 1000 us * 0.2 * k / |change|.
    expected = np.round(1000 * 0.2 * np.arange(1, per_pixel + 1) / abs(log_change))
    assert np.array_equal(np.unique(events["t"]), expected)


def test_reference_carries_over_between_frames() -> None:
    """Two steps of 0.15 cross one 0.2 threshold in total, during the second step."""
    frames, times = _ramp([0.2, 0.2 * np.exp(0.15), 0.2 * np.exp(0.3)])
    events = DVSEmulator(eps=1e-9).simulate(frames, times)
    assert len(events) == frames[0].size
    assert np.all((events["t"] > 1000) & (events["t"] <= 2000) & (events["p"] == 1))


def test_static_scene_without_noise_is_silent() -> None:
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.uniform(size=(1, 16, 16)), 20, axis=0)
    events = DVSEmulator(threshold_sigma=0.05).simulate(frames, np.arange(20) * 1000)
    assert len(events) == 0 and events.dtype == EVENT_DTYPE


def test_output_sorted_and_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(1)
    frames, times = rng.uniform(size=(10, 8, 8)), np.arange(10) * 5000

    def record(seed: int) -> np.ndarray:
        emulator = DVSEmulator(threshold_sigma=0.05, noise_rate_hz=20, refractory_us=100, seed=seed)
        return emulator.simulate(frames, times)

    first = record(3)
    assert np.all(np.diff(first["t"]) >= 0)
    assert np.array_equal(first, record(3))
    assert not np.array_equal(first, record(4))


def test_threshold_mismatch_is_per_pixel_and_fixed() -> None:
    emulator = DVSEmulator(threshold_sigma=0.03, seed=5)
    on, off = emulator.threshold_maps(16, 16)
    assert on.shape == (16, 16) and 0.01 < on.std() < 0.05 and not np.array_equal(on, off)
    assert np.array_equal(on, emulator.threshold_maps(16, 16)[0])


def test_noise_rate() -> None:
    frames = np.full((2, 32, 32), 0.5)
    events = DVSEmulator(noise_rate_hz=5.0).simulate(frames, [0, 1_000_000])
    assert abs(len(events) - 5 * 32 * 32) < 5 * np.sqrt(5 * 32 * 32)
    assert 0.4 < events["p"].mean() < 0.6


def test_refractory_period_spaces_events_of_a_pixel() -> None:
    frames, times = _ramp([0.01, 1.0], shape=(1, 1))  # ~23 crossings within 1 ms
    free = DVSEmulator(eps=1e-9).simulate(frames, times)
    limited = DVSEmulator(eps=1e-9, refractory_us=200).simulate(frames, times)
    assert len(limited) < len(free)
    assert np.diff(limited["t"]).min() >= 200 - 1  # timestamps are rounded to whole microseconds


def test_batch_matches_single_recordings() -> None:
    rng = np.random.default_rng(2)
    videos, times = rng.uniform(size=(3, 6, 5, 7)), np.arange(6) * 1000
    emulator = DVSEmulator(threshold_sigma=0.05)
    batch = emulator.simulate_batch(videos, times)
    for video, events in zip(videos, batch):
        assert np.array_equal(events, emulator.simulate(video, times))


@pytest.mark.parametrize(
    "frames, times, match",
    [
        (np.zeros((1, 4, 4)), [0], "at least 2 frames"),
        (np.zeros((2, 4, 4)), [0, 0], "strictly increasing"),
        (np.full((2, 4, 4), 2.0), [0, 1], r"\[0, 1\]"),
        (np.zeros((2, 4)), [0, 1], r"\[N, H, W\]"),
    ],
)
def test_emulator_rejects_bad_input(frames: np.ndarray, times: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DVSEmulator().simulate(frames, np.asarray(times))


# ------------------------------------------------------------------------------------ events_to_frames


def test_events_to_frames_bins_and_pools() -> None:
    events = events_from_arrays(t=[0, 10, 50, 99], x=[0, 1, 3, 2], y=[0, 0, 1, 3], p=[1, 0, 1, 1])
    frames = events_to_frames(events, (4, 4), T=2, t_start=0, t_end=100)
    assert frames.shape == (2, 2, 4, 4) and frames.dtype == torch.float32
    assert frames[0, 1, 0, 0] == 1 and frames[0, 0, 0, 1] == 1 and frames[1, 1, 1, 3] == 1
    pooled = events_to_frames(events, (4, 4), T=1, out_size=2)
    assert pooled.shape == (1, 2, 2, 2)
    assert pooled[0, 1].tolist() == [[1.0, 1.0], [0.0, 1.0]]
    assert pooled[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 200),
    T=st.integers(1, 7),
    out=st.sampled_from([None, 1, 5, (8, 3), 16]),
    seed=st.integers(0, 2**16),
)
def test_events_to_frames_preserves_the_count(n: int, T: int, out, seed: int) -> None:
    rng = np.random.default_rng(seed)
    events = events_from_arrays(
        rng.integers(0, 10**6, n), rng.integers(0, 16, n), rng.integers(0, 12, n), rng.integers(0, 2, n)
    )
    frames = events_to_frames(events, (16, 12), T, out_size=out)
    assert frames.sum() == n and frames.shape[:2] == (T, 2)


@pytest.mark.parametrize(
    "events, kwargs, match",
    [
        (events_from_arrays([0], [0], [0], [1]), {"T": 0}, "T must be"),
        (events_from_arrays([0], [4], [0], [1]), {"T": 1}, "outside"),
        (events_from_arrays([0], [0], [4], [1]), {"T": 1}, "outside"),
        (events_from_arrays([0], [0], [0], [2]), {"T": 1}, "polarity"),
        (np.zeros(3, dtype=[("t", "<i8"), ("x", "<i4")]), {"T": 1}, "EVENT_DTYPE"),
        (np.zeros((3, 4)), {"T": 1}, "EVENT_DTYPE"),
        (events_from_arrays([0], [0], [0], [1]), {"T": 1, "t_start": 5, "t_end": 5}, "t_end"),
        (events_from_arrays([0], [0], [0], [1]), {"T": 1, "out_size": (0, 2)}, "out_size"),
    ],
)
def test_events_to_frames_rejects_bad_input(events: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        events_to_frames(events, (4, 4), **kwargs)


# --------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> tuple[EventFrames, EventFrames]:
    return load_builtin("digits", "train", disk_cache=False), load_builtin("digits", "test", disk_cache=False)


def test_digits_shapes_and_split(digits: tuple[EventFrames, EventFrames]) -> None:
    train, test = digits
    assert (len(train), len(test)) == (1437, 360)
    assert train.num_classes == 10 and train.input_shape == (2, 32, 32) and train.T == 10
    assert train.frames.shape == (1437, 10, 2, 32, 32) and train.labels.dtype == torch.int64
    x, y = train[0]
    assert x.shape == (10, 2, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.bincount(test.labels).min() >= 35  # stratified: ~36 per class
    train_keys = {bytes(f.numpy()) for f in train.frames}
    assert not train_keys & {bytes(f.numpy()) for f in test.frames}
    again = load_builtin("digits", "test", disk_cache=False)
    assert torch.equal(again.frames, test.frames) and torch.equal(again.labels, test.labels)
    first = load_builtin("digits", "train", n_samples=50, disk_cache=False)
    assert len(first) == 50 and torch.equal(first.frames, train.frames[:50])


def test_digit_events_inside_sensor_with_three_saccades() -> None:
    events, labels = emulated_digits(n_samples=30, sensor_size=(34, 30))
    assert len(events) == 30 and labels.tolist() == list(range(10)) * 3
    assert all(e.dtype == EVENT_DTYPE and len(e) > 500 for e in events)
    assert all(e["x"].max() < 34 and e["y"].max() < 30 for e in events)
    assert all(np.all(np.diff(e["t"]) >= 0) for e in events)
    rate = np.histogram(np.concatenate(events)["t"], bins=30, range=(0, 300_000))[0]
    # Motion stops at the corners of the triangle (0, 100, 200, 300 ms): bursts in between.
    peaks, pauses = rate[[4, 5, 14, 15, 24, 25]], rate[[0, 9, 10, 19, 20, 29]]
    assert peaks.min() > 5 * pauses.max()


def test_digits_are_deterministic_for_a_seed() -> None:
    first, _ = emulated_digits(n_samples=12, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, emulated_digits(n_samples=12, seed=7)[0]))
    assert not all(np.array_equal(a, b) for a, b in zip(first, emulated_digits(n_samples=12, seed=8)[0]))


def test_digits_are_learnable(digits: tuple[EventFrames, EventFrames]) -> None:
    """A linear probe on time-summed counts, area-pooled to 8x8, is far above the 10% chance level."""

    def features(data: EventFrames) -> np.ndarray:
        summed = data.frames.float().sum(1)  # [N, 2, 32, 32]
        return summed.reshape(len(data), 2, 8, 4, 8, 4).sum((3, 5)).flatten(1).numpy()

    train, test = digits
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    with threadpool_limits(1):  # multithreaded BLAS on this small problem is up to 100x slower
        probe.fit(features(train), train.labels.numpy())
    assert probe.score(features(test), test.labels.numpy()) > 0.7


# ------------------------------------------------------------------------------------------- gestures


def _motion_features(frames: torch.Tensor, reach: int = 2) -> np.ndarray:
    """Global flow (x, y), curl and divergence from a correlation motion detector, ``[N, 4]``.

    Counts in bin t at pixel q correlated with counts of the same polarity in bin t+1 at q + d vote
    for a displacement d; curl and divergence weight the votes by the position relative to the event
    centroid. Time-resolved by construction: it compares consecutive bins.
    """
    counts = frames.float().numpy()
    n, _, _, height, width = counts.shape
    before, after = counts[:, :-1], counts[:, 1:]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    mass = counts.sum((1, 2))
    rx = xs - ((mass * xs).sum((1, 2)) / mass.sum((1, 2)))[:, None, None]
    ry = ys - ((mass * ys).sum((1, 2)) / mass.sum((1, 2)))[:, None, None]
    flow_x, flow_y, total = np.zeros((n, height, width)), np.zeros((n, height, width)), np.zeros(n)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            rows, cols = slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx))
            moved = after[..., max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)]
            votes = np.zeros((n, height, width))
            votes[:, rows, cols] = (before[..., rows, cols] * moved).sum((1, 2))
            flow_x, flow_y, total = flow_x + dx * votes, flow_y + dy * votes, total + votes.sum((1, 2))
    curl, div = rx * flow_y - ry * flow_x, rx * flow_x + ry * flow_y
    return np.stack([f.sum((1, 2)) for f in (flow_x, flow_y, curl, div)], 1) / total[:, None]


def test_gestures_classes_shapes_and_learnability() -> None:
    train = load_builtin("gestures", "train", disk_cache=False)
    test = load_builtin("gestures", "test", disk_cache=False)
    assert train.num_classes >= 8 and len(train.class_names) == train.num_classes
    assert (len(train), len(test)) == (1280, 320) and train.input_shape == (2, 32, 32)
    assert torch.bincount(test.labels, minlength=8).min() == 40
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    with threadpool_limits(1):  # 480 / 160 samples are plenty for 4 features, and faster
        probe.fit(_motion_features(train.frames[:480]), train.labels[:480].numpy())
    assert probe.score(_motion_features(test.frames[:160]), test.labels[:160].numpy()) > 0.8  # chance 1/8


def test_gestures_are_deterministic_for_a_seed() -> None:
    first, labels = synthetic_gestures(n_samples=16, seed=1)
    assert sorted(set(labels.tolist())) == list(range(8))
    assert all(np.array_equal(a, b) for a, b in zip(first, synthetic_gestures(n_samples=16, seed=1)[0]))
    assert not all(np.array_equal(a, b) for a, b in zip(first, synthetic_gestures(n_samples=16, seed=2)[0]))


# ---------------------------------------------------------------------------------------- load_builtin


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "mnist"}, "unknown built-in"),
        ({"name": "digits", "split": "val"}, "unknown split"),
        ({"name": "digits", "T": 0}, "T must be"),
        ({"name": "digits", "size": 0}, "size must be"),
        ({"name": "digits", "split": "test", "n_samples": 361, "disk_cache": False}, "n_samples"),
        ({"name": "digits", "n_samples": 0, "disk_cache": False}, "n_samples"),
    ],
)
def test_load_builtin_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_builtin(**kwargs)


@pytest.fixture
def fake_generation(tmp_path, monkeypatch) -> list[tuple]:
    """Caches under tmp_path, a fresh memory cache, and a cheap stand-in generator recording its calls."""
    calls = []

    def generate(name: str, T: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((name, T, size, seed))
        labels = torch.arange(100) % 10
        return labels.reshape(-1, 1, 1, 1, 1).expand(-1, T, 2, size, size).to(torch.uint8), labels

    monkeypatch.setenv("STOPRT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "_generate_frames", generate)
    datasets._cached_frames.cache_clear()
    yield calls
    datasets._cached_frames.cache_clear()


def test_disk_cache_round_trip(fake_generation: list[tuple], tmp_path) -> None:
    fresh = load_builtin("digits", "test", T=3, size=4, seed=1)
    assert fake_generation == [("digits", 3, 4, 1)] and len(fresh) == 20
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]  # no temporary file left behind
    datasets._cached_frames.cache_clear()
    cached = load_builtin("digits", "test", T=3, size=4, seed=1)
    assert len(fake_generation) == 1  # read back from disk
    assert torch.equal(fresh.frames, cached.frames) and torch.equal(fresh.labels, cached.labels)


def test_unreadable_disk_cache_is_regenerated(fake_generation: list[tuple], tmp_path) -> None:
    load_builtin("digits", T=3, size=4, disk_cache=False)
    assert not any(tmp_path.iterdir())  # disk_cache=False writes nothing
    datasets._cached_frames.cache_clear()
    load_builtin("digits", T=3, size=4)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a torch file")
    datasets._cached_frames.cache_clear()
    assert len(load_builtin("digits", T=3, size=4)) == 80 and len(fake_generation) == 3
    assert torch.load(path, weights_only=True)["frames"].shape == (100, 3, 2, 4, 4)  # rewritten


def test_frame_difference_counts_what_the_emulator_emits_per_frame():
    """The two sensor models agree where their docstrings say so: no mismatch, refractory period or
    noise, equal thresholds and eps -> the emulator's events per frame interval are FrameDifference's counts."""
    from stoprt.runtime.stream.encodings import frame_difference
    rng = np.random.default_rng(0)
    frames, times = rng.random((6, 8, 8)), np.arange(6) * 1000
    events = DVSEmulator(threshold_on=0.15, threshold_off=0.15, eps=1e-2, seed=0).simulate(frames, times)
    counts = frame_difference(torch.tensor(frames), threshold=0.15, eps=1e-2)  # [T, 2, H, W]
    assert len(events) > 100
    for k in range(1, len(times)):
        sel = events[(events["t"] > times[k - 1]) & (events["t"] <= times[k])]
        expected = np.zeros((2, 8, 8))
        np.add.at(expected, (sel["p"].astype(int), sel["y"], sel["x"]), 1)
        np.testing.assert_array_equal(counts[k].numpy(), expected)
