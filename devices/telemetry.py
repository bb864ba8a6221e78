"""Telemetry on Jetson and other Linux machines: one import for all of it.

* tegrastats lines: :func:`parse_tegrastats` (:mod:`stoprt.devices.tegrastats`)
* sysfs/procfs readers: GPU load and clock, INA3221 power rails, system memory
  (:mod:`stoprt.devices.sysfs`)
* process (psutil) and torch.cuda allocator memory (:mod:`stoprt.devices.memory`)
* :class:`TelemetrySampler`, a background sampler over backends (:mod:`stoprt.devices.sampler`,
  :mod:`stoprt.devices.backends`)
* :func:`snapshot`, one reading of the system view for reports such as ``stoprt info``.

Every reader takes ``root`` (default "/") so fake trees stand in for boards in tests.
"""

from __future__ import annotations

from .backends import (Backend, BackendUnavailable, JtopBackend, ProcessBackend, SysfsBackend,
                       TegrastatsBackend, TorchBackend, make_backends, tegrastats_figures)
from .memory import (ProcessMemory, TorchCudaMemory, read_process_memory, read_torch_cuda_memory,
                     reset_torch_cuda_peaks)
from .rootfs import PathLike
from .sampler import FigureStats, Sample, TelemetrySampler, TelemetrySummary
from .sysfs import (PowerRail, SystemMemory, find_gpu_devfreq, read_gpu_freq_mhz,
                    read_gpu_load_pct, read_meminfo, read_power_rails, read_system_memory)
from .tegrastats import (CpuCore, Engine, Rail, TegrastatsProcess, TegrastatsSample,
                         parse_tegrastats, tegrastats_command)

__all__ = [
    "Backend", "BackendUnavailable", "CpuCore", "Engine", "FigureStats", "JtopBackend",
    "PowerRail", "ProcessBackend", "ProcessMemory", "Rail", "Sample", "SysfsBackend",
    "SystemMemory", "TegrastatsBackend", "TegrastatsProcess", "TegrastatsSample",
    "TelemetrySampler", "TelemetrySummary", "TorchBackend", "TorchCudaMemory", "find_gpu_devfreq",
    "make_backends", "parse_tegrastats", "read_gpu_freq_mhz", "read_gpu_load_pct", "read_meminfo",
    "read_power_rails", "read_process_memory", "read_system_memory", "read_torch_cuda_memory",
    "reset_torch_cuda_peaks", "snapshot", "tegrastats_command", "tegrastats_figures",
]


def snapshot(root: PathLike = "/") -> dict:
    """One reading of the system view under ``root``; unreadable figures are None.

    Power rails map label -> {voltage_mv, current_ma, power_mw}.
    """
    devfreq = find_gpu_devfreq(root)
    mem = read_system_memory(root)
    return {
        "gpu_load_pct": read_gpu_load_pct(root, devfreq) if devfreq else None,
        "gpu_freq_mhz": read_gpu_freq_mhz(root, devfreq) if devfreq else None,
        "mem_total_mib": mem.total_mib,
        "mem_available_mib": mem.available_mib,
        "mem_system_used_mib": mem.used_mib,
        "power_rails": {k: {"voltage_mv": r.voltage_mv, "current_ma": r.current_ma,
                            "power_mw": r.power_mw}
                        for k, r in read_power_rails(root).items()},
    }
