"""Event-file readers and writers (stoprt.runtime.formats): real fixtures, round trips, bad input."""

from __future__ import annotations

import importlib
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stoprt.runtime.events import EVENT_DTYPE
from stoprt.runtime.formats import (READERS, WRITERS, AEDAT2Reader, AEDAT3Reader, AEDAT3Writer, AEDAT4Reader,
                                    DATReader, EVT2Reader, EVT3Reader, EVT3Writer, EventFormatError,
                                    NMNISTReader, NMNISTWriter, detect_format, open_events, read_events,
                                    write_events)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dvs"


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {path} is absent (real recordings live in ../shared/fixtures/dvs, see SOURCES.md)")
    return path


def random_events(rng: np.random.Generator, n: int, w: int, h: int, t_max: int, t_min: int = 0,
                  max_step: int | None = None) -> np.ndarray:
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    if max_step is None:
        ev["t"] = np.sort(rng.integers(t_min, t_max, n))
    else:
        ev["t"] = t_min + np.cumsum(rng.integers(0, max_step, n))
    ev["x"] = rng.integers(0, w, n)
    ev["y"] = rng.integers(0, h, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


def row_bursts(rng: np.random.Generator, n_bursts: int, w: int, h: int) -> np.ndarray:
    """Bursts of events on one row at one time with increasing x: EVT 3.0 vector material."""
    parts = []
    t = 0
    for _ in range(n_bursts):
        k = int(rng.integers(1, 30))
        xs = np.unique(rng.integers(0, min(w, 60), k)) + int(rng.integers(0, w - 60))
        ev = np.zeros(len(xs), dtype=EVENT_DTYPE)
        t += int(rng.integers(0, 3000))
        ev["t"], ev["x"], ev["y"], ev["p"] = t, xs, rng.integers(0, h), rng.integers(0, 2)
        parts.append(ev)
    return np.concatenate(parts)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) == len(b) and all(np.array_equal(a[k].astype(np.int64), b[k].astype(np.int64)) for k in "txyp")


# (writer kwargs, reader name, width, height, how to draw timestamps: (t_min, t_max or None, max_step))
CASES: dict[str, tuple[dict[str, Any], str, int, int, tuple[int, int | None, int | None]]] = {
    "nmnist": ({}, "nmnist", 34, 34, (0, (1 << 23) - 1, None)),
    "aedat2-dvs128": ({}, "aedat2", 128, 128, ((1 << 32) - 50_000, None, 1 << 12)),  # crosses 2**32
    "aedat2-davis": ({"layout": "davis"}, "aedat2", 346, 260, (0, None, 1 << 30)),  # several wraps
    "aedat3": ({"packet_events": 97}, "aedat3", 128, 128, ((1 << 31) - 30_000, None, 1 << 10)),  # overflow
    "aedat3-far": ({}, "aedat3", 128, 128, (0, None, 1 << 29)),  # overflow counter up to tens
    "evt2": ({"width": 640, "height": 480}, "evt2", 640, 480, ((1 << 34) - 20_000, None, 1 << 5)),  # 34-bit wrap
    "evt3": ({}, "evt3", 1280, 720, (0, 1 << 30, None)),  # many 24-bit wraps
    "evt3-addr-x": ({"vectorize": False}, "evt3", 1280, 720, ((1 << 24) - 5000, None, 1 << 4)),
    "dat": ({"width": 304, "height": 240}, "dat", 304, 240, ((1 << 32) - 10_000, None, 1 << 6)),
}


def write_bytes(name: str, chunks: list[np.ndarray]) -> bytes:
    kwargs, fmt, *_ = CASES[name]
    buf = io.BytesIO()
    writer = WRITERS[fmt](buf, **kwargs)
    for part in chunks:
        writer.write(part)
    writer.close()
    return buf.getvalue()


def case_events(name: str, seed: int, n: int = 3000) -> np.ndarray:
    _, _, w, h, (t_min, t_max, step) = CASES[name]
    return random_events(np.random.default_rng(seed), n, w, h, t_max or 0, t_min, step)


