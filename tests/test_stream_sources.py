"""Stream sources (file, UDP over loopback, cameras) and the decoupled StreamPipeline."""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from stoprt.runtime.events import EVENT_DTYPE, events_to_frames
from stoprt.runtime.formats import AEDAT3Writer, EventFormatError, read_events
from stoprt.runtime.stream import (Binner, CameraError, DVProcessingSource, FileSource, MissingExtraError,
                                   NeuromorphicDriversSource, StreamPipeline, UDPSender, UDPSource)
from stoprt.runtime.stream.cameras import convert_events

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dvs"


def random_events(n: int, w: int = 128, h: int = 128, t_max: int = 200_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, t_max, n))
    ev["x"], ev["y"], ev["p"] = rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n)
    return ev


@pytest.fixture
def recording(tmp_path) -> tuple[Path, np.ndarray]:
    ev = random_events(20_000)
    path = tmp_path / "rec.aedat"
    with AEDAT3Writer(path, packet_events=500) as writer:
        writer.write(ev)
    return path, ev


# ---------------------------------------------------------------------------------------- FileSource


def test_file_source_cuts_time_packets_and_streams(recording):
    path, ev = recording
    with FileSource(path, packet_us=1000, chunk_size=4096) as source:
        assert source.sensor_size == (128, 128) and not source.live
        it = iter(source)
        first = next(it)
        assert source.stats["reader"]["bytes_read"] < path.stat().st_size / 4  # not read whole
        packets = [first, *it]
    t0 = int(ev["t"][0])
    windows = [np.unique((p["t"] - t0) // 1000) for p in packets]
    assert all(len(w) == 1 for w in windows) and np.all(np.diff([w[0] for w in windows]) > 0)
    assert np.array_equal(np.concatenate(packets), ev)
    assert source.stats["packets"] == len(packets) and source.stats["events"] == len(ev)


def test_file_source_count_packets(recording):
    path, ev = recording
    packets = list(FileSource(path, packet_events=3000))
    assert [len(p) for p in packets] == [3000] * 6 + [2000]
    assert np.array_equal(np.concatenate(packets), ev)


def test_file_source_counts_skipped_events_and_replays(recording):
    path, ev = recording
    source = FileSource(path, packet_us=5000, sensor_size=(64, 64))  # smaller than the recording's sensor
    inside = ev[(ev["x"] < 64) & (ev["y"] < 64)]
    assert np.array_equal(np.concatenate(list(source)), inside)
    assert source.stats["skipped_events"] == len(ev) - len(inside) == source.stats["reader"]["out_of_bounds"]
    assert np.array_equal(np.concatenate(list(source)), inside)  # a second iteration replays the file
    assert source.stats["skipped_events"] == 2 * (len(ev) - len(inside))
    strict = FileSource(path, sensor_size=(64, 64), errors="raise")
    with pytest.raises(EventFormatError, match="outside the 64x64 sensor"):
        list(strict)


def test_file_source_realtime_pacing_and_prompt_close(tmp_path):
    ev = random_events(400, t_max=200_000)
    path = tmp_path / "short.aedat"
    with AEDAT3Writer(path) as writer:
        writer.write(ev)
    start = time.monotonic()
    assert sum(len(p) for p in FileSource(path, packet_us=20_000, realtime=True, speed=2.0)) == 400
    span = (int(ev["t"][-1]) - int(ev["t"][0])) / 1e6 / 2.0
    assert time.monotonic() - start >= 0.9 * span
    source = FileSource(path, packet_us=20_000, realtime=True, speed=0.01)  # would take ~20 s
    threading.Timer(0.2, source.close).start()
    start = time.monotonic()
    list(source)
    assert time.monotonic() - start < 2.0


def test_file_source_loops_with_increasing_time(recording):
    path, ev = recording
    source = FileSource(path, packet_events=7000, loop=True)
    packets = []
    for packet in source:
        packets.append(packet)
        if len(packets) == 10:
            break
    source.close()
    t = np.concatenate(packets)["t"]
    assert np.all(np.diff(t) >= 0) and source.stats["loops"] >= 2
    span = int(ev["t"][-1]) + 1 - int(ev["t"][0])
    assert np.array_equal(np.concatenate(packets)[20_000:20_010]["t"], ev["t"][:10] + span)


def test_file_source_errors(tmp_path, recording):
    with pytest.raises(OSError):
        FileSource(tmp_path / "missing.aedat")
    bad = tmp_path / "bad.aedat"
    bad.write_bytes(b"#!AER-DAT9.9\r\n")
    with pytest.raises(EventFormatError, match="unsupported AEDAT version"):
        FileSource(bad)
    with pytest.raises(ValueError, match="not both"):
        FileSource(recording[0], packet_us=10, packet_events=10)
    with pytest.raises(ValueError, match="speed"):
        FileSource(recording[0], speed=0)


def test_file_source_reads_the_real_nmnist_sample():
    path = FIXTURES / "sample_nmnist.bin"
    if not path.exists():
        pytest.skip(f"fixture {path} is absent (real recordings live in ../shared/fixtures/dvs, see SOURCES.md)")
    source = FileSource(path, packet_us=10_000, sensor_size=(34, 34))
    assert source.sensor_size == (34, 34)
    assert np.array_equal(np.concatenate(list(source)), read_events(path))


# ------------------------------------------------------------------------------------------------ UDP


def receive(source: UDPSource, n_events: int, timeout_s: float = 5.0) -> np.ndarray:
    got, deadline = [], time.monotonic() + timeout_s
    for packet in source:
        got.append(packet)
        if sum(map(len, got)) >= n_events or time.monotonic() > deadline:
            break
    return np.concatenate(got) if got else np.zeros(0, EVENT_DTYPE)


def test_udp_spif_over_loopback():
    ev = random_events(3000)
    with UDPSource(port=0, format="spif", sensor_size=(128, 128), timeout_s=2.0) as source:
        assert source.host == "127.0.0.1" and source.live
        with UDPSender(port=source.port, format="spif", max_events=256) as sender:
            assert sender.send(ev) == 12
        got = receive(source, len(ev))
    assert len(got) == len(ev) and source.stats["packets"] == 12
    for field in ("x", "y", "p"):
        assert np.array_equal(got[field], ev[field])
    assert np.all(np.diff(got["t"]) >= 0)  # receive-time stamps


def test_udp_stoprt_keeps_timestamps_and_counts_lost_datagrams():
    ev = random_events(2000)
    with UDPSource(port=0, format="stoprt", timeout_s=2.0) as source:
        with UDPSender(port=source.port, format="stoprt", max_events=500) as sender:
            sender.send(ev[:1000])
            sender.sequence += 3  # three datagrams "lost" on the way
            sender.send(ev[1000:])
        got = receive(source, len(ev))
    assert np.array_equal(got, ev)
    assert source.stats["lost_packets"] == 3 and source.stats["garbage_packets"] == 0


@pytest.mark.parametrize("fmt", ["spif", "stoprt"])
def test_udp_garbage_is_counted_and_skipped(fmt):
    ev = random_events(100, w=64, h=64)
    ev["x"][:10] = 100  # outside the 64x64 sensor
    with UDPSource(port=0, format=fmt, sensor_size=(64, 64), timeout_s=1.0) as source:
        with UDPSender(port=source.port, format=fmt) as sender:
            for junk in (b"", b"abc", b"STEV\x01\x00\x05\x00\x00\x00\x00\x00" + b"x" * 13, b"\xff" * 4097):
                sender.send_raw(junk)
            if fmt == "stoprt":
                bad = ev[:5].copy()
                bad["p"] = 3
                sender.send(bad)
            sender.send(ev)
        got = receive(source, 90)
    stats = source.stats
    assert len(got) == 90 and stats["out_of_bounds"] == 10
    assert stats["garbage_packets"] == 4  # empty, short, bad length, not whole words / bad header
    if fmt == "stoprt":
        assert stats["bad_events"] == 5


def test_udp_port_in_use_and_prompt_close():
    with UDPSource(port=0) as first:
        with pytest.raises(OSError, match=f"127.0.0.1:{first.port}"):
            UDPSource(port=first.port)
    source = UDPSource(port=0)  # no timeout: waits until closed
    threading.Timer(0.2, source.close).start()
    start = time.monotonic()
    assert list(source) == []
    assert time.monotonic() - start < 2.0


# -------------------------------------------------------------------------------------------- cameras


def test_camera_sources_name_their_extra_when_the_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "dv_processing", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "neuromorphic_drivers", None)
    with pytest.raises(MissingExtraError, match=r"stoprt\[dv\]"):
        DVProcessingSource()
    with pytest.raises(MissingExtraError, match=r"stoprt\[nd\]"):
        NeuromorphicDriversSource()


@pytest.mark.parametrize("module, cls", [("dv_processing", DVProcessingSource),
                                         ("neuromorphic_drivers", NeuromorphicDriversSource)])
def test_camera_sources_without_a_camera(module, cls):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (optional extra); the missing-package error is tested above")
    with pytest.raises(CameraError, match="no .*camera found"):
        cls()


def test_driver_batches_convert_to_event_dtype():
    dv_like = np.zeros(3, dtype=[("timestamp", "<i8"), ("x", "<i2"), ("y", "<i2"), ("polarity", "i1")])
    dv_like["timestamp"], dv_like["x"], dv_like["y"], dv_like["polarity"] = [5, 6, 7], [1, 2, 3], [4, 5, 6], [1, 0, 1]
    ev = convert_events(dv_like, t="timestamp")
    assert ev.dtype == EVENT_DTYPE and ev["t"].tolist() == [5, 6, 7] and ev["p"].tolist() == [1, 0, 1]
    nd_like = np.zeros(2, dtype=[("t", "<u8"), ("x", "<u2"), ("y", "<u2"), ("on", "?")])
    nd_like["on"] = [True, False]
    assert convert_events(nd_like)["p"].tolist() == [1, 0]
    with pytest.raises(CameraError, match="polarity"):
        convert_events(np.zeros(1, dtype=[("t", "<u8"), ("x", "<u2"), ("y", "<u2")]))


def test_dv_processing_source_reads_batches_through_the_documented_api(monkeypatch):
    """A stand-in for dv_processing with the calls the source makes (discover, open, batches)."""
    batch = np.zeros(4, dtype=[("timestamp", "<i8"), ("x", "<i2"), ("y", "<i2"), ("polarity", "i1")])
    batch["timestamp"], batch["x"], batch["polarity"] = [10, 11, 12, 13], [0, 1, 2, 3], [1, 1, 0, 0]

    class Store:
        def size(self):
            return len(batch)

        def numpy(self):
            return batch

    class Camera:  # dv-processing's method names
        batches = [None, Store(), Store()]  # None: no data yet

        def isEventStreamAvailable(self):  # noqa: N802
            return True

        def getCameraName(self):  # noqa: N802
            return "DVXplorer_fake"

        def getEventResolution(self):  # noqa: N802
            return (640, 480)

        def isRunning(self):  # noqa: N802
            return bool(self.batches)

        def getNextEventBatch(self):  # noqa: N802
            return self.batches.pop(0)

    camera = types.SimpleNamespace(discover=lambda: ["descriptor"], open=lambda *a: Camera())
    monkeypatch.setitem(sys.modules, "dv_processing", types.SimpleNamespace(io=types.SimpleNamespace(camera=camera)))
    with DVProcessingSource(poll_s=0.0) as source:
        assert source.sensor_size == (640, 480) and source.name == "DVXplorer_fake"
        packets = list(source)
    assert len(packets) == 2 and packets[0]["t"].tolist() == [10, 11, 12, 13]
    assert source.stats == {"packets": 2, "events": 8}


def test_neuromorphic_drivers_source_reads_packets_through_the_documented_api(monkeypatch):
    """A stand-in for neuromorphic_drivers: list_devices, open, (status, packet) iteration."""
    events = np.zeros(3, dtype=[("t", "<u8"), ("x", "<u2"), ("y", "<u2"), ("on", "?")])
    events["t"], events["x"], events["on"] = [100, 200, 300], [1, 2, 3], [True, False, True]
    full = types.SimpleNamespace(polarity_events=events, polarity_events_overflow_indices=np.array([1]))
    idle = types.SimpleNamespace(polarity_events=None, polarity_events_overflow_indices=None)
    closed = []

    class Device:
        def __iter__(self):
            return iter([(None, None), (None, idle), (None, full)])  # None: the iterator timed out

        def name(self):
            return types.SimpleNamespace(value="prophesee_evk4")

        def properties(self):
            return types.SimpleNamespace(width=1280, height=720)

        def close(self):
            closed.append(True)

    nd = types.SimpleNamespace(list_devices=lambda: ["evk4"], open=lambda **kwargs: Device())
    monkeypatch.setitem(sys.modules, "neuromorphic_drivers", nd)
    with NeuromorphicDriversSource() as source:
        assert source.sensor_size == (1280, 720) and source.name == "prophesee_evk4"
        (packet,) = list(source)
    assert packet["t"].tolist() == [100, 200, 300] and packet["p"].tolist() == [1, 0, 1]
    assert source.stats == {"packets": 1, "events": 3, "overflows": 1} and closed == [True]


# ------------------------------------------------------------------------------------------- pipeline


def direct_steps(ev: np.ndarray, dt: int) -> torch.Tensor:
    t0 = int(ev["t"][0])
    T = (int(ev["t"][-1]) - t0) // dt + 1
    return events_to_frames(ev, (128, 128), T, out_size=16, t_start=t0, t_end=t0 + T * dt)


def test_pipeline_delivers_every_step_with_back_pressure(recording):
    path, ev = recording
    pipe = StreamPipeline(FileSource(path, packet_us=700), Binner((128, 128), 16, dt_us=5000), max_queue_steps=2)
    assert not pipe.realtime  # a file replayed as fast as possible is not live
    with pipe:
        steps = []
        for step in pipe:
            time.sleep(0.002)  # a slow consumer: the producer must wait, not drop
            steps.append(step)
    assert torch.equal(torch.stack([s.frame for s in steps]), direct_steps(ev, 5000))
    stats = pipe.stats
    assert stats["steps_dropped"] == 0 and stats["steps_produced"] == stats["steps_consumed"] == len(steps)
    assert stats["queue_peak"] <= 2 and stats["events"] == len(ev) and stats["realtime_factor"] > 0
    assert stats["stream_s"] == pytest.approx(len(steps) * 5000 / 1e6)


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("drop, kept", [("oldest", [8, 9]), ("newest", [0, 1])])
def test_realtime_pipeline_drops_whole_steps_by_policy(drop, kept):
    packets = [random_events(50, t_max=1000, seed=i) for i in range(10)]
    for i, p in enumerate(packets):
        p["t"] += i * 1000  # one packet per 1 ms step
    pipe = StreamPipeline(packets, Binner((128, 128), dt_us=1000, t_start=0), max_queue_steps=2, drop=drop,
                          realtime=True)
    pipe.start()
    wait_for(lambda: pipe.stats["steps_produced"] == 10)  # the consumer has not taken anything yet
    steps = list(pipe)
    assert [s.index for s in steps] == kept
    assert pipe.stats["steps_dropped"] == 8 and pipe.stats["steps_consumed"] == 2


def test_producer_errors_reach_the_consumer_after_the_queued_steps():
    def failing():
        for i in range(2):
            ev = random_events(10, t_max=1000, seed=i)
            ev["t"] += i * 1000
            yield ev
        raise ValueError("corrupt packet 3 from the camera")

    pipe = StreamPipeline(failing(), Binner((128, 128), dt_us=1000, t_start=0))
    got = []
    with pytest.raises(ValueError, match="corrupt packet 3 from the camera"):
        for step in pipe:
            got.append(step.index)
    assert got == [0]  # the step completed before the failure; the partial one is not flushed
    pipe.close()


def test_pipeline_close_stops_a_live_source_and_times_out_politely():
    source = UDPSource(port=0, sensor_size=(128, 128))
    pipe = StreamPipeline(source, Binner((128, 128), dt_us=1000)).start()
    assert pipe.realtime  # UDP is live
    assert pipe.next_step(timeout_s=0.1) is None  # nothing arrived
    start = time.monotonic()
    pipe.close()
    assert time.monotonic() - start < 2.0 and source.closed
    assert pipe.next_step() is None and not pipe._thread.is_alive()


def test_pipeline_end_to_end_over_udp():
    ev = random_events(5000, t_max=50_000)
    source = UDPSource(port=0, format="stoprt", sensor_size=(128, 128), timeout_s=1.0)
    with StreamPipeline(source, Binner((128, 128), 16, dt_us=5000), max_queue_steps=64) as pipe:
        with UDPSender(port=source.port, format="stoprt", max_events=400) as sender:
            sender.send(ev)
        steps = list(pipe)
    assert sum(s.n_events for s in steps) == len(ev) and pipe.stats["steps_dropped"] == 0
    assert torch.equal(torch.stack([s.frame for s in steps]), direct_steps(ev, 5000))


def test_sockets_are_bounded():
    with UDPSource(port=0, rcvbuf_bytes=1 << 16) as source:
        size = source._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert size <= 4 * (1 << 16)  # Linux doubles the requested size for bookkeeping
