"""Parse tegrastats lines, and run ``tegrastats --interval MS`` as a subprocess.

tegrastats prints one line per interval; its fields changed across JetPack releases:

* ``RAM 4722/7844MB (lfb 2x4MB)``, ``SWAP 0/3922MB (cached 0MB)``
* ``CPU [5%@1510,3%@1510,off,...]`` (``off`` for an offline core)
* engines: ``EMC_FREQ 0%@2133``, ``GR3D_FREQ 0%@305`` (JetPack <= 6), ``GR3D_FREQ 0%@[305,305]``
  (JetPack 7 Orin), ``GR3D_FREQ @[1575,1575]`` without a load (Thor), ``EMC_FREQ 0%`` (older),
  ``VIC_FREQ 729``, ``APE 150``, ``NVENC off``
* temperatures ``cpu@47.5C`` (``-256C`` means "no reading")
* power rails ``VDD_IN 5139mW/5139mW`` (current/average), ``cur/avg/max``, or unitless on older
  boards (always mW).

A token the parser does not know is kept in ``unknown`` and skipped, never an error: a new JetPack
must not break telemetry.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field

_TOKEN_RE = re.compile(r"\S*\([^)]*\)\S*|\S+")  # keeps "(lfb 2x4MB)" in one token
_SIZE_RE = re.compile(r"^(\d+)/(\d+)(kB|MB|GB)$")
_PAREN_RE = re.compile(r"^\((lfb|cached)\s+([^)]*)\)$")
_CACHED_RE = re.compile(r"^(\d+)(kB|MB|GB)$")
_LOAD_FREQ_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)%)?(?:@(?:\[([\d,]*)\]|(\d+)))?$")
_TEMP_RE = re.compile(r"^([A-Za-z][\w.]*)@(-?\d+(?:\.\d+)?)C$")
_RAIL_RE = re.compile(r"^(\d+(?:\.\d+)?)(?:mW)?/(\d+(?:\.\d+)?)(?:mW)?(?:/(\d+(?:\.\d+)?)(?:mW)?)?$")
_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_DATE_RE = re.compile(r"^\d\d-\d\d-\d{4}$")
_TIME_RE = re.compile(r"^\d\d:\d\d:\d\d$")
_TO_MIB = {"kB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
_NO_READING_C = -256.0  # what tegrastats prints for a sensor without a value


@dataclass
class CpuCore:
    """One core of the ``CPU [...]`` list; an offline core has no load and no clock."""

    online: bool
    load_pct: float | None = None
    freq_mhz: int | None = None


@dataclass
class Engine:
    """A hardware engine: GR3D_FREQ (GPU), EMC_FREQ (memory controller), VIC_FREQ, NVENC, ..."""

    load_pct: float | None = None
    freqs_mhz: list[int] = field(default_factory=list)  # one per GPC/instance where listed
    off: bool = False


@dataclass
class Rail:
    """A power rail in mW: current, average since tegrastats started, and maximum if printed."""

    cur_mw: float
    avg_mw: float
    max_mw: float | None = None


@dataclass
class TegrastatsSample:
    """One parsed tegrastats line. Sizes in MiB; absent fields are None or empty."""

    timestamp: str | None = None
    ram_used_mib: float | None = None
    ram_total_mib: float | None = None
    lfb: str | None = None  # largest free block, e.g. "2x4MB"
    swap_used_mib: float | None = None
    swap_total_mib: float | None = None
    swap_cached_mib: float | None = None
    cpus: list[CpuCore] = field(default_factory=list)
    engines: dict[str, Engine] = field(default_factory=dict)
    temps_c: dict[str, float] = field(default_factory=dict)
    rails: dict[str, Rail] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    @property
    def unknown_count(self) -> int:
        """How many tokens were skipped as unknown."""
        return len(self.unknown)

    @property
    def gpu_load_pct(self) -> float | None:
        """GR3D load; None where tegrastats prints none (Thor)."""
        gpu = self.engines.get("GR3D_FREQ")
        return gpu.load_pct if gpu else None

    @property
    def gpu_freq_mhz(self) -> int | None:
        """Highest GPU clock over the listed GPCs."""
        gpu = self.engines.get("GR3D_FREQ")
        return max(gpu.freqs_mhz) if gpu and gpu.freqs_mhz else None

    @property
    def cpu_load_pct(self) -> float | None:
        """Mean load of the online cores."""
        loads = [c.load_pct for c in self.cpus if c.load_pct is not None]
        return sum(loads) / len(loads) if loads else None


def _parse_engine(value: str) -> Engine | None:
    """``N%@MHz``, ``N%@[MHz,...]``, ``@[MHz,...]``, ``N%``, a bare clock, or ``off``."""
    if value == "off":
        return Engine(off=True)
    if value.isdigit():
        return Engine(freqs_mhz=[int(value)])
    m = _LOAD_FREQ_RE.match(value)
    if not m or not any(m.groups()):
        return None
    load, listed, single = m.groups()
    if listed is not None:
        freqs = [int(f) for f in listed.split(",") if f]
    else:
        freqs = [int(single)] if single else []
    return Engine(load_pct=float(load) if load else None, freqs_mhz=freqs)


def _parse_cpus(value: str) -> list[CpuCore] | None:
    if not (value.startswith("[") and value.endswith("]")):
        return None
    cores = []
    for item in value[1:-1].split(","):
        if item == "off":
            cores.append(CpuCore(online=False))
            continue
        engine = _parse_engine(item)
        if engine is None or engine.load_pct is None:
            return None
        cores.append(CpuCore(True, engine.load_pct, engine.freqs_mhz[0] if engine.freqs_mhz else None))
    return cores


def _parse_size(value: str) -> tuple[float, float] | None:
    m = _SIZE_RE.match(value)
    if not m:
        return None
    scale = _TO_MIB[m.group(3)]
    return int(m.group(1)) * scale, int(m.group(2)) * scale


def _parse_memory(sample: TegrastatsSample, name: str, value: str, extra: str | None) -> int:
    """Fill RAM or SWAP from ``name value [(lfb|cached ...)]``; returns the tokens used (0: malformed)."""
    size = _parse_size(value)
    if size is None:
        return 0
    paren = _PAREN_RE.match(extra or "")
    if name == "RAM":
        sample.ram_used_mib, sample.ram_total_mib = size
        if paren and paren.group(1) == "lfb":
            sample.lfb = paren.group(2)
            return 3
    else:
        sample.swap_used_mib, sample.swap_total_mib = size
        cached = _CACHED_RE.match(paren.group(2)) if paren and paren.group(1) == "cached" else None
        if cached:
            sample.swap_cached_mib = int(cached.group(1)) * _TO_MIB[cached.group(2)]
            return 3
    return 2


def _consume(sample: TegrastatsSample, tokens: list[str], i: int) -> int:
    """Record the field starting at ``tokens[i]``; returns the tokens used (0: not understood)."""
    tok = tokens[i]
    nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
    if _DATE_RE.match(tok) and _TIME_RE.match(nxt):
        sample.timestamp = f"{tok} {nxt}"
        return 2
    if tok in ("RAM", "SWAP"):
        return _parse_memory(sample, tok, nxt, tokens[i + 2] if i + 2 < len(tokens) else None)
    if tok == "CPU":
        cores = _parse_cpus(nxt)
        if cores is None:
            return 0
        sample.cpus = cores
        return 2
    temp = _TEMP_RE.match(tok)
    if temp:
        if float(temp.group(2)) > _NO_READING_C:
            sample.temps_c[temp.group(1)] = float(temp.group(2))
        return 1
    if not _NAME_RE.match(tok):
        return 0
    rail = _RAIL_RE.match(nxt)
    if rail:
        cur, avg, peak = rail.groups()
        sample.rails[tok] = Rail(float(cur), float(avg), float(peak) if peak else None)
        return 2
    engine = _parse_engine(nxt) if nxt else None
    if engine is None:
        return 0
    sample.engines[tok] = engine
    return 2


def parse_tegrastats(line: str) -> TegrastatsSample:
    """Parse one tegrastats line; unknown or malformed tokens are skipped into ``unknown``."""
    sample = TegrastatsSample()
    tokens = _TOKEN_RE.findall(line)
    i = 0
    while i < len(tokens):
        used = _consume(sample, tokens, i)
        if used == 0:
            sample.unknown.append(tokens[i])
            used = 1
        i += used
    return sample


def tegrastats_command(interval_ms: int, binary: str = "tegrastats") -> list[str] | None:
    """The command line for tegrastats at ``interval_ms``, or None if the binary is not found."""
    path = shutil.which(binary)
    if path is None:
        return None
    cmd = [path, "--interval", str(int(interval_ms))]
    # tegrastats writes through stdio: into a pipe it may block-buffer, so ask for line buffering.
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, "-oL", *cmd] if stdbuf else cmd


class TegrastatsProcess:
    """Runs a tegrastats command and keeps its latest parsed line.

    A reader thread consumes stdout so the pipe never fills; :meth:`latest` returns the newest
    sample (or None before the first line). :meth:`stop` terminates the process and joins.
    """

    def __init__(self, command: list[str]):
        self.command = command
        self.lines = 0
        self.unknown_tokens = 0
        self._latest: TegrastatsSample | None = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the process and its reader thread."""
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if not line.strip():
                continue
            sample = parse_tegrastats(line)
            with self._lock:
                self._latest = sample
                self.lines += 1
                self.unknown_tokens += sample.unknown_count

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def latest(self) -> TegrastatsSample | None:
        """The most recent parsed line."""
        with self._lock:
            return self._latest

    def stop(self, timeout_s: float = 2.0) -> None:
        """Terminate tegrastats (kill if it lingers) and join the reader."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None
