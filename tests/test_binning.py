"""Incremental binning (stoprt.runtime.stream.Binner) and the image/video encodings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stoprt.runtime.events import EVENT_DTYPE, events_to_frames
from stoprt.runtime.formats import read_events
from stoprt.runtime.stream import Binner, FileSource, FrameDifference, direct, frame_difference, rate

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dvs"


def stream(rng: np.random.Generator, n: int, w: int = 64, h: int = 48, t_max: int = 100_000,
           t_min: int = 0) -> np.ndarray:
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(t_min, t_max, n))
    ev["x"], ev["y"], ev["p"] = rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n)
    return ev


def push_all(binner: Binner, ev: np.ndarray, sizes: list[int]) -> list:
    steps, i, k = [], 0, 0
    while i < len(ev):
        n = sizes[k % len(sizes)]
        steps += binner.push(ev[i:i + n])
        i, k = i + n, k + 1
    return steps + binner.flush()


@pytest.mark.parametrize("polarity", ["split", "sum"])
def test_time_bins_match_events_to_frames_for_any_packetisation(polarity):
    rng = np.random.default_rng(0)
    ev = stream(rng, 20_000)
    ref = events_to_frames(ev, (64, 48), 50, out_size=(16, 12), t_start=0, t_end=100_000)
    if polarity == "sum":
        ref = ref.sum(1, keepdim=True)
    for sizes in ([1, 7, 500], [20_000], [3333]):
        binner = Binner((64, 48), out_size=(16, 12), dt_us=2000, polarity=polarity, t_start=0)
        steps = push_all(binner, ev, sizes)
        assert len(steps) == 50 and [s.index for s in steps] == list(range(50))
        assert torch.equal(torch.stack([s.frame for s in steps]), ref)
        assert [s.t_start for s in steps] == list(range(0, 100_000, 2000))
        assert sum(s.n_events for s in steps) == len(ev) == binner.stats["events_binned"]
        assert binner.stats["steps"] == 50 and all(torch.equal(s.batch[0], s.frame) for s in steps)


def test_at_most_one_step_is_buffered_and_steps_come_out_as_soon_as_complete():
    rng = np.random.default_rng(1)
    ev = stream(rng, 5000, t_max=50_000)
    binner = Binner((64, 48), dt_us=1000)
    emitted = 0
    for i in range(0, len(ev), 37):
        emitted += len(binner.push(ev[i:i + 37]))
        last = int(ev["t"][min(i + 37, len(ev)) - 1])
        current = (last - int(ev["t"][0])) // 1000
        assert emitted == current  # every step before the last event's step is out, that one is not
        in_current = (ev["t"][:i + 37] - int(ev["t"][0])) // 1000 == current
        assert binner.buffered_events == int(in_current.sum())


def test_a_gap_yields_its_empty_steps_and_empty_frames_are_read_only():
    rng = np.random.default_rng(2)
    ev = np.concatenate([stream(rng, 300, t_max=3000), stream(rng, 300, t_min=13_000, t_max=16_000)])
    binner = Binner((64, 48), dt_us=1000)
    steps = binner.push(ev) + binner.flush()
    t0 = int(ev["t"][0])
    assert [s.t_start for s in steps] == list(range(t0, t0 + 1000 * len(steps), 1000))
    assert steps[-1].t_end > int(ev["t"][-1])
    empty = [s for s in steps if s.n_events == 0]
    assert len(empty) >= 9 and binner.stats["empty_steps"] == len(empty)
    assert all(float(s.frame.abs().sum()) == 0 and s.frame.shape == (2, 48, 64) for s in empty)
    with pytest.raises(RuntimeError):
        empty[0].frame.add_(1)  # shared zero storage: writing needs a clone
    assert float(empty[0].frame.clone().add_(1).sum()) == 2 * 48 * 64


def test_long_gaps_are_capped_and_counted():
    ev = np.zeros(2, dtype=EVENT_DTYPE)
    ev["t"] = [0, 10_000_000]
    binner = Binner((4, 4), dt_us=1000, max_gap_steps=100)
    steps = binner.push(ev)
    assert len(steps) == 101  # the first step and 100 empty ones; the rest is skipped on the grid
    assert binner.stats["gap_steps_skipped"] == 10_000 - 1 - 100
    assert binner.flush()[0].t_start == 10_000_000


def test_count_mode_cuts_every_n_kept_events():
    rng = np.random.default_rng(3)
    ev = stream(rng, 1050)
    binner = Binner((64, 48), mode="count", events_per_step=100)
    steps = push_all(binner, ev, [33, 250])
    assert [s.n_events for s in steps] == [100] * 10 + [50]
    assert steps[0].t_start == ev["t"][0] and steps[0].t_end == ev["t"][99] + 1
    assert steps[-1].t_end == ev["t"][-1] + 1
    assert all(float(s.frame.sum()) == s.n_events for s in steps)


def test_bad_events_are_counted_and_skipped():
    ev = np.zeros(8, dtype=EVENT_DTYPE)
    ev["t"] = [10, 20, 15, 30, 40, 35, 50, 60]  # 15 and 35 go backwards
    ev["x"] = [0, 1, 1, 99, 2, 2, 3, 0]  # x=99 outside the 8x8 sensor
    ev["p"] = [1, 0, 1, 1, 1, 1, 7, 0]  # polarity 7 is invalid
    binner = Binner((8, 8), dt_us=1000)
    steps = binner.push(ev[:4]) + binner.push(ev[4:]) + binner.push(ev[:1]) + binner.flush()
    stats = binner.stats
    assert (stats["backwards"], stats["out_of_bounds"], stats["bad_polarity"]) == (3, 1, 1)
    assert sum(s.n_events for s in steps) == 4 and stats["events_in"] == 9


def test_roi_and_downsampling():
    rng = np.random.default_rng(4)
    ev = stream(rng, 4000)
    binner = Binner((64, 48), out_size=8, roi=(16, 8, 32, 32), dt_us=100_000, t_start=0)
    frame = (binner.push(ev) + binner.flush())[0].frame
    inside = ev[(ev["x"] >= 16) & (ev["x"] < 48) & (ev["y"] >= 8) & (ev["y"] < 40)].copy()
    inside["x"] -= 16
    inside["y"] -= 8
    ref = events_to_frames(inside, (32, 32), 1, out_size=8, t_start=0, t_end=100_000)[0]
    assert torch.equal(frame, ref) and binner.stats["roi_dropped"] == len(ev) - len(inside)


def reference_denoise(ev: np.ndarray, w: int, h: int, dt: int) -> np.ndarray:
    """The classic background-activity filter, one event at a time."""
    last = np.full((h, w), -10**12, dtype=np.int64)
    keep = np.zeros(len(ev), dtype=bool)
    for i, (t, x, y) in enumerate(zip(ev["t"], ev["x"].astype(int), ev["y"].astype(int))):
        nb = [last[y + dy, x + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
              if (dx or dy) and 0 <= x + dx < w and 0 <= y + dy < h]
        keep[i] = t - max(nb) <= dt
        last[y, x] = t
    return keep


def test_denoise_matches_the_classic_filter_across_packets():
    rng = np.random.default_rng(5)
    ev = stream(rng, 3000, w=16, h=12, t_max=200_000)
    keep = reference_denoise(ev, 16, 12, 2000)
    assert 0 < keep.sum() < len(ev)  # the case is not trivial
    binner = Binner((16, 12), dt_us=1000, denoise_us=2000, t_start=0)
    steps = push_all(binner, ev, [1, 50, 200])
    assert binner.stats["denoised"] == int((~keep).sum())
    ref = events_to_frames(ev[keep], (16, 12), 200, t_start=0, t_end=200_000)
    assert torch.equal(torch.stack([s.frame for s in steps]), ref)


def test_hot_pixels_fixed_mask_and_auto_detection():
    rng = np.random.default_rng(6)
    noise = stream(rng, 4000, w=32, h=32, t_max=3_000_000)
    hot = np.zeros(3000, dtype=EVENT_DTYPE)
    hot["t"] = np.linspace(0, 2_999_999, 3000).astype(np.int64)
    hot["x"], hot["y"], hot["p"] = 5, 7, 1
    ev = np.sort(np.concatenate([noise, hot]), order="t", kind="stable")
    mask = np.zeros((32, 32), bool)
    mask[7, 5] = True
    fixed = Binner((32, 32), dt_us=3_000_000, hot_pixels=mask, t_start=0)
    (step,) = fixed.push(ev) + fixed.flush()
    frame = step.frame
    at_hot = int(((noise["x"] == 5) & (noise["y"] == 7)).sum())
    assert frame[:, 7, 5].sum() == 0 and fixed.stats["hot_dropped"] == 3000 + at_hot
    auto = Binner((32, 32), dt_us=1_000_000, hot_pixels="auto", hot_window_us=1_000_000, t_start=0)
    steps = push_all(auto, ev, [500])
    assert steps[0].frame[1, 7, 5] > 900  # the first window is never masked
    assert steps[1].frame[:, 7, 5].sum() == 0 and steps[2].frame[:, 7, 5].sum() == 0
    late_noise = int(((noise["x"] == 5) & (noise["y"] == 7) & (noise["t"] >= 1_000_000)).sum())
    assert auto.stats["hot_pixels"] == 1 and auto.stats["hot_dropped"] == 2000 + late_noise
    noisy = events_to_frames(noise, (32, 32), 3, t_start=0, t_end=3_000_000)
    noisy[:, :, 7, 5] = 0
    assert torch.equal(steps[2].frame, noisy[2])  # ordinary pixels untouched


def test_advance_closes_silent_steps_and_later_earlier_events_count_as_backwards():
    binner = Binner((4, 4), dt_us=1000)
    ev = np.zeros(1, dtype=EVENT_DTYPE)
    ev["t"] = 500
    assert binner.push(ev) == []
    steps = binner.advance(3500)
    assert [(s.t_start, s.n_events) for s in steps] == [(500, 1), (1500, 0), (2500, 0)]
    ev["t"] = 3000
    binner.push(ev)
    assert binner.stats["backwards"] == 1


def test_dtype_device_and_flush_reset():
    ev = np.zeros(3, dtype=EVENT_DTYPE)
    ev["t"] = [0, 1, 2]
    binner = Binner((4, 4), dt_us=1000, dtype=torch.float16)
    (step,) = binner.push(ev) + binner.flush()
    assert step.frame.dtype == torch.float16 and step.frame.device.type == "cpu"
    ev["t"] = [10**9, 10**9 + 1, 10**9 + 2]  # a new stream after flush: no gap steps back to the old grid
    assert [s.t_start for s in binner.push(ev) + binner.flush()] == [10**9]


def test_configuration_and_input_errors_are_clear():
    with pytest.raises(ValueError, match="mode"):
        Binner((4, 4), mode="space")
    with pytest.raises(ValueError, match="roi"):
        Binner((4, 4), roi=(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(H, W\) = \(3, 4\)"):
        Binner((4, 3), hot_pixels=np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="dt_us"):
        Binner((4, 4), dt_us=0)
    with pytest.raises(ValueError, match="EVENT_DTYPE"):
        Binner((4, 4)).push(np.zeros(3))


def test_real_recording_through_file_source_matches_offline_binning():
    path = FIXTURES / "evt3_sample.raw"
    if not path.exists():
        pytest.skip(f"fixture {path} is absent (real recordings live in ../shared/fixtures/dvs, see SOURCES.md)")
    events = read_events(path)
    t0, t1 = int(events["t"][0]), int(events["t"][-1]) + 1
    T = -(-(t1 - t0) // 5000)
    ref = events_to_frames(events, (1280, 720), T, out_size=(80, 45), t_start=t0, t_end=t0 + T * 5000)
    with FileSource(path, packet_us=1000) as source:
        binner = Binner(source.sensor_size, out_size=(80, 45), dt_us=5000)
        steps = [s for packet in source for s in binner.push(packet)] + binner.flush()
    assert len(steps) == T and torch.equal(torch.stack([s.frame for s in steps]), ref)


# ----------------------------------------------------------------------------------------- encodings


def test_direct_and_rate_encodings():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert direct(image, 5).shape == (5, 3, 8, 8) and torch.equal(direct(image, 5)[4], image)
    spikes = rate(image, 2000, seed=1)
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(spikes.mean(0), image, atol=0.05)
    assert torch.equal(spikes, rate(image, 2000, seed=1)) and not torch.equal(spikes, rate(image, 2000, seed=2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rate(image * 2, 3)
    with pytest.raises(ValueError, match="T must be"):
        direct(image, 0)


def test_frame_difference_emits_on_and_off_counts():
    video = torch.full((4, 1, 2, 2), 0.1)
    video[1, 0, 0, 0] = 0.9  # a rise of log(0.91 / 0.11) = 2.11: 14 thresholds of 0.15
    video[2, 0, 0, 0] = 0.1  # and back down
    out = frame_difference(video, threshold=0.15)
    assert out.shape == (4, 2, 2, 2) and float(out[0].sum()) == 0
    assert out[1, 1, 0, 0] == 14 and out[1, 0, 0, 0] == 0 and float(out[1].sum()) == 14
    assert out[2, 0, 0, 0] == 14 and out[2, 1, 0, 0] == 0
    assert float(out[3].sum()) == 0
    binary = FrameDifference(threshold=0.15, counts=False)
    assert [float(binary(f).sum()) for f in video] == [0.0, 1.0, 1.0, 0.0]
    rgb = torch.rand(3, 4, 4)
    assert FrameDifference()(rgb).shape == (2, 4, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["views", "converted-copies"])
def test_frames_of_one_packet_are_separate_and_a_step_across_packets_sums_both(dtype):
    """float32 CPU frames are views of the counts; other dtypes (and GPUs) get one converted copy of
    each block, which must not miss the events a later packet adds to the step left open."""
    rng = np.random.default_rng(7)
    ev = stream(rng, 6000)
    whole = Binner((64, 48), out_size=(16, 12), dt_us=2000, t_start=0, dtype=dtype)
    ref = [s.frame.clone() for s in whole.push(ev) + whole.flush()]
    binner = Binner((64, 48), out_size=(16, 12), dt_us=2000, t_start=0, dtype=dtype)
    cut = int(np.searchsorted(ev["t"], 51_000))  # inside step 25: its events come in two packets
    steps = binner.push(ev[:cut])
    steps[0].frame += 100  # a consumer writing into its frame changes no other step
    steps += binner.push(ev[cut:]) + binner.flush()
    assert len(steps) == len(ref) == 50
    assert torch.equal(steps[0].frame, ref[0] + 100)
    assert all(torch.equal(s.frame, r) and s.frame.dtype == dtype for s, r in zip(steps[1:], ref[1:]))
    assert steps[25].n_events > int(np.searchsorted(ev["t"], 51_000) - np.searchsorted(ev["t"], 50_000))


@pytest.mark.parametrize("frames,dtype", [("torch", None), ("torch", torch.float16), ("numpy", None)])
def test_each_step_brings_its_frame_as_a_batch_of_one_in_the_same_memory(frames, dtype):
    """``step.batch`` is ``frame[None]``: for blocks of steps cut from one packet, for steps summed
    across packets, for frames converted per step (float16) and for empty steps."""
    rng = np.random.default_rng(3)
    ev = stream(rng, 4000, t_max=60_000)
    ev["t"][2000:] += 30_000  # a silent stretch: empty steps
    binner = Binner((64, 48), out_size=(16, 12), dt_us=2000, t_start=0, frames=frames,
                    **({} if dtype is None else {"dtype": dtype}))
    steps = push_all(binner, ev, [1500, 700, 1800])
    assert any(s.n_events == 0 for s in steps) and any(s.n_events for s in steps)
    for s in steps:
        assert tuple(s.batch.shape) == (1, *s.frame.shape) == (1, 2, 12, 16)
        if frames == "numpy":
            assert np.shares_memory(s.batch, s.frame) and np.array_equal(s.batch[0], s.frame)
        else:
            assert s.batch.dtype == s.frame.dtype and s.batch[0].data_ptr() == s.frame.data_ptr()
            assert torch.equal(s.batch[0], s.frame)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the copies to it are the subject)")
def test_frames_reach_a_gpu_one_block_at_a_time_without_a_stream_sync():
    """A copy from pageable memory waits for the GPU's queue: frames go through pinned memory,
    non-blocking, so binning while the GPU works makes no synchronising call."""
    rng = np.random.default_rng(11)
    ev = stream(rng, 6000)
    ref = [s.frame for s in push_all(Binner((64, 48), out_size=(16, 12), dt_us=2000, t_start=0), ev, [2500, 3500])]
    gpu = Binner((64, 48), out_size=(16, 12), dt_us=2000, t_start=0, device="cuda")
    busy = torch.randn(2048, 2048, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        _ = busy @ busy  # queued work the copies must not wait for
        steps = gpu.push(ev[:2500]) + gpu.push(ev[2500:]) + gpu.flush()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(steps) == len(ref) and all(s.frame.is_cuda and s.batch.is_cuda for s in steps)
    assert all(torch.equal(s.frame.cpu(), r) for s, r in zip(steps, ref))


def test_roi_and_downsampling_that_does_not_divide():
    rng = np.random.default_rng(5)
    ev = stream(rng, 4000)
    binner = Binner((64, 48), out_size=(7, 5), roi=(3, 5, 20, 17), dt_us=100_000, t_start=0)
    frame = (binner.push(ev) + binner.flush())[0].frame
    inside = ev[(ev["x"] >= 3) & (ev["x"] < 23) & (ev["y"] >= 5) & (ev["y"] < 22)].copy()
    inside["x"] -= 3
    inside["y"] -= 5
    ref = events_to_frames(inside, (20, 17), 1, out_size=(7, 5), t_start=0, t_end=100_000)[0]
    assert torch.equal(frame, ref) and binner.stats["roi_dropped"] == len(ev) - len(inside)