# --------------------------------------------------------------------------------------------------- fixtures
def test_nmnist_fixture() -> None:
    path = fixture("sample_nmnist.bin")
    assert detect_format(path) == "nmnist"
    with NMNISTReader(path, sensor_size=(34, 34)) as reader:
        ev = reader.read_all()
        assert reader.stats.skipped_events == 0 and reader.stats.truncated_bytes == 0
    assert ev.dtype == EVENT_DTYPE and len(ev) == 4325
    assert ev["x"].max() < 34 and ev["y"].max() < 34
    assert np.all(np.diff(ev["t"]) >= 0) and 300_000 < ev["t"][-1] < 320_000  # ~311 ms saccades
    assert set(np.unique(ev["p"])) == {0, 1}


def test_ncars_dat_fixture() -> None:
    path = fixture("sample_ncars.dat")
    reader = open_events(path)
    ev = reader.read_all()
    assert reader.info.format == "dat" and reader.info.header.get("Version") == "2"
    assert len(ev) == (path.stat().st_size - reader.info.data_offset) // 8 > 1000
    assert np.all(np.diff(ev["t"]) >= 0) and ev["t"][-1] < 200_000  # N-CARS samples are 100 ms
    w, h = reader.info.sensor_size or (304, 240)  # the header gives none: ATIS 304x240 bounds the crops
    assert ev["x"].max() < w and ev["y"].max() < h
    assert set(np.unique(ev["p"])) == {0, 1}


def test_evt3_fixture_equals_reference() -> None:
    raw, ref = fixture("evt3_sample.raw"), np.load(fixture("evt3_sample.npy"))
    reader = EVT3Reader(raw, time_low_wrap=True)
    assert reader.info.sensor_size == (1280, 720)  # from plugin_name hal_plugin_gen41_evk3
    ev = reader.read_all()
    assert same(ev, ref) and len(ev) == 219_596
    for chunk_size in (4099, 1001):
        assert same(EVT3Reader(raw, time_low_wrap=True, chunk_size=chunk_size).read_all(), ref)


def test_evt3_fixture_default_time_ignores_time_low_glitches() -> None:
    """The reference adds 4096 us at every TIME_LOW decrease, including 9 glitches (799, 811, 800);
    by default we keep TIME_HIGH/TIME_LOW as written: same events, times shifted by whole 4096 us."""
    raw, ref = fixture("evt3_sample.raw"), np.load(fixture("evt3_sample.npy"))
    ev = read_events(raw)
    assert all(np.array_equal(ev[k].astype(np.int64), ref[k].astype(np.int64)) for k in "xyp")
    shift = ref["t"] - ev["t"]
    assert np.all(shift % 4096 == 0) and np.all(np.diff(shift) >= 0) and shift[0] == 0
    assert np.all(np.diff(ev["t"]) >= 0)
    assert ev["t"][-1] - ev["t"][0] < 10_000 < ref["t"][-1] - ref["t"][0]


def test_aedat4_fixture() -> None:
    pytest.importorskip("aedat", reason="the optional 'aedat' package (stoprt[aedat]) is not installed")
    path = fixture("sample.aedat4")
    reader = open_events(path)
    assert isinstance(reader, AEDAT4Reader) and reader.info.sensor_size == (320, 240)
    ev = reader.read_all()
    assert len(ev) == 111_954 and reader.stats.other_events > 0
    assert ev["x"].max() < 320 and ev["y"].max() < 240 and np.all(np.diff(ev["t"]) >= 0)


def test_aedat4_without_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_import_module = importlib.import_module

    def no_aedat(name: str, *args: Any) -> Any:
        if name == "aedat":
            raise ImportError("No module named 'aedat'")
        return real_import_module(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_aedat)
    path = tmp_path / "x.aedat4"
    path.write_bytes(b"#!AER-DAT4.0\r\n")
    with pytest.raises(ImportError, match=r"stoprt\[aedat\]"):
        AEDAT4Reader(path)


def test_aedat2_header_only_fixture() -> None:
    path = fixture("sample_aedat_header.aedat")
    reader = open_events(path)
    assert isinstance(reader, AEDAT2Reader)
    assert reader.read_all().shape == (0,)
    info = reader.info
    assert info.header["AEChip"].endswith("Davis346red") and info.extra["layout"] == "davis"
    assert info.sensor_size == (346, 260) and info.data_offset == path.stat().st_size


