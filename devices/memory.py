"""Process and allocator memory views (the system view is in :mod:`stoprt.devices.sysfs`).

* process: psutil RSS, and USS where the platform allows it. On a Jetson RSS does not include GPU
  buffers, so read it next to the system view.
* allocator: torch.cuda's peak allocated/reserved bytes; it leaves out the CUDA context, library
  workspaces and TensorRT/ORT arenas.

torch is imported inside the functions: a process that never uses it should not pay ~400 MiB.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import psutil

_MIB = 2**20


@dataclass
class ProcessMemory:
    """Resident memory of one process in MiB; USS is None where it cannot be read."""

    rss_mib: float
    uss_mib: float | None


@dataclass
class TorchCudaMemory:
    """torch.cuda caching-allocator figures for the current device, in MiB."""

    allocated_mib: float
    reserved_mib: float
    max_allocated_mib: float
    max_reserved_mib: float


def read_process_memory(pid: int | None = None, uss: bool = True) -> ProcessMemory | None:
    """RSS and (if ``uss``) USS of ``pid`` (default: this process); None if the process is gone.

    USS walks the process's memory maps, which is slow for large processes; pass ``uss=False``
    when sampling often.
    """
    try:
        proc = psutil.Process(pid if pid is not None else os.getpid())
        rss = proc.memory_info().rss / _MIB
    except psutil.Error:
        return None
    uss_mib = None
    if uss:
        try:
            uss_mib = proc.memory_full_info().uss / _MIB
        except (psutil.Error, AttributeError):  # AccessDenied, or a platform without USS
            pass
    return ProcessMemory(rss, uss_mib)


def _cuda_torch(import_torch: bool):
    """The torch module if CUDA is usable, else None; imports torch only if ``import_torch``."""
    torch = sys.modules.get("torch")
    if torch is None and import_torch and importlib.util.find_spec("torch") is not None:
        import torch
    if torch is None or not torch.cuda.is_available():
        return None
    return torch


def read_torch_cuda_memory(import_torch: bool = True) -> TorchCudaMemory | None:
    """Allocator figures for the current CUDA device, or None without torch or CUDA.

    ``import_torch=False`` only looks at a torch the process already imported (used by the sampler,
    which must not load torch into a process that does not use it).
    """
    torch = _cuda_torch(import_torch)
    if torch is None:
        return None
    c = torch.cuda
    return TorchCudaMemory(c.memory_allocated() / _MIB, c.memory_reserved() / _MIB,
                           c.max_memory_allocated() / _MIB, c.max_memory_reserved() / _MIB)


def reset_torch_cuda_peaks(import_torch: bool = True) -> bool:
    """Reset torch.cuda's peak statistics; False when there is no CUDA to reset."""
    torch = _cuda_torch(import_torch)
    if torch is None:
        return False
    torch.cuda.reset_peak_memory_stats()
    return True
