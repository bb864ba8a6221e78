"""The built-in stream: rendered once into the cache, cut into packets up front, and started
without scikit-learn."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stoprt.runtime import datasets
from stoprt.runtime.stream import Binner, StreamPipeline
from stoprt.runtime.stream import builtin
from stoprt.runtime.stream.builtin import BuiltinStream


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STOPRT_CACHE_DIR", str(tmp_path))
    return tmp_path


def steps_of(source, dt_us=30_000):
    with StreamPipeline(source, Binner(source.sensor_size, out_size=16, dt_us=dt_us)) as pipe:
        return [(s.t_start, s.t_end, s.n_events, s.frame.clone()) for s in pipe]


def test_whole_recording_packets_give_the_steps_of_1ms_packets(cache):
    coarse, fine = BuiltinStream("digits", n_samples=4), BuiltinStream("digits", n_samples=4, packet_us=1000)
    assert len(list(BuiltinStream("digits", n_samples=4))) == 1  # whole recordings, up to eight per packet
    assert len(list(BuiltinStream("digits", n_samples=4, packet_us=1000))) > 100
    a, b = steps_of(coarse), steps_of(fine)
    assert len(a) == len(b) > 30
    for (t0, t1, n, f), (u0, u1, m, g) in zip(a, b):
        assert (t0, t1, n) == (u0, u1, m) and torch.equal(f, g)
    assert [s.label for s in coarse.labels.segments] == [s.label for s in fine.labels.segments]


def test_packets_match_the_recordings_on_the_time_line(cache):
    source = BuiltinStream("gestures", n_samples=3, gap_us=5000, packet_us=2000)
    want, bounds, _ = builtin.recordings("gestures", 3, (32, 32), 200_000, 0)
    packets = list(source)
    got = np.concatenate(packets)
    want["t"] += np.repeat(np.arange(3) * 205_000, np.diff(bounds))
    assert np.array_equal(got, want)
    assert all(p["t"][-1] - p["t"][0] < 2000 for p in packets)
    assert not packets[0].flags.writeable  # views of the shared stream: the consumer cannot corrupt a lap


def test_loop_keeps_time_increasing(cache):
    source = BuiltinStream("digits", n_samples=2, loop=True)
    packets = []
    for p in source:
        packets.append(p)
        if len(packets) == 5:
            source.close()
    t = np.concatenate(packets)["t"]
    assert len(packets) == 5 and np.all(np.diff(t) >= 0)
    assert [s.start_us for s in source.labels.segments][:5] == [k * 320_000 for k in range(5)]


def test_recordings_come_from_the_cache_the_second_time(cache, monkeypatch):
    first = BuiltinStream("digits", n_samples=3)
    assert any(cache.glob("stream-digits-*.npz"))
    monkeypatch.setattr(datasets, "emulated_digits", lambda **kw: pytest.fail("rendered again"))
    second = BuiltinStream("digits", n_samples=3)
    assert np.array_equal(np.concatenate(list(first)), np.concatenate(list(second)))


def test_a_damaged_cache_file_is_rendered_again(cache):
    BuiltinStream("digits", n_samples=2)
    for path in cache.glob("stream-digits-*.npz"):
        path.write_bytes(b"not a zip")
    assert len(np.concatenate(list(BuiltinStream("digits", n_samples=2)))) > 1000  # rendered, played


def test_digit_images_are_scikit_learns(cache):
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = datasets.digit_images()  # first call: from scikit-learn, then cached
    again, _ = datasets.digit_images()
    assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)
    assert np.array_equal(again, images) and (cache / "sklearn-digits-v1.npz").is_file()


def test_the_stream_starts_without_scikit_learn(cache):
    code = ("import sys; from stoprt.runtime.stream.builtin import BuiltinStream; "
            "BuiltinStream('digits', n_samples=2); BuiltinStream('gestures', n_samples=2); "
            "print(sorted(m for m in ('sklearn', 'scipy', 'onnx') if m in sys.modules))")
    BuiltinStream("digits", n_samples=2), BuiltinStream("gestures", n_samples=2)  # fill the cache here
    env = {**os.environ, "STOPRT_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert done.stdout.strip() == "[]"


def test_an_in_memory_source_is_binned_without_a_thread(cache):
    import threading
    threads = threading.active_count()
    inline = StreamPipeline(BuiltinStream("digits", n_samples=3), Binner((32, 32), out_size=16, dt_us=30_000))
    assert not inline.threaded
    with inline:
        got = [(s.t_start, s.n_events, s.frame.clone()) for s in inline]
        assert threading.active_count() == threads
    threaded = StreamPipeline(BuiltinStream("digits", n_samples=3), Binner((32, 32), out_size=16, dt_us=30_000),
                              thread=True)
    with threaded:
        want = [(s.t_start, s.n_events, s.frame.clone()) for s in threaded]
    assert len(got) == len(want) > 20
    assert all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(got, want))
    assert inline.stats["steps_produced"] == inline.stats["steps_consumed"] == len(got)
    assert inline.stats["events"] == threaded.stats["events"] > 0


class _Failing(BuiltinStream):
    def _packets(self):
        packets = super()._packets()
        yield next(packets)
        raise OSError("sensor unplugged")


@pytest.mark.parametrize("thread", [False, True])
def test_a_source_error_reaches_the_consumer_after_its_steps(cache, thread):
    pipe = StreamPipeline(_Failing("digits", n_samples=2, packet_us=400_000),  # a packet per recording
                          Binner((32, 32), out_size=16, dt_us=30_000), thread=thread)
    assert pipe.threaded == thread
    steps = []
    with pytest.raises(OSError, match="unplugged"):
        for step in pipe:
            steps.append(step)
    assert len(steps) == 9  # the first recording's completed steps (300 ms from its first event, 30 ms each)
    assert pipe.source.closed and pipe.next_step() is None


def test_closing_an_inline_pipeline_stops_it(cache):
    source = BuiltinStream("digits", n_samples=2, loop=True)
    pipe = StreamPipeline(source, Binner((32, 32), out_size=16, dt_us=30_000))
    assert pipe.next_step() is not None
    pipe.close()
    assert source.closed and pipe.next_step() is None


def test_the_cache_reads_back_what_was_saved(tmp_path):
    from stoprt.runtime.cache import load_npz, save_npz
    from stoprt.runtime.events import EVENT_DTYPE
    events = np.zeros(5, EVENT_DTYPE)
    events["t"], events["x"], events["p"] = np.arange(5) * 7, np.arange(5), [0, 1, 1, 0, 1]
    arrays = {"events": events, "bounds": np.array([0, 2, 5]), "grid": np.asfortranarray(np.arange(6.0).reshape(2, 3))}
    save_npz(tmp_path / "a.npz", **arrays)
    got = load_npz(tmp_path / "a.npz")
    assert sorted(got) == sorted(arrays)
    for name, want in arrays.items():
        assert got[name].dtype == want.dtype and np.array_equal(got[name], want) and got[name].flags.writeable
    data = bytearray((tmp_path / "a.npz").read_bytes())
    data[len(data) // 3] ^= 0xFF  # a flipped byte fails the zip's checksum: a miss, not wrong data
    (tmp_path / "b.npz").write_bytes(bytes(data))
    assert load_npz(tmp_path / "b.npz") is None


@pytest.mark.parametrize("start_us", [0, 1_000_000])
def test_whole_recordings_come_eight_to_a_packet_after_their_labels(cache, start_us):
    grouped = BuiltinStream("digits", n_samples=20, start_us=start_us)
    single = BuiltinStream("digits", n_samples=20, start_us=start_us, packet_us=400_000)  # one per recording
    packets = []
    for p in grouped:
        packets.append(p)
        started = (int(p["t"][-1]) // 320_000) + 1  # recordings begun by the packet's last event
        assert [s.start_us for s in grouped.labels.segments][-1] == (started - 1) * 320_000
    assert len(packets) == 3  # 20 recordings (or the 17 the seek leaves), 8 to a packet
    assert np.array_equal(np.concatenate(packets), np.concatenate(list(single)))
    a, b = steps_of(BuiltinStream("digits", n_samples=20, start_us=start_us)), steps_of(
        BuiltinStream("digits", n_samples=20, start_us=start_us, packet_us=400_000))
    assert len(a) == len(b) > 100
    assert all(x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a, b))
    assert [s.label for s in grouped.labels.segments] == [s.label for s in single.labels.segments]
