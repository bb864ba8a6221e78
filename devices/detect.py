"""Detect what we run on: a Jetson, a machine with a discrete CUDA GPU, or a CPU only.

Every file is read under a configurable ``root`` (default "/"), so a fake tree in the real formats
stands in for a board in tests. torch is only asked about CUDA when ``root`` is the real "/" (a fake
tree describes another machine) and only imported inside :func:`probe_cuda`, because importing it
costs seconds and ~400 MiB.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import asdict, dataclass

from . import boards, rootfs, sysfs

_SOC_NAMES = {"tegra194": "Xavier", "tegra234": "Orin", "tegra264": "Thor"}
# aarch64 /proc/cpuinfo has no "model name"; name the cores by (implementer, part).
_ARM_CORES = {
    ("0x41", "0xd42"): "Cortex-A78AE",  # Orin
    ("0x4e", "0x004"): "NVIDIA Carmel",  # Xavier
    ("0x41", "0xd83"): "Neoverse-V3AE",  # Thor (part id not confirmed on a device)
}
_RELEASE_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")
_PART_RE = re.compile(r"p\d{4}-\d{4}")


@dataclass
class CpuInfo:
    """The host CPU as /proc/cpuinfo shows it."""

    model: str | None
    cores: int | None  # logical processors


@dataclass
class GpuInfo:
    """A CUDA device as torch reports it (also the integrated GPU of a Jetson)."""

    name: str
    total_memory_mib: float
    compute_capability: str
    is_integrated: bool
    count: int  # CUDA devices visible; the others are not described


@dataclass
class JetsonInfo:
    """What the device tree and L4T release file say about a Jetson."""

    model: str | None  # /proc/device-tree/model, e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    compatible: list[str]
    soc: str | None  # "tegra234"
    module: str | None  # part number, e.g. "p3767-0003"
    l4t: str | None  # "36.4.3"
    jetpack: str | None  # "6.2", or the table row ("6.1 / 6.2.x") if the point release is unknown
    board: str | None  # profile key in stoprt.devices.boards
    board_matched_by: str | None  # "module" or "memory"


@dataclass
class DeviceInfo:
    """The detected device; ``kind`` is "jetson", "cuda" or "cpu"."""

    kind: str
    cpu: CpuInfo
    mem_total_mib: float | None
    kernel: str | None
    jetson: JetsonInfo | None = None
    gpu: GpuInfo | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready data, with the board profile and JetPack row expanded."""
        out = asdict(self)
        profile = self.board_profile
        out["board_profile"] = profile.to_dict() if profile else None
        row = boards.jetpack_release(self.jetson.l4t) if self.jetson and self.jetson.l4t else None
        out["jetpack_release"] = asdict(row) if row else None
        return out

    @property
    def board_profile(self) -> boards.BoardProfile | None:
        """The matched Jetson board profile, if any."""
        if self.jetson and self.jetson.board:
            return boards.get_board(self.jetson.board)
        return None

    def describe(self) -> str:
        """A readable multi-line summary."""
        lines = [f"Device: {self._title()} [{self.kind}]"]
        if self.jetson:
            lines += self._describe_jetson()
        cores = f" x {self.cpu.cores}" if self.cpu.cores else ""
        lines.append(f"  CPU:      {self.cpu.model or 'unknown'}{cores}")
        lines.append(f"  RAM:      {_mib(self.mem_total_mib)} total")
        if self.gpu:
            g = self.gpu
            where = "integrated" if g.is_integrated else "discrete"
            more = f" (+{g.count - 1} more)" if g.count > 1 else ""
            lines.append(f"  CUDA:     {g.name}{more}, {where}, {_mib(g.total_memory_mib)}, "
                         f"compute capability {g.compute_capability}")
        if self.kernel:
            lines.append(f"  kernel:   {self.kernel}")
        return "\n".join(lines)

    def _title(self) -> str:
        if self.jetson and self.jetson.model:
            return self.jetson.model
        if self.gpu:
            return self.gpu.name
        return self.cpu.model or "unknown CPU"

    def _describe_jetson(self) -> list[str]:
        j = self.jetson
        assert j is not None
        soc = f"{j.soc} ({_SOC_NAMES.get(j.soc or '', 'unknown')})" if j.soc else "unknown"
        lines = [f"  SoC:      {soc}"]
        profile = self.board_profile
        if profile:
            via = f"{j.module}, by {j.board_matched_by}" if j.module else f"by {j.board_matched_by}"
            lines.append(f"  board:    {profile.key} ({profile.name}; {via})")
            cores = f", {profile.cuda_cores} CUDA cores" if profile.cuda_cores else ""
            lines.append(f"  GPU:      {profile.gpu_arch}, compute capability "
                         f"{profile.compute_capability}{cores}")
            lines.append(f"  budget:   ~{profile.usable_mib} MiB usable of {profile.dram_mib} MiB "
                         f"DRAM (after {boards.OS_RESERVE_MIB} MiB OS, "
                         f"{boards.CUDA_RESERVE_MIB} MiB CUDA+torch)")
            if profile.uncertain:
                lines.append(f"  unconfirmed: {'; '.join(profile.uncertain)}")
        else:
            lines.append(f"  board:    no profile (module {j.module or 'unknown'})")
        if j.l4t:
            row = boards.jetpack_release(j.l4t)
            stack = f" (CUDA {row.cuda}, TensorRT {row.tensorrt}, Python {row.python})" if row else ""
            lines.append(f"  L4T:      {j.l4t} -> JetPack {j.jetpack or 'unknown'}{stack}")
        else:
            lines.append("  L4T:      unknown (no /etc/nv_tegra_release)")
        return lines


