"""Meters of what a network costs in this process, used by profiles (:mod:`.measure`), the
benchmarks and the tests:

* :class:`SavedTensorsMeter`: the exact autograd view, distinct storages saved for backward
  (``saved_tensors_hooks``; parameters and buffers excluded, they exist anyway) together with the
  layers' state tensors, at the end of each step's forward. Deterministic, so it is what the planner
  is tested against;
* :class:`RSSPeak`: this process's resident set size, sampled every millisecond in a thread;
* :func:`release_free_memory`: hand freed memory back to the OS before a baseline is taken.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Callable

import psutil
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...runtime import layers as L


class RSSPeak(threading.Thread):
    """Samples this process's resident set size every millisecond; :meth:`stop` returns the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak = psutil.Process(), 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, self.proc.memory_info().rss)


def release_free_memory() -> None:
    """Hand memory freed so far back to the OS, so a baseline counts only live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline then includes the allocator's free pool
        pass


def _storage(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class SavedTensorsMeter:
    """Distinct storages saved for backward plus the layers' state tensors, with their peaks.

    Use as the ``saved_tensors_hooks`` context around the steps; call :meth:`new_step` where the
    previous graph has been freed (after each STOP step) and :meth:`snapshot` at the end of each
    step's forward (the learner's loss does it, see :meth:`loss`). ``state`` lists the tensors the
    network keeps between steps (default: stoprt layers' state and traces).
    """

    def __init__(self, net: nn.Module, state: Callable[[nn.Module], list[Tensor]] = L.state_tensors) -> None:
        self.net, self._state = net, state
        self.persistent = {_storage(t)[0] for t in list(net.parameters()) + list(net.buffers())}
        self.saved: dict[int, int] = {}
        self.saved_bytes = 0
        self.peak_saved = self.peak_total = self.state_at_peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def __enter__(self) -> SavedTensorsMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: Tensor) -> Tensor:
        key, nbytes = _storage(t)
        if key and key not in self.persistent and key not in self.saved:
            self.saved[key] = nbytes
            self.saved_bytes += nbytes
            self.peak_saved = max(self.peak_saved, self.saved_bytes)
        return t

    def new_step(self) -> None:
        self.saved.clear()
        self.saved_bytes = 0

    def reset(self) -> None:
        """Forget the peaks (a new measurement starts)."""
        self.new_step()
        self.peak_saved = self.peak_total = self.state_at_peak = 0

    def snapshot(self) -> None:
        state = {}
        for t in self._state(self.net):
            key, nbytes = _storage(t)
            state[key] = nbytes
        total = self.saved_bytes + sum(b for k, b in state.items() if k not in self.saved)
        if total > self.peak_total:
            self.peak_total, self.state_at_peak = total, sum(state.values())

    def loss(self, kind: str = "ce"):
        """A learner loss that takes the snapshot once the step's graph (loss included) is built."""
        def fn(output: Tensor, target: Tensor) -> Tensor:
            if kind == "ce":
                value = F.cross_entropy(output, target)
            else:
                value = F.mse_loss(output, F.one_hot(target, output.shape[1]).to(output.dtype))
            self.snapshot()
            return value
        return fn
