"""Fuzzing the event-file readers with random and mutated bytes (hypothesis).

Every reader, given any bytes, either decodes them into valid EVENT_DTYPE arrays or raises
EventFormatError, never another exception, within a time bound; and what it decodes does not depend
on the chunk size. Examples are derandomised so that the suite is reproducible; raise
STOPRT_FUZZ_EXAMPLES to fuzz longer.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stoprt.runtime.events import EVENT_DTYPE
from stoprt.runtime.formats import READERS, WRITERS, EventFormatError, open_events
from stoprt.runtime.formats.aedat4 import check_available

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dvs"
EXAMPLES = int(os.environ.get("STOPRT_FUZZ_EXAMPLES", "200"))
TIME_BOUND_S = 3.0
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BYTE_FORMATS = sorted(f for f in READERS if f != "aedat4")
WRITER_ARGS = {"nmnist": {}, "aedat2": {}, "aedat3": {"packet_events": 16}, "evt2": {"width": 640, "height": 480},
               "evt3": {"width": 1280, "height": 720}, "dat": {"width": 304, "height": 240}}
HEADERS = {"aedat2": b"#!AER-DAT2.0\r\n", "aedat3": b"#!AER-DAT3.1\r\n#!END-HEADER\r\n",
           "evt2": b"% evt 2.0\n% end\n", "evt3": b"% evt 3.0\n% end\n", "dat": b"% Version 2\n\x00\x08", "nmnist": b""}


def _seeds() -> dict[str, list[bytes]]:
    """Small valid files per format: written by our writers, plus the heads of the real fixtures."""
    rng = np.random.default_rng(0)
    seeds: dict[str, list[bytes]] = {}
    for fmt, kwargs in WRITER_ARGS.items():
        n = 40
        ev = np.zeros(n, dtype=EVENT_DTYPE)
        ev["t"] = (1 << 22) + np.cumsum(rng.integers(0, 5000, n))
        ev["x"], ev["y"], ev["p"] = rng.integers(0, 34, n), rng.integers(0, 34, n), rng.integers(0, 2, n)
        if fmt == "evt3":  # a row burst, so that vector words are in the seed
            ev["t"][10:20], ev["y"][10:20], ev["p"][10:20], ev["x"][10:20] = ev["t"][10], 5, 1, np.arange(3, 33, 3)
        buf = io.BytesIO()
        with WRITERS[fmt](buf, **kwargs) as writer:
            writer.write(ev)
        seeds[fmt] = [buf.getvalue()]
    for name, fmt, size in (("evt3_sample.raw", "evt3", 3000), ("sample_nmnist.bin", "nmnist", 600),
                            ("sample_ncars.dat", "dat", 700), ("sample_aedat_header.aedat", "aedat2", 700)):
        if (FIXTURES / name).exists():
            seeds[fmt].append((FIXTURES / name).read_bytes()[:size])
    return seeds


SEEDS = _seeds()


def decode(fmt: str, data: bytes, errors: str, chunk_size: int) -> tuple[np.ndarray | None, dict[str, int]]:
    """Events (``None`` after EventFormatError) and stats; checks the invariants of what comes out."""
    start = time.perf_counter()
    parts: list[np.ndarray] = []
    stats: dict[str, int] = {}
    try:
        reader = READERS[fmt](io.BytesIO(data), errors=errors, chunk_size=chunk_size)
        for ev in reader:
            assert ev.dtype == EVENT_DTYPE and ev.ndim == 1 and len(ev) > 0
            parts.append(ev)
        stats = reader.stats.as_dict()
        result: np.ndarray | None = np.concatenate(parts) if parts else np.zeros(0, EVENT_DTYPE)
    except EventFormatError as exc:
        assert str(exc).startswith("<stream>")
        result = None
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_BOUND_S, f"{fmt}: {len(data)} bytes took {elapsed:.1f} s"
    if result is not None and len(result):
        assert len(result) <= 6 * len(data)  # EVT 3.0 vectors: at most 12 events per 2-byte word
        assert np.all(np.diff(result["t"]) >= 0)
        w, h = reader.info.width, reader.info.height
        if w is not None and h is not None:
            assert result["x"].max() < w and result["y"].max() < h
    for key in ("bytes_read", "chunks"):
        stats.pop(key, None)
    return result, stats


def check_chunk_independent(fmt: str, data: bytes, chunk_size: int) -> None:
    for errors in ("raise", "skip"):
        small, small_stats = decode(fmt, data, errors, chunk_size)
        big, big_stats = decode(fmt, data, errors, 1 << 20)
        assert (small is None) == (big is None), (fmt, errors)
        if small is not None and big is not None:
            assert np.array_equal(small, big) and small_stats == big_stats, (fmt, errors)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(BYTE_FORMATS))
    data = bytearray(draw(st.sampled_from(SEEDS[fmt])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete", "duplicate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            data[pos:pos + 4] = draw(st.binary(min_size=4, max_size=4))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
    return fmt, bytes(data)


@FUZZ
@given(st.sampled_from(BYTE_FORMATS), st.booleans(), st.binary(max_size=1500), st.sampled_from([1, 2, 5, 64]))
def test_random_bytes(fmt: str, with_header: bool, body: bytes, chunk_size: int) -> None:
    data = (HEADERS[fmt] if with_header else b"") + body
    check_chunk_independent(fmt, data, chunk_size)


@FUZZ
@given(mutated(), st.sampled_from([2, 7, 64, 1000]))
def test_mutated_files(case: tuple[str, bytes], chunk_size: int) -> None:
    fmt, data = case
    check_chunk_independent(fmt, data, chunk_size)


@settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
@given(mutated(), st.sampled_from([".bin", ".aedat", ".raw", ".dat", ".evt", ""]))
def test_open_events_any_file(tmp_path_factory: pytest.TempPathFactory, case: tuple[str, bytes], ext: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / f"rec{ext}"
    path.write_bytes(case[1])
    start = time.perf_counter()
    try:
        with open_events(path) as reader:
            reader.read_all()
    except EventFormatError as exc:
        assert str(path) in str(exc)
    assert time.perf_counter() - start < TIME_BOUND_S


@pytest.mark.skipif(not check_available(), reason="the optional 'aedat' package (stoprt[aedat]) is not installed")
@pytest.mark.skipif(not (FIXTURES / "sample.aedat4").exists(), reason="fixture ../shared/fixtures/dvs/sample.aedat4 absent")
@settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
@given(st.data())
def test_mutated_aedat4(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    raw = bytearray((FIXTURES / "sample.aedat4").read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        if not raw:
            break
        pos = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[pos:pos + 8] = data.draw(st.binary(min_size=8, max_size=8))
        else:
            del raw[pos:]
    path = tmp_path_factory.mktemp("fuzz4") / "rec.aedat4"
    path.write_bytes(bytes(raw))
    start = time.perf_counter()
    try:
        ev = READERS["aedat4"](path).read_all()
        assert ev.dtype == EVENT_DTYPE
    except EventFormatError:
        pass
    assert time.perf_counter() - start < TIME_BOUND_S
