"""Events over UDP: :class:`UDPSource` listens on a local port, :class:`UDPSender` sends.

One datagram is one packet. Two payload formats:

``format="spif"``: the SpiNNaker SPIF / AER convention. The payload is a sequence of 32-bit
little-endian words, one event each::

    bit  31      "no timestamp" flag (SPIF: 1 = absent); ignored when reading, set when sending
    bits 30..16  x (15 bits)
    bit  15      polarity (1 = ON)
    bits 14..0   y (15 bits)

The words carry no time: every event of a datagram is stamped with its receive time, in microseconds
of ``time.monotonic`` since the source was opened. A payload whose length is not a multiple of 4
is garbage.

``format="stoprt"``: our own format, which keeps the sender's timestamps. A 12-byte little-endian
header, then ``count`` 13-byte records::

    header  magic b"STEV" (4 bytes), version u8 (= 1), flags u8 (0, reserved), count u16, sequence u32
    record  t i64 (microseconds), x u16, y u16, p u8 (0 or 1)      -- exactly EVENT_DTYPE

The sequence number increases by one per datagram (mod 2**32); forward jumps are counted as lost
datagrams. A payload with another magic or version, or a length other than ``12 + 13 * count``, is
garbage.

Garbage datagrams are counted (``stats["garbage_packets"]``) and skipped, never raised; events with a
polarity above 1 or coordinates outside ``sensor_size`` are dropped and counted. The socket's receive
buffer is set to ``rcvbuf_bytes`` (bounded; the kernel drops datagrams beyond it) and datagrams are
received into one fixed buffer, so memory never grows with the input rate.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Iterator

import numpy as np

from ..events import EVENT_DTYPE
from .sources import EventSource, as_packet

DEFAULT_PORT = 3333  # the port SPIF's UDP listener uses for its first input pipe
FORMATS = ("spif", "stoprt")
MAGIC = b"STEV"
VERSION = 1
HEADER = struct.Struct("<4sBBHI")
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4
MAX_SPIF_COORD = 1 << 15
NO_TIMESTAMP = 1 << 31


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    return format


def encode_spif(events: np.ndarray) -> bytes:
    """SPIF words of ``events`` (timestamps are not carried); coordinates must be below 32768."""
    ev = as_packet(events)
    if len(ev) and (int(ev["x"].max()) >= MAX_SPIF_COORD or int(ev["y"].max()) >= MAX_SPIF_COORD):
        raise ValueError("SPIF coordinates are 15-bit: x and y must be below 32768")
    words = (NO_TIMESTAMP | (ev["x"].astype(np.uint32) << 16) | ((ev["p"].astype(np.uint32) & 1) << 15)
             | ev["y"].astype(np.uint32))
    return words.astype("<u4").tobytes()


def encode_stoprt(events: np.ndarray, sequence: int = 0) -> bytes:
    """One stoprt-format datagram payload (header and records)."""
    ev = as_packet(events)
    if len(ev) > 0xFFFF:
        raise ValueError(f"a stoprt datagram holds at most 65535 events, got {len(ev)}")
    return HEADER.pack(MAGIC, VERSION, 0, len(ev), sequence & 0xFFFFFFFF) + ev.astype(EVENT_DTYPE).tobytes()


class UDPSource(EventSource):
    """Events received on a local UDP port (see the module docstring for the formats).

    Args:
        host: address to bind; loopback by default. Use ``"0.0.0.0"`` to accept from other machines.
        port: UDP port (0 picks a free one; see :attr:`port`).
        format: ``"spif"`` or ``"stoprt"``.
        sensor_size: ``(W, H)``; events outside are dropped and counted. ``None`` accepts any coordinate.
        timeout_s: iteration ends after this many seconds without a datagram (``None``: wait for ever,
            until :meth:`close`).
        rcvbuf_bytes: socket receive buffer size.
        poll_s: how often a waiting receive checks for :meth:`close` from another thread.

    Raises OSError naming the address when the port cannot be bound.
    """

    live = True

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, format: str = "spif",
                 sensor_size: tuple[int, int] | None = None, timeout_s: float | None = None,
                 rcvbuf_bytes: int = 1 << 20, poll_s: float = 0.05) -> None:
        super().__init__()
        self.format = _check_format(format)
        if sensor_size is not None:
            w, h = (int(v) for v in sensor_size)
            if w < 1 or h < 1:
                raise ValueError(f"sensor_size must be positive, got {sensor_size!r}")
            self.sensor_size = (w, h)
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.timeout_s, self.poll_s = timeout_s, float(poll_s)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(rcvbuf_bytes))
            self._sock.bind((host, int(port)))
        except OSError as exc:
            self._sock.close()
            raise OSError(exc.errno, f"cannot listen for events on udp {host}:{port}: {exc.strerror}") from None
        self._sock.settimeout(self.poll_s)
        self.host, self.port = self._sock.getsockname()[:2]
        self._buf = bytearray(MAX_DATAGRAM + 1)
        self._t0 = time.monotonic_ns()
        self._expected_seq: int | None = None
        self._counts = {"packets": 0, "events": 0, "bytes": 0, "garbage_packets": 0, "bad_events": 0,
                        "out_of_bounds": 0, "lost_packets": 0, "reordered_packets": 0}

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._counts)

    def _packets(self) -> Iterator[np.ndarray]:
        view = memoryview(self._buf)
        last = time.monotonic()
        while not self.closed:
            try:
                n = self._sock.recv_into(self._buf)
            except socket.timeout:
                if self.timeout_s is not None and time.monotonic() - last >= self.timeout_s:
                    return
                continue
            last = time.monotonic()
            events = self.decode(bytes(view[:n]), (time.monotonic_ns() - self._t0) // 1000)
            if events is not None and len(events):
                self._counts["events"] += len(events)
                yield events

    def decode(self, payload: bytes, t_us: int) -> np.ndarray | None:
        """The valid events of one datagram (``None`` for garbage), updating the counters."""
        self._counts["packets"] += 1
        self._counts["bytes"] += len(payload)
        events = self._decode_spif(payload, t_us) if self.format == "spif" else self._decode_stoprt(payload)
        if events is None:
            self._counts["garbage_packets"] += 1
            return None
        bad = events["p"] > 1
        self._counts["bad_events"] += int(bad.sum())
        if self.sensor_size is not None:
            outside = (events["x"] >= self.sensor_size[0]) | (events["y"] >= self.sensor_size[1])
            self._counts["out_of_bounds"] += int((outside & ~bad).sum())
            bad |= outside
        return events[~bad] if bad.any() else events

    @staticmethod
    def _decode_spif(payload: bytes, t_us: int) -> np.ndarray | None:
        if not payload or len(payload) % 4:
            return None
        words = np.frombuffer(payload, dtype="<u4")
        events = np.empty(len(words), dtype=EVENT_DTYPE)
        events["t"] = t_us
        events["x"] = (words >> 16) & 0x7FFF
        events["y"] = words & 0x7FFF
        events["p"] = (words >> 15) & 1
        return events

    def _decode_stoprt(self, payload: bytes) -> np.ndarray | None:
        if len(payload) < HEADER.size:
            return None
        magic, version, _flags, count, seq = HEADER.unpack_from(payload)
        if magic != MAGIC or version != VERSION or len(payload) != HEADER.size + count * EVENT_DTYPE.itemsize:
            return None
        late = False
        if self._expected_seq is not None and seq != self._expected_seq:
            gap = (seq - self._expected_seq) & 0xFFFFFFFF
            late = gap >= 1 << 31  # an older datagram arriving late: kept; the binner counts its events as backwards
            self._counts["reordered_packets" if late else "lost_packets"] += 1 if late else gap
        if not late:
            self._expected_seq = (seq + 1) & 0xFFFFFFFF
        return np.frombuffer(payload, dtype=EVENT_DTYPE, offset=HEADER.size).copy()

    def close(self) -> None:
        super().close()
        self._sock.close()

    def __repr__(self) -> str:
        return f"UDPSource({self.host!r}, {self.port}, format={self.format!r}, sensor_size={self.sensor_size})"


class UDPSender:
    """Sends event packets to a UDP port, for tests and demos.

    ``send(events)`` splits them into datagrams of at most ``max_events`` events and returns how many
    datagrams went out; ``send_raw(payload)`` sends arbitrary bytes (e.g. garbage, for tests).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, format: str = "spif",
                 max_events: int = 1024) -> None:
        self.format = _check_format(format)
        limit = (MAX_DATAGRAM // 4) if format == "spif" else (MAX_DATAGRAM - HEADER.size) // EVENT_DTYPE.itemsize
        if not 1 <= max_events <= limit:
            raise ValueError(f"max_events must be in 1..{limit} for format {format!r}, got {max_events}")
        self.address = (host, int(port))
        self.max_events = int(max_events)
        self.sequence = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, events: np.ndarray) -> int:
        ev = as_packet(events)
        sent = 0
        for start in range(0, len(ev), self.max_events):
            part = ev[start:start + self.max_events]
            if self.format == "spif":
                payload = encode_spif(part)
            else:
                payload = encode_stoprt(part, self.sequence)
                self.sequence = (self.sequence + 1) & 0xFFFFFFFF
            self.send_raw(payload)
            sent += 1
        return sent

    def send_raw(self, payload: bytes) -> None:
        self._sock.sendto(payload, self.address)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "UDPSender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