def test_fixtures_chunked_like_whole() -> None:
    for name, chunk in (("sample_nmnist.bin", 7), ("sample_ncars.dat", 13), ("evt3_sample.raw", 8191)):
        path = fixture(name)
        assert same(read_events(path, chunk_size=chunk), read_events(path))


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(name: str) -> None:
    ev = case_events(name, seed=len(name))
    data = write_bytes(name, [ev[:1000], ev[:0], ev[1000:1001], ev[1001:]])
    fmt = CASES[name][1]
    whole = READERS[fmt](io.BytesIO(data)).read_all()
    assert same(whole, ev)
    for chunk_size in (1, 3, 7, 64):
        reader = READERS[fmt](io.BytesIO(data), chunk_size=chunk_size)
        assert same(reader.read_all(), ev), chunk_size
        assert reader.stats.skipped_events == reader.stats.truncated_bytes == reader.stats.no_state == 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_empty_stream(name: str) -> None:
    _, fmt, w, h, _ = CASES[name]
    data = write_bytes(name, [])
    reader = READERS[fmt](io.BytesIO(data))
    assert reader.read_all().shape == (0,) and reader.info.format == fmt
    if fmt != "nmnist":
        assert reader.info.sensor_size == (w, h)


def test_evt3_vectors_round_trip() -> None:
    rng = np.random.default_rng(3)
    ev = row_bursts(rng, 400, 1280, 720)
    buf = io.BytesIO()
    with EVT3Writer(buf) as writer:
        writer.write(ev)
    data = buf.getvalue()
    words = np.frombuffer(data[data.index(b"% end\n") + 6:], dtype="<u2") >> 12
    assert {3, 4, 5} <= set(np.unique(words).tolist())  # VECT_BASE_X, VECT_12 and VECT_8 were used
    for chunk_size in (1 << 20, 5, 2):
        assert same(EVT3Reader(io.BytesIO(data), chunk_size=chunk_size).read_all(), ev)


def test_aedat3_overflow_field_and_odd_packets() -> None:
    rng = np.random.default_rng(4)
    ev = random_events(rng, 500, 128, 128, 0, (1 << 31) - 100, 3)
    buf = io.BytesIO()
    writer = AEDAT3Writer(buf, packet_events=64)
    writer.write_packet(ev[:0])  # an empty polarity packet
    writer.write(ev[:250])
    buf.write(struct.pack("<hhiiiiii", 2, 1, 8, 4, 0, 3, 3, 3) + bytes(24))  # a special-events packet
    writer.write_packet(ev[250:250])
    writer.write(ev[250:])
    writer.close()
    data = buf.getvalue()
    reader = AEDAT3Reader(io.BytesIO(data), chunk_size=24)
    assert same(reader.read_all(), ev)
    assert reader.stats.skipped_packets == 1 and reader.stats.other_events == 3
    # the events past 2**31 us were written with overflow 1 in their packet headers
    assert ev["t"][-1] >= 1 << 31 and struct.pack("<hhiii", 1, 1, 8, 4, 1) in data


def test_aedat3_invalid_events_are_skipped() -> None:
    body = np.array([((5 << 17) | (6 << 2) | 3, 10), ((7 << 17) | (8 << 2) | 2, 11)], dtype="<u4,<i4")
    data = (b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"
            + struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 2, 2, 1) + body.tobytes())
    reader = AEDAT3Reader(io.BytesIO(data))
    ev = reader.read_all()
    assert len(ev) == 1 and (ev["x"][0], ev["y"][0], ev["p"][0], ev["t"][0]) == (5, 6, 1, 10)
    assert reader.stats.invalid == 1 and reader.info.sensor_size == (128, 128)


def test_streams_before_reading_everything() -> None:
    ev = case_events("evt2", seed=1, n=200_000)
    data = write_bytes("evt2", [ev])

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, n: int | None = -1) -> bytes:
            out = super().read(n)
            Counting.read_bytes += len(out)
            return out

    reader = EVT2Reader(Counting(data), chunk_size=4096)
    first = next(reader)
    assert len(first) > 0 and Counting.read_bytes < 3 * 4096 + 4096 < len(data)
    assert max(len(c) for c in reader) <= 4096 // 4 + 1  # bounded chunks


# -------------------------------------------------------------------------------------------------- detection
def test_open_events_by_extension_and_header(tmp_path: Path) -> None:
    ev = case_events("nmnist", seed=2, n=100)
    for ext, fmt in ((".bin", "nmnist"), (".aedat", "aedat3"), (".raw", "evt3"), (".dat", "dat")):
        path = tmp_path / f"rec{ext}"
        assert write_events(path, ev) == 100
        assert detect_format(path) == fmt
        assert same(read_events(path), ev)
    write_events(tmp_path / "old.aedat", ev, format="aedat2")
    write_events(tmp_path / "r2.raw", ev, format="evt2")
    assert detect_format(tmp_path / "old.aedat") == "aedat2" and detect_format(tmp_path / "r2.raw") == "evt2"
    (tmp_path / "noext").write_bytes((tmp_path / "r2.raw").read_bytes())
    assert detect_format(tmp_path / "noext") == "evt2"


