"""Jetson board profiles and the JetPack releases they run.

Memory budget assumption (used by :attr:`BoardProfile.usable_mib`): CPU and GPU share one DRAM, so
what our work may use is ``DRAM - 1.5 GiB for the OS and desktop-less services - 0.5 GiB for the CUDA
context plus torch``. The 4 GB Orin Nano thus leaves about 2 GiB, which matches what is seen on the
board. It is a planning figure, not a guarantee: measure the system view during a run (see
:mod:`stoprt.devices.telemetry`).

Facts come from NVIDIA's module data sheets and release notes as known in late 2026; those marked in
``uncertain`` were not confirmed and should be checked on a device before relying on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

OS_RESERVE_MIB = 1536
CUDA_RESERVE_MIB = 512


@dataclass(frozen=True)
class JetPackRelease:
    """One row of the JetPack table: which L4T it ships and the CUDA/TensorRT it brings."""

    jetpack: str
    l4t: str  # the L4T major (or major.minor) prefix this row covers, e.g. "35" or "36.4"
    python: str
    cuda: str
    tensorrt: str
    socs: tuple[str, ...]  # SoCs the release supports

    def covers(self, l4t_version: str) -> bool:
        """Whether an L4T version such as "36.4.3" belongs to this release."""
        want = self.l4t.split(".")
        return l4t_version.split(".")[: len(want)] == want


JETPACK_RELEASES: tuple[JetPackRelease, ...] = (
    JetPackRelease("5.1.x", "35", "3.8", "11.4", "8.5", ("tegra194", "tegra234")),
    JetPackRelease("6.0", "36.3", "3.10", "12.2", "8.6", ("tegra234",)),
    JetPackRelease("6.1 / 6.2.x", "36.4", "3.10", "12.6", "10.3", ("tegra234",)),
    JetPackRelease("7.0 / 7.1", "38", "3.12", "13.0", "10.13", ("tegra264",)),
    JetPackRelease("7.2", "39", "3.12", "13.2", "10.16", ("tegra264", "tegra234")),
)

# Exact L4T point release -> JetPack version, where known; other versions report their table row.
_JETPACK_BY_L4T = {
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "38.2.0": "7.0",
}


def jetpack_release(l4t_version: str) -> JetPackRelease | None:
    """The JetPack table row an L4T version ("36.4.3") belongs to, or None if unknown."""
    # JETPACK_RELEASES has no overlapping prefixes, so the first match is the only one.
    return next((r for r in JETPACK_RELEASES if r.covers(l4t_version)), None)


def jetpack_version(l4t_version: str) -> str | None:
    """The exact JetPack version for an L4T version if known, else its table row's name."""
    if l4t_version in _JETPACK_BY_L4T:
        return _JETPACK_BY_L4T[l4t_version]
    row = jetpack_release(l4t_version)
    return row.jetpack if row else None


@dataclass(frozen=True)
class BoardProfile:
    """What a Jetson module offers our runtime."""

    key: str
    name: str
    soc: str  # device-tree SoC compatible: tegra194 (Xavier), tegra234 (Orin), tegra264 (Thor)
    modules: tuple[str, ...]  # part numbers in /proc/device-tree/compatible, e.g. "p3767-0003"
    dram_mib: int
    compute_capability: str
    gpu_arch: str
    cuda_cores: int | None
    uncertain: tuple[str, ...] = field(default=())  # facts not confirmed on a device

    @property
    def usable_mib(self) -> int:
        """Memory left for our work after the OS and a CUDA context plus torch (see module doc)."""
        return self.dram_mib - OS_RESERVE_MIB - CUDA_RESERVE_MIB

    @property
    def jetpacks(self) -> tuple[JetPackRelease, ...]:
        """JetPack releases (with their TensorRT) that support this board's SoC."""
        return tuple(r for r in JETPACK_RELEASES if self.soc in r.socs)

    def to_dict(self) -> dict:
        """Plain data, including the derived usable memory and supported releases."""
        out = asdict(self)
        out["uncertain"] = list(self.uncertain)
        out["modules"] = list(self.modules)
        out["usable_mib"] = self.usable_mib
        out["jetpacks"] = [{"jetpack": r.jetpack, "tensorrt": r.tensorrt, "cuda": r.cuda}
                           for r in self.jetpacks]
        return out


