"""Readers on damaged input and on what their formats mean (issue 10: AEDAT 4.0 size fields, truncated
files and headers, AEDAT 2.0 DVS128 polarity and orientation)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stoprt.runtime.formats import AEDAT2Reader, AEDAT2Writer, EVT2Writer, EventFormatError, open_events, read_events
from stoprt.runtime.formats.aedat4 import check_available

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dvs"
AEDAT4 = FIXTURES / "sample.aedat4"
IOHEADER_SIZE_AT = 14  # after b"#!AER-DAT4.0\r\n"

needs_aedat4 = pytest.mark.skipif(
    not (check_available() and AEDAT4.exists()),
    reason=f"needs the optional 'aedat' package (stoprt[aedat]) and the fixture {AEDAT4} (../shared, SOURCES.md)")


def _packet_offsets(data: bytes) -> list[int]:
    """Byte offsets of the packets of an AEDAT 4.0 file, walked from the size fields."""
    header = struct.unpack_from("<I", data, IOHEADER_SIZE_AT)[0]
    pos, out = IOHEADER_SIZE_AT + 4 + header, []
    table = len(data) - 4010  # sample.aedat4's data table is its last 4,010 bytes
    while pos < table:
        out.append(pos)
        pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
    assert pos == table
    return out


# A process capped at 1.5 GiB of address space: before the size checks, aedat tried to allocate the 4 GiB
# a corrupt field names and the process died of SIGABRT ("memory allocation of 4294967280 bytes failed").
CAPPED = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
from stoprt.runtime.formats import EventFormatError, read_events
try:
    read_events(sys.argv[1])
except EventFormatError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.parametrize("where", ["ioheader", "first packet", "tenth packet"])
@needs_aedat4
def test_aedat4_4gib_size_field_is_refused_in_a_memory_capped_process(tmp_path: Path, where: str) -> None:
    data = bytearray(AEDAT4.read_bytes())
    if where == "ioheader":
        field = IOHEADER_SIZE_AT
    else:
        field = _packet_offsets(bytes(data))[0 if where == "first packet" else 9] + 4
    struct.pack_into("<I", data, field, 0xFFFFFFF0)
    path = tmp_path / "big.aedat4"
    path.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-c", CAPPED, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, f"exit {proc.returncode}: {proc.stderr[-400:]}"
    message = proc.stdout.strip()
    assert str(path) in message and "size field" in message and "4294967280 bytes" in message
    assert f"byte {field}" in message


@needs_aedat4
def test_aedat4_missing_its_last_byte_is_a_truncated_file(tmp_path: Path) -> None:
    full = read_events(AEDAT4)
    path = tmp_path / "short.aedat4"
    path.write_bytes(AEDAT4.read_bytes()[:-1])
    with pytest.raises(EventFormatError, match=r"short\.aedat4 at byte \d+: file ends inside a data table"):
        read_events(path)
    reader = open_events(path, errors="skip")
    assert len(reader.read_all()) == len(full)  # the packets are whole: every event is kept
    assert reader.stats.truncated_bytes == 4009 and "truncated file?" in reader.truncation


@needs_aedat4
def test_aedat4_cut_inside_a_packet_keeps_the_packets_before(tmp_path: Path) -> None:
    full = read_events(AEDAT4)
    path = tmp_path / "cut.aedat4"
    path.write_bytes(AEDAT4.read_bytes()[:500_000])
    with pytest.raises(EventFormatError, match="file ends inside a packet"):
        read_events(path)
    reader = open_events(path, errors="skip")
    got = reader.read_all()
    assert 0 < len(got) < len(full) and np.array_equal(got, full[: len(got)])
    assert reader.stats.truncated_bytes > 0 and "cut.aedat4 at byte" in reader.truncation


def test_header_cut_mid_line_says_so(tmp_path: Path) -> None:
    path = tmp_path / "rec.raw"
    with EVT2Writer(path, width=640, height=480) as w:
        w.write(np.zeros(0, dtype=[("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")]))
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b";width")])  # "% format EVT2;height=480" without its end of line
    with pytest.raises(EventFormatError, match=r"file ends inside the text header .*height=480.*truncated"):
        open_events(path)


def test_header_with_height_but_no_width_names_the_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "rec.raw"
    path.write_bytes(b"% evt 2.0\n% format EVT2;height=480\n% end\n")
    with pytest.raises(EventFormatError, match=r"sensor height is given \(480\) but not its width"):
        open_events(path)


# ------------------------------------------------------------------------------------- AEDAT 2.0 DVS128
def _jaer_file(addresses: list[int], timestamps: list[int]) -> bytes:
    header = b"#!AER-DAT2.0\r\n# AEChip: ch.unizh.ini.jaer.chip.retina.DVS128\r\n"
    return header + b"".join(struct.pack(">II", a, t) for a, t in zip(addresses, timestamps))


def _expected_dvs128(address: int) -> tuple[int, int, int]:
    """(x, y, p) of a DVS128 address as jAER's extractor gives them (DVS128.java, Extractor: type =
    (1 - addr) & 1, x = 127 - raw x), with y flipped from jAER's bottom-left origin to the top left as
    libcaer's dvs128.c does."""
    raw_x, raw_y, bit0 = (address >> 1) & 0x7F, (address >> 8) & 0x7F, address & 1
    return 127 - raw_x, 127 - raw_y, 1 - bit0