def test_wrong_format_for_extension(tmp_path: Path) -> None:
    ev = case_events("nmnist", seed=2, n=10)
    write_events(tmp_path / "a.raw", ev)
    (tmp_path / "a.bin").write_bytes((tmp_path / "a.raw").read_bytes())
    with pytest.raises(EventFormatError, match=r"a\.bin.*header says evt3.*extension '\.bin'"):
        open_events(tmp_path / "a.bin")
    (tmp_path / "b.aedat").write_bytes((tmp_path / "a.raw").read_bytes())
    with pytest.raises(EventFormatError, match="extension"):
        open_events(tmp_path / "b.aedat")
    (tmp_path / "c.raw").write_bytes(b"% date today\n" + bytes(16))
    with pytest.raises(EventFormatError, match="names no EVT encoding"):
        open_events(tmp_path / "c.raw")
    (tmp_path / "d.aedat").write_bytes(bytes(16))
    with pytest.raises(EventFormatError, match="needs a header"):
        open_events(tmp_path / "d.aedat")
    (tmp_path / "e.xyz").write_bytes(bytes(15))
    with pytest.raises(EventFormatError, match="pass format="):
        open_events(tmp_path / "e.xyz")
    assert len(read_events(tmp_path / "e.xyz", format="nmnist", monotonic=False)) == 3


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["nmnist", "aedat2-dvs128", "aedat3", "evt2", "evt3", "dat"])
def test_truncated_file(name: str) -> None:
    ev = case_events(name, seed=5, n=50)
    data = write_bytes(name, [ev])[:-3]
    fmt = CASES[name][1]
    with pytest.raises(EventFormatError, match=r"<stream> at byte \d+: file ends inside") as err:
        READERS[fmt](io.BytesIO(data)).read_all()
    assert err.value.offset is not None and err.value.offset < len(data)
    reader = READERS[fmt](io.BytesIO(data), errors="skip")
    got = reader.read_all()
    assert 0 < reader.stats.truncated_bytes < 8 and same(got, ev[: len(got)]) and len(got) >= len(ev) - 2


@pytest.mark.parametrize("reader_cls, data, match", [
    (AEDAT3Reader, b"", "missing '#!AER-DAT3.1'"),
    (AEDAT3Reader, b"#!AER-DAT2.0\r\n", "unsupported AEDAT version"),
    (AEDAT3Reader, b"#!AER-DAT3.1\r\n#Format: RAW\r\n", "END-HEADER"),
    (AEDAT3Reader, b"#!AER-DAT3.1\r\n#Format: SerializedTS\r\n#!END-HEADER\r\n", "only RAW"),
    (AEDAT2Reader, b"\x00" * 16, "not an AEDAT 2.0 file"),
    (AEDAT2Reader, b"#!AER-DAT1.0\r\n", "unsupported AEDAT version"),
    (EVT2Reader, b"% evt 3.0\n", "not EVT 2.0"),
    (EVT3Reader, b"% format EVT2;height=480;width=640\n", "not EVT 3.0"),
    (EVT3Reader, b"% format EVT3;height=abc;width=640\n", "bad sensor size"),
    (EVT3Reader, b"% geometry 0x720\n", "outside 1..65536"),
    (DATReader, b"% Version 1\n", "only version 2"),
    (DATReader, b"% Version 2\n\x0e\x10", "unsupported .dat event type"),
    (AEDAT3Reader, b"#!AER-DAT3.1\r\n#!END-HEADER\r\n" + struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 1, -5, 0),
     "corrupt packet header"),
    (AEDAT3Reader, b"#!AER-DAT3.1\r\n#!END-HEADER\r\n" + struct.pack("<hhiiiiii", 1, 1, 16, 4, 0, 1, 1, 1),
     "expected 8 and 4"),
])
def test_bad_headers(reader_cls: type, data: bytes, match: str) -> None:
    with pytest.raises(EventFormatError, match=match):
        reader_cls(io.BytesIO(data)).read_all()