_GIB = 1024

BOARDS: dict[str, BoardProfile] = {
    b.key: b
    for b in (
        # Within JetPack 5, the Orin Nano modules are supported from 5.1.1 on.
        BoardProfile("orin-nano-4gb", "Jetson Orin Nano 4GB", "tegra234", ("p3767-0004",),
                     4 * _GIB, "8.7", "Ampere", 512),
        # p3767-0005 is the 8 GB module of the Orin Nano developer kit (SD card instead of eMMC).
        BoardProfile("orin-nano-8gb", "Jetson Orin Nano 8GB", "tegra234",
                     ("p3767-0003", "p3767-0005"), 8 * _GIB, "8.7", "Ampere", 1024),
        BoardProfile("orin-nx-8gb", "Jetson Orin NX 8GB", "tegra234", ("p3767-0001",),
                     8 * _GIB, "8.7", "Ampere", 1024),
        BoardProfile("orin-nx-16gb", "Jetson Orin NX 16GB", "tegra234", ("p3767-0000",),
                     16 * _GIB, "8.7", "Ampere", 1024),
        BoardProfile("agx-orin-32gb", "Jetson AGX Orin 32GB", "tegra234", ("p3701-0004",),
                     32 * _GIB, "8.7", "Ampere", 1792),
        BoardProfile("agx-orin-64gb", "Jetson AGX Orin 64GB", "tegra234", ("p3701-0005",),
                     64 * _GIB, "8.7", "Ampere", 2048),
        BoardProfile("xavier-nx-8gb", "Jetson Xavier NX 8GB", "tegra194",
                     ("p3668-0000", "p3668-0001"), 8 * _GIB, "7.2", "Volta", 384),
        BoardProfile("xavier-nx-16gb", "Jetson Xavier NX 16GB", "tegra194", ("p3668-0003",),
                     16 * _GIB, "7.2", "Volta", 384),
        # Thor part numbers are not confirmed: Thor modules are matched by SoC and memory size.
        BoardProfile("thor-t5000", "Jetson AGX Thor T5000 128GB", "tegra264", (),
                     128 * _GIB, "11.0", "Blackwell", 2560,
                     ("module part number unknown: matched by SoC and memory",)),
        BoardProfile("thor-t4000", "Jetson T4000 64GB", "tegra264", (),
                     64 * _GIB, "11.0", "Blackwell", 1536,
                     ("module part number unknown: matched by SoC and memory",
                      "CUDA core count 1536 not confirmed")),
    )
}


class UnknownBoardError(KeyError):
    """A board key that has no profile; the message lists the valid keys."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])


def board_keys() -> list[str]:
    """All profile keys, e.g. "orin-nano-4gb"."""
    return list(BOARDS)


def get_board(key: str) -> BoardProfile:
    """The profile for ``key``; raises :class:`UnknownBoardError` naming the valid keys."""
    try:
        return BOARDS[key]
    except KeyError:
        raise UnknownBoardError(
            f"unknown board {key!r}; valid boards: {', '.join(BOARDS)}") from None


def board_for_module(part: str) -> BoardProfile | None:
    """The profile for a module part number such as "p3767-0003", or None."""
    return next((b for b in BOARDS.values() if part in b.modules), None)


def board_for_memory(soc: str, mem_total_mib: float) -> BoardProfile | None:
    """The profile of ``soc`` whose DRAM is nearest the kernel's MemTotal, if that is unambiguous.

    MemTotal is a little below the DRAM size (firmware carve-outs), hence "nearest". Boards that
    share a SoC and a DRAM size (Orin Nano 8GB and Orin NX 8GB) cannot be told apart: None.
    """
    candidates = [b for b in BOARDS.values() if b.soc == soc]
    if not candidates:
        return None
    best = min(abs(b.dram_mib - mem_total_mib) for b in candidates)
    nearest = [b for b in candidates if abs(b.dram_mib - mem_total_mib) == best]
    return nearest[0] if len(nearest) == 1 else None
