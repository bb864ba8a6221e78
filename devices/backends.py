"""Telemetry backends: sources of flat figures for :class:`stoprt.devices.sampler.TelemetrySampler`.

Each backend returns ``{figure: value}`` per sample, with figures named by the constants below
(power rails as ``power_mw.<rail>``, temperatures as ``temp_c.<sensor>``). A figure that cannot be
read this time is simply absent.

Backends: ``sysfs`` (GPU load/clock, INA3221 rails, system memory), ``process`` (RSS/USS),
``torch`` (CUDA allocator, only if the process already imported torch), ``tegrastats`` (the
binary as a subprocess) and ``jtop`` (jetson-stats, only if importable: it is AGPL and needs a root
service, so it is never installed by us).
"""

from __future__ import annotations

import importlib
import importlib.util
import numbers
from collections.abc import Sequence

from . import memory, rootfs, sysfs
from .tegrastats import TegrastatsProcess, TegrastatsSample, tegrastats_command

GPU_LOAD = "gpu.load_pct"
GPU_FREQ = "gpu.freq_mhz"
SYSTEM_USED = "mem.system_used_mib"
SWAP_USED = "mem.swap_used_mib"
CPU_LOAD = "cpu.load_pct"
EMC_LOAD = "emc.load_pct"
RSS = "proc.rss_mib"
USS = "proc.uss_mib"
TORCH_ALLOCATED = "torch.allocated_mib"
TORCH_RESERVED = "torch.reserved_mib"
TORCH_MAX_ALLOCATED = "torch.max_allocated_mib"
TORCH_MAX_RESERVED = "torch.max_reserved_mib"
POWER_PREFIX = "power_mw."
TEMP_PREFIX = "temp_c."


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run here."""


class Backend:
    """A source of figures. ``start``/``stop`` bracket a run; ``stop`` may add final figures."""

    name = "backend"

    def start(self) -> None:
        """Prepare to sample (default: nothing to prepare)."""

    def sample(self) -> dict[str, float]:
        """Figures readable now."""
        raise NotImplementedError

    def stop(self) -> dict[str, float]:
        """Release resources; returns figures known only at the end (default: none)."""
        return {}


class SysfsBackend(Backend):
    """GPU load and clock, INA3221 power rails and system memory from sysfs under ``root``."""

    name = "sysfs"

    def __init__(self, root: rootfs.PathLike = "/"):
        self.root = root
        self._devfreq = None

    def start(self) -> None:
        # Globbing /sys/class/devfreq every sample is wasted work: the GPU node does not move.
        self._devfreq = sysfs.find_gpu_devfreq(self.root)

    def sample(self) -> dict[str, float]:
        values = {SYSTEM_USED: sysfs.read_system_memory(self.root).used_mib}
        if self._devfreq is not None:
            values[GPU_LOAD] = sysfs.read_gpu_load_pct(self.root, self._devfreq)
            values[GPU_FREQ] = sysfs.read_gpu_freq_mhz(self.root, self._devfreq)
        for key, rail in sysfs.read_power_rails(self.root).items():
            values[POWER_PREFIX + key] = rail.power_mw
        return {k: v for k, v in values.items() if v is not None}


class ProcessBackend(Backend):
    """RSS (and USS unless ``uss=False``) of a process, by default this one."""

    name = "process"

    def __init__(self, pid: int | None = None, uss: bool = True):
        self.pid = pid
        self.uss = uss

    def sample(self) -> dict[str, float]:
        mem = memory.read_process_memory(self.pid, uss=self.uss)
        if mem is None:
            return {}
        values = {RSS: mem.rss_mib}
        if mem.uss_mib is not None:
            values[USS] = mem.uss_mib
        return values


class TorchBackend(Backend):
    """torch.cuda allocator: current figures per sample, exact peaks at the end."""

    name = "torch"

    def start(self) -> None:
        # The allocator tracks its own peak between samples; reset it so it covers this run only.
        memory.reset_torch_cuda_peaks(import_torch=False)

    def sample(self) -> dict[str, float]:
        mem = memory.read_torch_cuda_memory(import_torch=False)
        return {} if mem is None else {TORCH_ALLOCATED: mem.allocated_mib,
                                       TORCH_RESERVED: mem.reserved_mib}

    def stop(self) -> dict[str, float]:
        mem = memory.read_torch_cuda_memory(import_torch=False)
        return {} if mem is None else {TORCH_MAX_ALLOCATED: mem.max_allocated_mib,
                                       TORCH_MAX_RESERVED: mem.max_reserved_mib}


def tegrastats_figures(sample: TegrastatsSample) -> dict[str, float]:
    """A parsed tegrastats line as figures; its RAM "used" stands for the system view."""
    emc = sample.engines.get("EMC_FREQ")
    values = {
        SYSTEM_USED: sample.ram_used_mib,
        SWAP_USED: sample.swap_used_mib,
        GPU_LOAD: sample.gpu_load_pct,
        GPU_FREQ: sample.gpu_freq_mhz,
        CPU_LOAD: sample.cpu_load_pct,
        EMC_LOAD: emc.load_pct if emc else None,
    }
    values.update({POWER_PREFIX + k: r.cur_mw for k, r in sample.rails.items()})
    values.update({TEMP_PREFIX + k: t for k, t in sample.temps_c.items()})
    return {k: float(v) for k, v in values.items() if v is not None}


class TegrastatsBackend(Backend):
    """The latest line of a tegrastats subprocess (run at the sampler's interval)."""

    name = "tegrastats"

    def __init__(self, interval_ms: int = 100, command: list[str] | None = None):
        command = command or tegrastats_command(interval_ms)
        if command is None:
            raise BackendUnavailable("tegrastats not found on PATH")
        self.process = TegrastatsProcess(command)

    def start(self) -> None:
        self.process.start()

    def sample(self) -> dict[str, float]:
        latest = self.process.latest()
        return tegrastats_figures(latest) if latest else {}

    def stop(self) -> dict[str, float]:
        self.process.stop()
        return {"tegrastats.lines": float(self.process.lines),
                "tegrastats.unknown_tokens": float(self.process.unknown_tokens)}


class JtopBackend(Backend):
    """jetson-stats' ``jtop`` client, if the package and its service are present.

    Numeric entries of ``jtop.stats`` become ``jtop.<key>``; its power entries ("Power TOT",
    "Power VDD_IN", in mW) become ``power_mw.<rest>`` so energy is integrated for them too.
    """

    name = "jtop"

    def __init__(self):
        if importlib.util.find_spec("jtop") is None:
            raise BackendUnavailable("jtop (jetson-stats) is not installed")
        self._client = importlib.import_module("jtop").jtop()

    def start(self) -> None:
        self._client.start()

    def sample(self) -> dict[str, float]:
        values = {}
        for key, value in dict(self._client.stats).items():
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                continue
            name = POWER_PREFIX + key[6:] if key.startswith("Power ") else f"jtop.{key}"
            values[name] = float(value)
        return values

    def stop(self) -> dict[str, float]:
        self._client.close()
        return {}


def _auto(root: rootfs.PathLike, interval_s: float) -> list[Backend]:
    """sysfs and process always; torch when CUDA is in use; tegrastats when sysfs has no rails."""
    chosen: list[Backend] = [SysfsBackend(root), ProcessBackend()]
    if memory.read_torch_cuda_memory(import_torch=False) is not None:
        chosen.append(TorchBackend())
    if rootfs.is_host(root) and not sysfs.read_power_rails(root):
        command = tegrastats_command(max(1, round(interval_s * 1000)))
        if command is not None:
            chosen.append(TegrastatsBackend(command=command))
    return chosen


def make_backends(names: Sequence[str | Backend] | str, root: rootfs.PathLike = "/",
                  interval_s: float = 0.1) -> list[Backend]:
    """Backends from names ("sysfs", "process", "torch", "tegrastats", "jtop") or instances.

    ``"auto"`` picks what works here. A named backend that cannot run raises
    :class:`BackendUnavailable`.
    """
    if isinstance(names, str):
        names = [names]
    out: list[Backend] = []
    for name in names:
        if isinstance(name, Backend):
            out.append(name)
        elif name == "auto":
            out.extend(_auto(root, interval_s))
        elif name == "sysfs":
            out.append(SysfsBackend(root))
        elif name == "process":
            out.append(ProcessBackend())
        elif name == "torch":
            out.append(TorchBackend())
        elif name == "tegrastats":
            out.append(TegrastatsBackend(max(1, round(interval_s * 1000))))
        elif name == "jtop":
            out.append(JtopBackend())
        else:
            raise ValueError(f"unknown telemetry backend {name!r}; valid: auto, sysfs, process, "
                             "torch, tegrastats, jtop")
    return out