def _mib(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f} MiB"


def parse_l4t_release(text: str) -> str | None:
    """L4T version from /etc/nv_tegra_release: "# R36 (release), REVISION: 4.3, ..." -> "36.4.3"."""
    m = _RELEASE_RE.search(text)
    if not m:
        return None
    revision = m.group(2).strip(".").split(".")
    # Pad to major.minor.patch so "REVISION: 3.0" and "REVISION: 3" both give 36.3.0.
    parts = [m.group(1), *revision, "0", "0"][:3]
    return ".".join(parts)


def module_part(compatible: list[str]) -> str | None:
    """The module part number from device-tree compatible entries.

    Entries come as "nvidia,p3767-0003" or as "carrier+module" ("nvidia,p3768-0000+p3767-0005-super");
    a stand-alone entry names the module, else the part after the last "+".
    """
    standalone = [c for c in compatible if "+" not in c]
    combined = [c.rsplit("+", 1)[1] for c in compatible if "+" in c]
    for entry in standalone + combined:
        m = _PART_RE.search(entry)
        if m:
            return m.group(0)
    return None


def read_compatible(root: rootfs.PathLike = "/") -> list[str]:
    """The NUL-separated /proc/device-tree/compatible list; empty when absent."""
    raw = rootfs.read_bytes(root, "/proc/device-tree/compatible") or b""
    return [c for c in raw.decode("ascii", "replace").split("\0") if c]


def read_cpu(root: rootfs.PathLike = "/") -> CpuInfo:
    """CPU model and logical core count from /proc/cpuinfo (x86 and aarch64 layouts)."""
    text = rootfs.read_text(root, "/proc/cpuinfo")
    if text is None:
        return CpuInfo(None, os.cpu_count() if rootfs.is_host(root) else None)
    fields: dict[str, str] = {}
    cores = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            cores += 1
        fields.setdefault(key, value.strip())
    model = fields.get("model name")
    if model is None and "CPU part" in fields:
        ident = (fields.get("CPU implementer", "").lower(), fields["CPU part"].lower())
        model = _ARM_CORES.get(ident, f"ARM implementer {ident[0]} part {ident[1]}")
    return CpuInfo(model, cores or None)


def read_jetson(root: rootfs.PathLike = "/", mem_total_mib: float | None = None,
                kernel: str | None = None) -> JetsonInfo | None:
    """Jetson facts from the device tree and /etc/nv_tegra_release, or None if not a Jetson."""
    raw_model = rootfs.read_bytes(root, "/proc/device-tree/model")
    model = raw_model.decode("ascii", "replace").rstrip("\0").strip() if raw_model else None
    compatible = read_compatible(root)
    release = rootfs.read_text(root, "/etc/nv_tegra_release")
    soc = next((c.split(",", 1)[1] for c in compatible if c.startswith("nvidia,tegra")), None)
    is_jetson = (release is not None or soc is not None
                 or (model or "").startswith("NVIDIA Jetson")
                 or (kernel or "").endswith("-tegra"))
    if not is_jetson:
        return None
    l4t = parse_l4t_release(release) if release else None
    module = module_part(compatible)
    profile = boards.board_for_module(module) if module else None
    matched_by = "module" if profile else None
    if profile is None and soc and mem_total_mib:
        profile = boards.board_for_memory(soc, mem_total_mib)
        matched_by = "memory" if profile else None
    return JetsonInfo(model=model, compatible=compatible, soc=soc, module=module, l4t=l4t,
                      jetpack=boards.jetpack_version(l4t) if l4t else None,
                      board=profile.key if profile else None, board_matched_by=matched_by)


def probe_cuda() -> GpuInfo | None:
    """The first CUDA device via torch, or None without torch or CUDA. Imports torch here."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(name=props.name, total_memory_mib=props.total_memory / 2**20,
                   compute_capability=f"{props.major}.{props.minor}",
                   is_integrated=bool(getattr(props, "is_integrated", False)),
                   count=torch.cuda.device_count())


def detect(root: rootfs.PathLike = "/", use_torch: bool | None = None) -> DeviceInfo:
    """Detect the device under ``root``.

    ``use_torch`` asks torch about CUDA devices; by default only when ``root`` is "/".
    """
    if use_torch is None:
        use_torch = rootfs.is_host(root)
    kernel = (rootfs.read_text(root, "/proc/sys/kernel/osrelease") or "").strip() or None
    mem_total = sysfs.read_system_memory(root).total_mib
    jetson = read_jetson(root, mem_total, kernel)
    gpu = probe_cuda() if use_torch else None
    kind = "jetson" if jetson else ("cuda" if gpu else "cpu")
    return DeviceInfo(kind=kind, cpu=read_cpu(root), mem_total_mib=mem_total, kernel=kernel,
                      jetson=jetson, gpu=gpu)
