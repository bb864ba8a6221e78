"""Read Jetson telemetry straight from sysfs and /proc, without tegrastats or root services.

* GPU load: per-mille in the ``load`` attribute of the GPU's devfreq device (the devfreq entry under
  /sys/class/devfreq whose ``device/of_node/name`` contains "gpu"); clock in ``cur_freq`` (Hz).
* Power: INA3221 monitors under /sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/ give, per channel N,
  ``inN_label``, ``inN_input`` (bus mV) and ``currN_input`` (mA); power = mV * mA / 1000 mW.
* Memory: /proc/meminfo; "system used" = MemTotal - MemAvailable, which on a Jetson (CPU and GPU
  share the DRAM) is what decides out-of-memory.

All paths are read under a configurable root. Missing or unreadable files give None for that figure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import rootfs

_INA3221_GLOB = "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
_LABEL_RE = re.compile(r"^in(\d+)_label$")
# Channels labelled like this are wired to nothing (AGX Orin's second monitor has "NC" channels).
_UNWIRED = {"NC", ""}


@dataclass
class PowerRail:
    """One INA3221 channel; a figure is None where its file was missing or unreadable."""

    label: str
    voltage_mv: float | None
    current_ma: float | None

    @property
    def power_mw(self) -> float | None:
        """Bus voltage times current, in mW."""
        if self.voltage_mv is None or self.current_ma is None:
            return None
        return self.voltage_mv * self.current_ma / 1000.0


@dataclass
class SystemMemory:
    """/proc/meminfo figures in MiB; ``used_mib`` is MemTotal - MemAvailable."""

    total_mib: float | None
    available_mib: float | None

    @property
    def used_mib(self) -> float | None:
        """Memory in use system-wide (None if either figure is missing)."""
        if self.total_mib is None or self.available_mib is None:
            return None
        return self.total_mib - self.available_mib


def find_gpu_devfreq(root: rootfs.PathLike = "/") -> Path | None:
    """The devfreq directory of the GPU, or None when there is none (not a Jetson)."""
    for entry in rootfs.glob(root, "/sys/class/devfreq/*"):
        name = rootfs.read_text(entry, "device/of_node/name") or ""
        if "gpu" in name.lower():
            return entry
    return None


def read_gpu_load_pct(root: rootfs.PathLike = "/", devfreq: Path | None = None) -> float | None:
    """GPU load in percent (sysfs gives per-mille), or None."""
    devfreq = devfreq or find_gpu_devfreq(root)
    if devfreq is None:
        return None
    # The attribute belongs to the GPU device; some kernels expose it on the devfreq node too.
    for path in (devfreq / "device" / "load", devfreq / "load"):
        value = rootfs.read_number(path)
        if value is not None:
            return value / 10.0
    return None


def read_gpu_freq_mhz(root: rootfs.PathLike = "/", devfreq: Path | None = None) -> float | None:
    """Current GPU clock in MHz (devfreq ``cur_freq`` is in Hz), or None."""
    devfreq = devfreq or find_gpu_devfreq(root)
    if devfreq is None:
        return None
    hz = rootfs.read_number(devfreq / "cur_freq")
    return hz / 1e6 if hz is not None else None


def read_power_rails(root: rootfs.PathLike = "/") -> dict[str, PowerRail]:
    """All labelled INA3221 channels by label; empty when the board has none readable.

    A channel needs ``inN_label`` plus ``currN_input`` to be a power rail; the driver's extra
    channels (shunt voltages, their sum) have no matching current and are left out.
    """
    rails: dict[str, PowerRail] = {}
    for hwmon in rootfs.glob(root, _INA3221_GLOB):
        for label_file in sorted(hwmon.glob("in*_label")):
            m = _LABEL_RE.match(label_file.name)
            label = (rootfs.read_text(hwmon, label_file.name) or "").strip()
            if not m or label in _UNWIRED or not (hwmon / f"curr{m.group(1)}_input").exists():
                continue
            channel = m.group(1)
            # Two monitors may share a label; keep both, told apart by the i2c device.
            key = label if label not in rails else f"{label}@{hwmon.parent.parent.name}"
            rails[key] = PowerRail(label=label,
                                   voltage_mv=rootfs.read_number(hwmon / f"in{channel}_input"),
                                   current_ma=rootfs.read_number(hwmon / f"curr{channel}_input"))
    return rails


def read_meminfo(root: rootfs.PathLike = "/") -> dict[str, int]:
    """/proc/meminfo as {field: kB}; empty when unreadable."""
    out: dict[str, int] = {}
    for line in (rootfs.read_text(root, "/proc/meminfo") or "").splitlines():
        key, sep, value = line.partition(":")
        parts = value.split()
        if sep and parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def read_system_memory(root: rootfs.PathLike = "/") -> SystemMemory:
    """MemTotal and MemAvailable in MiB (each None when missing)."""
    info = read_meminfo(root)
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    return SystemMemory(total / 1024 if total is not None else None,
                        available / 1024 if available is not None else None)
