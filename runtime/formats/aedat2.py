"""AEDAT 2.0 (jAER) files.

Binary layout: text header lines starting with ``#`` (the first is ``#!AER-DAT2.0``; jAER ends them with
``\\r\\n`` and may embed its preferences XML), then 8-byte events of two **big-endian** 32-bit words,
``address`` and ``timestamp`` (microseconds; 32 bits, unwrapped here when they wrap around).

The address layout depends on the chip named by the ``# AEChip:`` header line:

* DVS128 (``ch.unizh.ini.jaer.chip.retina.DVS128``, the default when no DAVIS chip is named): the raw
  fields are ``rx = (a >> 1) & 0x7F``, ``ry = (a >> 8) & 0x7F`` and bit 0; bit 15 set marks a special
  (external / sync) event, skipped. Events come out as ``x = 127 - rx``, ``y = 127 - ry`` and
  ``p = 1 - (a & 1)`` (see "DVS128 orientation and polarity" below).
* DAVIS (any chip class containing ``davis``):
  ``y = (a >> 22) & 0x1FF``, ``x = (a >> 12) & 0x3FF``, ``p = (a >> 11) & 1``; bit 31 set marks an APS
  or IMU sample and bit 10 an external-input event, both skipped. These are the raw fields (jAER's
  display origin, bottom left, is kept); the DAVIS orientation is not settled here.

DVS128 orientation and polarity. The DVS128 hardware puts 0 in address bit 0 for an ON event, and both
decoders of its makers mirror x:

* jAER ``src/ch/unizh/ini/jaer/chip/retina/DVS128.java`` (SensorsINI/jaer @ a1db449), the
  ``Extractor`` class: its comment (lines 424-428) says "The ON events have raw polarity 0 ... Raw
  polarity 1 is OFF event"; line 530 sets ``type = (1 - addr) & 1`` (type 1 = ON), line 532
  ``x = sizeX - 1 - rawX`` and line 533 keeps the raw y (jAER draws y = 0 at the bottom).
* libcaer ``src/dvs128.c`` (inivation/libcaer @ f85411a), the USB translator that cAER uses to write
  DVS128 Gesture's AEDAT 3.1 files: lines 694-701 invert x ("to correct for flipped camera"),
  invert y ("to convert to CG format", origin top left) and invert the polarity bit ("hardware is
  like this").

stoprt's events use image coordinates with the origin at the top left and p = 1 for ON (as its other
readers), so a DVS128 recording reads the same from an AEDAT 2.0 (jAER) file as from an AEDAT 3.1
(cAER) file of the same sensor. The sensor size comes from the chip name (e.g. Davis346 -> 346x260)
where known.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Literal

import numpy as np

from ._common import EventReader, OffsetOf, RecordingInfo, Source, make_events, read_text_header, unwrap_u32
from ._writer import EventWriter

MAGIC = "!AER-DAT2.0"
Layout = Literal["dvs128", "davis"]
DAVIS_SIZES = {346: (346, 260), 240: (240, 180), 640: (640, 480), 208: (208, 192), 128: (128, 128)}
DEFAULT_CHIPS = {"dvs128": "ch.unizh.ini.jaer.chip.retina.DVS128", "davis": "eu.seebetter.ini.chips.davis.Davis346B"}


def chip_geometry(chip: str, layout: str) -> tuple[int, int] | None:
    """Sensor size implied by a jAER chip class name (``None`` when unknown)."""
    m = re.search(r"davis(\d+)", chip, re.IGNORECASE)
    if m and int(m.group(1)) in DAVIS_SIZES:
        return DAVIS_SIZES[int(m.group(1))]
    if layout == "dvs128":
        return (128, 128)
    return None


def parse_header(lines: list[str]) -> dict[str, str]:
    """``key: value`` header lines as a dict (first occurrence wins); ``version`` from the magic line."""
    out: dict[str, str] = {}
    if lines:
        out["version"] = lines[0].strip()
    for line in lines[1:]:
        m = re.match(r"\s*([A-Za-z][\w .-]*?)\s*:\s*(.*)$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


class AEDAT2Reader(EventReader):
    """Streaming reader of AEDAT 2.0 files. ``layout`` overrides the address layout taken from the
    header (``"dvs128"`` or ``"davis"``)."""

    format_name = "aedat2"

    def __init__(self, source: Source, *, layout: Layout | None = None, **kwargs: Any) -> None:
        if layout not in (None, "dvs128", "davis"):
            raise ValueError(f"layout must be 'dvs128' or 'davis', got {layout!r}")
        self._layout_arg = layout
        super().__init__(source, **kwargs)

    def _read_header(self) -> RecordingInfo:
        lines = read_text_header(self._src, b"#", self.path)
        if not lines or not lines[0].startswith("!AER-DAT"):
            raise self.error("missing '#!AER-DAT2.0' header line: not an AEDAT 2.0 file", 0)
        version = lines[0].strip()
        if version != MAGIC:
            raise self.error(f"unsupported AEDAT version '#{version}' (this reader reads #{MAGIC})", 0)
        header = parse_header(lines)
        chip = header.get("AEChip", "")
        layout = self._layout_arg or ("davis" if "davis" in chip.lower() else "dvs128")
        self.layout: Layout = layout  # type: ignore[assignment]
        size = chip_geometry(chip, layout)
        return RecordingInfo("aedat2", width=size[0] if size else None, height=size[1] if size else None,
                             header=header, data_offset=self._src.pos, extra={"layout": layout, "chip": chip})

    def _decode(self) -> Iterator[tuple[np.ndarray, OffsetOf]]:
        wrap = [0, 0]
        for buf, base in self.records(8):
            words = np.frombuffer(buf, dtype=">u4").reshape(-1, 2)
            a = words[:, 0].astype(np.int64)
            t = unwrap_u32(words[:, 1], wrap)
            if self.layout == "dvs128":
                keep = (a & 0x8000) == 0
                # jAER DVS128.java:530-532 and libcaer dvs128.c:694-701 (see the module docstring).
                x, y, p = 127 - ((a >> 1) & 0x7F), 127 - ((a >> 8) & 0x7F), 1 - (a & 1)
            else:
                keep = (a & 0x80000400) == 0
                x, y, p = (a >> 12) & 0x3FF, (a >> 22) & 0x1FF, (a >> 11) & 1
            idx = np.flatnonzero(keep)
            self.stats.other_events += len(a) - len(idx)
            yield (make_events(t[idx], x[idx], y[idx], p[idx]),
                   lambda i, base=base, idx=idx: base + 8 * int(idx[i]))


class AEDAT2Writer(EventWriter):
    """Writer of AEDAT 2.0 files in the DVS128 (x, y < 128) or DAVIS address layout.

    ``chip`` is the jAER chip class written to the ``# AEChip:`` line (it sets the sensor size the
    reader reports; DAVIS default Davis346B, 346x260). Timestamps are written modulo 2**32.
    """

    format_name = "aedat2"

    def __init__(self, dest: Source, *, layout: Layout = "dvs128", chip: str | None = None) -> None:
        if layout not in ("dvs128", "davis"):
            raise ValueError(f"layout must be 'dvs128' or 'davis', got {layout!r}")
        self.layout = layout
        self.chip = chip or DEFAULT_CHIPS[layout]
        size = chip_geometry(self.chip, layout)
        limit = (128, 128) if layout == "dvs128" else (1024, 512)
        self.size = (min(size[0], limit[0]), min(size[1], limit[1])) if size else limit
        super().__init__(dest)
        lines = ["#" + MAGIC, "# This is a raw AE data file created by stoprt",
                 "# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event",
                 "# Timestamps tick is 1 us", f"# AEChip: {self.chip}"]
        self._f.write("".join(line + "\r\n" for line in lines).encode("ascii"))

    def write(self, events: Any) -> None:
        ev = self._prepare(events, *self.size)
        x, y, p = (ev[k].astype(np.uint32) for k in ("x", "y", "p"))
        if self.layout == "dvs128":
            a = ((127 - y) << 8) | ((127 - x) << 1) | (1 - p)  # the reader's mapping, inverted
        else:
            a = (y << 22) | (x << 12) | (p << 11)
        out = np.empty((len(ev), 2), dtype=">u4")
        out[:, 0] = a
        out[:, 1] = self._u32_timestamps(ev["t"])
        self._commit(ev, out.tobytes())