def test_out_of_sensor_and_backwards() -> None:
    ev = np.zeros(4, dtype=EVENT_DTYPE)
    ev["t"], ev["x"], ev["y"] = [10, 20, 15, 30], [1, 2, 50, 3], [1, 2, 3, 4]
    buf = io.BytesIO()
    out = np.empty((4, 5), dtype=np.uint8)  # hand-made: the writer refuses backwards time
    out[:, 0], out[:, 1], out[:, 2], out[:, 3], out[:, 4] = ev["x"], ev["y"], 0, 0, ev["t"]
    buf.write(out.tobytes())
    data = buf.getvalue()
    with pytest.raises(EventFormatError, match=r"at byte 10: event x=50, y=3 outside the 34x34 sensor"):
        NMNISTReader(io.BytesIO(data), sensor_size=(34, 34)).read_all()
    with pytest.raises(EventFormatError, match=r"at byte 10: timestamp 15 us goes backwards"):
        NMNISTReader(io.BytesIO(data)).read_all()
    reader = NMNISTReader(io.BytesIO(data), sensor_size=(10, 10), errors="skip")
    assert reader.read_all()["t"].tolist() == [10, 20, 30] and reader.stats.out_of_bounds == 1
    reader = NMNISTReader(io.BytesIO(data), errors="skip")
    assert reader.read_all()["t"].tolist() == [10, 20, 30] and reader.stats.backwards == 1
    assert NMNISTReader(io.BytesIO(data), monotonic=False).read_all()["t"].tolist() == [10, 20, 15, 30]


def test_unknown_words_and_no_time_base() -> None:
    head = b"% evt 2.0\n% end\n"
    words = np.array([(1 << 28) | 5, (8 << 28) | 1, (3 << 28), (1 << 28) | (7 << 11) | 9], dtype="<u4")
    with pytest.raises(EventFormatError, match=r"at byte 24: unknown EVT 2.0 word type 0x3"):
        EVT2Reader(io.BytesIO(head + words.tobytes())).read_all()
    reader = EVT2Reader(io.BytesIO(head + words.tobytes()), errors="skip")
    ev = reader.read_all()
    assert reader.stats.unknown_words == 1 and reader.stats.no_state == 1  # the CD_ON before any TIME_HIGH
    assert (ev["t"][0], ev["x"][0], ev["y"][0], ev["p"][0]) == (64, 7, 9, 1)
    evt3 = np.array([0x8000 | 1, 0x6000 | 5, 0x0000 | 3, 0x3000 | 0x800 | 10, 0x5000 | 0b101, 0x1000, 0x2000 | 4],
                    dtype="<u2")
    with pytest.raises(EventFormatError, match="unknown EVT 3.0 word type 0x1"):
        EVT3Reader(io.BytesIO(b"% evt 3.0\n" + evt3.tobytes())).read_all()
    reader = EVT3Reader(io.BytesIO(b"% evt 3.0\n" + evt3.tobytes()), errors="skip")
    ev = reader.read_all()
    assert ev["x"].tolist() == [10, 12, 4] and ev["p"].tolist() == [1, 1, 0] and set(ev["t"]) == {4096 + 5}
    assert set(ev["y"]) == {3} and reader.stats.unknown_words == 1


def test_writers_refuse_what_they_cannot_encode(tmp_path: Path) -> None:
    ev = np.zeros(2, dtype=EVENT_DTYPE)
    ev["t"] = [5, 1 << 23]
    with pytest.raises(EventFormatError, match="below 8388608"):
        NMNISTWriter(io.BytesIO()).write(ev)
    ev["t"] = [5, 3]
    with pytest.raises(EventFormatError, match="non-decreasing"):
        EVT3Writer(io.BytesIO()).write(ev)
    ev["t"], ev["x"] = [1, 2], [0, 300]
    with pytest.raises(EventFormatError, match="x<256"):
        write_events(tmp_path / "a.bin", ev)
    ev["x"] = [0, 200]
    with pytest.raises(EventFormatError, match="x<128"):
        write_events(tmp_path / "a.aedat", ev, format="aedat2")
    ev["t"], ev["x"] = [0, 1 << 31], [0, 1]
    with pytest.raises(EventFormatError, match="gap of 2\\*\\*31"):
        write_events(tmp_path / "a.dat", ev)
    with pytest.raises(TypeError, match="fields t, x, y, p"):
        write_events(tmp_path / "b.dat", np.zeros(3))
