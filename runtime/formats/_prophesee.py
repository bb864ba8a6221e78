"""Pieces shared by the Prophesee formats (EVT 2.0 / EVT 3.0 ``.raw`` and legacy ``.dat``).

Both start with a text header of lines ``% key value`` (``.raw`` files from Metavision end it with
``% end``). Keys used here: ``evt`` (``2.0``, ``2.1``, ``3.0``), ``format`` (e.g.
``EVT3;height=720;width=1280``), ``geometry`` (``1280x720``), ``Width``/``Height`` (``.dat``) and, for
old headers without geometry, ``plugin_name``/``sensor_generation`` (gen41/IMX636 -> 1280x720,
gen31 -> 640x480, GENX320 -> 320x320).
"""

from __future__ import annotations

import re

import numpy as np

from ._common import ByteSource, EventFormatError, check_geometry, read_text_header

GENERATION_SIZES = {"gen41": (1280, 720), "imx636": (1280, 720), "gen4": (1280, 720), "gen31": (640, 480),
                    "gen3": (640, 480), "genx320": (320, 320)}
MAX_TIME_HIGH_WORDS = 1 << 20


def read_header(src: ByteSource, path: str) -> dict[str, str]:
    """Consume the ``%`` header; returns ``{key: value}`` (keys as written, first occurrence wins)."""
    lines = read_text_header(src, b"%", path, stop=lambda s: s.strip().lower() == "end")
    header: dict[str, str] = {}
    for line in lines:
        key, _, value = line.strip().partition(" ")
        if key and key.lower() != "end":
            header.setdefault(key, value.strip())
    return header


def get(header: dict[str, str], key: str) -> str | None:
    """Case-insensitive header lookup."""
    for k, v in header.items():
        if k.lower() == key.lower():
            return v
    return None


def format_options(header: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """``format EVT3;height=720;width=1280`` -> ``("EVT3", {"height": "720", "width": "1280"})``."""
    fmt = get(header, "format")
    if not fmt:
        return None, {}
    name, *opts = fmt.split(";")
    return name.strip(), {k.strip().lower(): v.strip() for k, _, v in (o.partition("=") for o in opts)}


def evt_version(header: dict[str, str]) -> str | None:
    """``"2.0"``, ``"2.1"``, ``"3.0"`` (or another string the header gives), ``None`` when absent."""
    evt = get(header, "evt")
    if evt:
        return evt.strip()
    name, _ = format_options(header)
    if name:
        up = name.upper()
        for tag, ver in (("EVT21", "2.1"), ("EVT2", "2.0"), ("EVT3", "3.0")):
            if up.startswith(tag):
                return ver
    return None


def geometry(header: dict[str, str], path: str) -> tuple[int | None, int | None]:
    """Sensor ``(width, height)`` from the header, ``(None, None)`` when it gives none."""
    _, opts = format_options(header)
    if "width" in opts or "height" in opts:
        return check_geometry(opts.get("width"), opts.get("height"), path)
    geom = get(header, "geometry")
    if geom:
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", geom)
        if not m:
            raise EventFormatError(f"bad '% geometry {geom}' header line", path=path)
        return check_geometry(m.group(1), m.group(2), path)
    w, h = get(header, "width"), get(header, "height")
    if w is not None or h is not None:
        return check_geometry(w, h, path)
    hint = " ".join(filter(None, (get(header, "plugin_name"), get(header, "sensor_generation"),
                                  get(header, "sensor_name")))).lower().replace(".", "")
    for tag, size in GENERATION_SIZES.items():
        if tag in hint:
            return size
    return None, None


def header_bytes(lines: list[str]) -> bytes:
    return "".join(f"% {line}\n" for line in lines).encode("ascii")


def time_high_words(th: np.ndarray, prev: int, started: bool, step: int) -> tuple[np.ndarray, ...]:
    """Time-high words a writer emits before events with full (unwrapped) time-high values ``th``
    (non-decreasing), after ``prev`` was last emitted: whenever the value changes (and before the very
    first event), stepping by at most ``step`` so that a reader unwrapping by the half-range rule
    recovers absolute times. Returns ``(event_index, order, value)`` arrays, one entry per word.
    """
    before = np.concatenate(([prev], th[:-1])).astype(np.int64)
    k = -(-(th - before) // step)
    if not started and len(k):
        k[0] = max(int(k[0]), 1)
    total = int(k.sum())
    if total > MAX_TIME_HIGH_WORDS:
        raise EventFormatError(f"a time gap needing {total} time-high words is too large to encode")
    idx = np.repeat(np.arange(len(th)), k)
    j = np.arange(total) - np.repeat(np.cumsum(k) - k, k)
    value = np.minimum(np.repeat(before, k) + (j + 1) * step, np.repeat(th, k))
    return idx, j, value


def assemble(keys_idx: list[np.ndarray], keys_order: list[np.ndarray], words: list[np.ndarray]) -> np.ndarray:
    """Concatenate word groups and order them by (event index, order)."""
    idx = np.concatenate(keys_idx)
    order = np.concatenate(keys_order)
    w = np.concatenate(words)
    return w[np.lexsort((order, idx))]