def test_aedat2_dvs128_address_bit0_zero_is_on_and_x_is_mirrored() -> None:
    # raw x=5, y=9, bit 0 = 0 (ON per jAER); raw x=120, y=0, bit 0 = 1 (OFF); a special event (bit 15)
    addresses = [(9 << 8) | (5 << 1) | 0, (0 << 8) | (120 << 1) | 1, 0x8000]
    reader = AEDAT2Reader(io.BytesIO(_jaer_file(addresses, [10, 20, 30])))
    ev = reader.read_all()
    assert [tuple(int(e[k]) for k in "xyp") for e in ev] == [(122, 118, 1), (7, 127, 0)]
    assert reader.stats.other_events == 1


def test_aedat2_dvs128_writer_and_reader_agree_on_meaning(tmp_path: Path) -> None:
    ev = np.zeros(2, dtype=[("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
    ev["t"], ev["x"], ev["y"], ev["p"] = [1, 2], [0, 127], [3, 100], [1, 0]
    path = tmp_path / "w.aedat"
    with AEDAT2Writer(path) as w:
        w.write(ev)
    raw = path.read_bytes()
    body = raw[raw.rindex(b"\n") + 1:]
    first = struct.unpack_from(">I", body, 0)[0]
    assert first & 1 == 0 and (first >> 1) & 0x7F == 127  # ON is written as bit 0 = 0, x mirrored
    assert np.array_equal(read_events(path), ev)


DVS128_RECORDING = "dvs128_edvs_2017-03-21.aedat"


def test_aedat2_real_dvs128_recording_matches_jaer_semantics() -> None:
    """A real DVS128 recording written by jAER (an eDVS128 camera, ``# AEChip: ...retina.DVS128``), decoded
    event by event with struct against jAER's extractor semantics."""
    path = FIXTURES / DVS128_RECORDING
    if not path.exists():
        pytest.skip(f"real DVS128 AEDAT 2.0 recording {path} is absent (origin: colleenpamchen/jAER @ b63e878 : "
                    "DVS128-2017-03-21-short.aedat)")
    data = path.read_bytes()
    start = 0
    while data[start:start + 1] == b"#":
        start = data.index(b"\n", start) + 1
    n = (len(data) - start) // 8
    expected = [(*_expected_dvs128(a), t) for a, t in (struct.unpack_from(">II", data, start + 8 * i) for i in range(n))
                if not a & 0x8000]
    reader = AEDAT2Reader(path)
    assert reader.info.sensor_size == (128, 128)
    ev = reader.read_all()
    assert len(ev) == len(expected) > 100_000
    got = np.stack([ev["x"], ev["y"], ev["p"], ev["t"]], axis=1).astype(np.int64)
    assert np.array_equal(got, np.array(expected, dtype=np.int64))
    assert 0.3 < ev["p"].mean() < 0.7  # both polarities, neither dominant


@pytest.mark.skipif(not AEDAT4.exists(), reason=f"fixture {AEDAT4} is absent (see ../shared/fixtures/dvs/SOURCES.md)")
def test_aedat4_zstd_data_table_is_checked_whole(tmp_path: Path) -> None:
    """The same walk for zstd files: the fixture's IOHeader says zstd, its data table is replaced by a
    hand-made zstd frame (single segment, one raw block; RFC 8878), whole and then cut by a byte."""
    from stoprt.runtime.formats.aedat4 import scan_layout
    data = bytearray(AEDAT4.read_bytes())
    header_at = IOHEADER_SIZE_AT + 4
    root = header_at + struct.unpack_from("<I", data, header_at)[0]  # the flatbuffer's root table
    assert struct.unpack_from("<i", data, root + 4)[0] == 1  # field 0 (compression) is LZ4 in the fixture
    struct.pack_into("<i", data, root + 4, 3)  # now zstd
    payload = b"FTAB-not-really"
    frame = (struct.pack("<I", 0xFD2FB528) + bytes([0x20, len(payload)])
             + (1 | (len(payload) << 3)).to_bytes(3, "little") + payload)
    whole = bytes(data[:len(data) - 4010]) + frame
    for cut, expect in ((0, None), (1, "data table")):
        path = tmp_path / f"z{cut}.aedat4"
        path.write_bytes(whole[:len(whole) - cut])
        with open(path, "rb") as f:
            layout = scan_layout(f, str(path))
        assert layout.compression == "zstd" and layout.packets == len(_packet_offsets(AEDAT4.read_bytes()))
        assert (layout.cut and layout.cut[2]) == expect
