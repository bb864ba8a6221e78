"""The static step's update and counters: the eager learner's guards, decided on the device.

The eager learner (:meth:`~stoprt.runtime.learner.Learner._apply_update`) reads two flags on the host
at each update: are the gradients finite, and are the updated parameters. Here both stay tensors and
select, element by element, what is kept, so the update runs without a host read (and can be
captured as a CUDA graph):

* non-finite gradients: the optimizer still steps, then parameters *and* optimizer state are put
  back (``torch.where``): nothing changed, as in eager, where the optimizer never runs;
* finite gradients but non-finite parameters after the step: parameters put back, the optimizer
  state keeps the step (as in eager);
* thresholds and leaks are clamped into their ranges, counting the clamped values;
* ``updates`` / ``rejected_updates`` / ``clamped_values`` and the last loss are device tensors,
  read when :class:`DeviceStats` is read (that read synchronises; do it outside the step).

For parameters in host memory (a CPU) reading a flag is no synchronisation, so there the update
branches on the flags instead (``host_decisions``): the same outcomes without copying the optimizer
state. Tests run both on a CPU.

Optimizer state that the first step creates has no earlier value: on a rejected update it is reset
to zeros, which is a fresh state for Adam/AdamW/RMSprop and for SGD momentum without dampening.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from . import layers as L
from .learner import LearnerStats
from .static_optim import direct_step


def steps_on_host(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps its step counts in host memory (``capturable=False``: torch's Adam
    and AdamW unless created with ``capturable=True``), so that its step cannot be captured."""
    return any(group.get("capturable") is False for group in optimizer.param_groups)


class GuardedUpdate:
    """One optimizer update on the preallocated ``.grad`` tensors, with the finiteness guard, the
    clamps and the counters on the device. Grads are zeroed in place after it."""

    def __init__(self, optimizer: torch.optim.Optimizer, net: torch.nn.Module, keep_last_good: bool,
                 grad_sync: Callable[[], Callable | None]) -> None:
        self.optimizer, self.keep_last_good, self.grad_sync = optimizer, keep_last_good, grad_sync
        self._step = direct_step(optimizer)  # optimizer.step() without torch.optim's dynamo guards
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        for p in self.params:  # allocated once; accumulated into in place
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        device = self.params[0].device if self.params else torch.device("cpu")
        self.clamps = NeuronClamps(L.neurons(net), device)
        self.saved = [torch.empty_like(p) for p in self.params]
        self.saved_state: list[Tensor] = []
        # updates, rejected updates, clamped values, updates that made NaN/Inf with keep_last_good off
        self.counts = torch.zeros(4, dtype=torch.int64, device=device)
        self._found = torch.zeros(2, dtype=torch.float32, device=device)  # non-finite: grads, params
        self._one = torch.ones((), dtype=torch.float32, device=device)
        # Branch on the guard's flags on the host (CPU tensors; or an optimizer that keeps its step
        # counts there, whose update is not captured anyway) or select on the device (CUDA graphs).
        self.host_decisions = device.type == "cpu" or steps_on_host(optimizer)

    def _finite(self, tensors: list[Tensor], i: int) -> Tensor:
        """Whether every element of ``tensors`` is finite, as a bool tensor: one fused pass (the check
        AMP's GradScaler uses; it multiplies by 1 in place, which changes no value)."""
        found = self._found[i]
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, self._one)
        return found == 0

    def _state(self) -> list[Tensor]:
        return [v for p in self.params for v in self.optimizer.state.get(p, {}).values()
                if isinstance(v, Tensor)]

    @torch.no_grad()
    def __call__(self) -> None:
        if not self.params:
            return
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:  # user code set it to None (zero_grad): put the buffer back
                p.grad = g
        sync = self.grad_sync()
        if sync is not None:
            sync(self.params)
        grads_ok = self._finite(self.grads, 0)
        if self.host_decisions:
            self._decide_on_host(grads_ok)
        else:
            self._decide_on_device(grads_ok)
        torch._foreach_zero_(self.grads)

    def _decide_on_host(self, grads_ok: Tensor) -> None:
        """The same outcomes, branching on the flags: for tensors in host memory reading one is no
        synchronisation, and it spares copying and restoring the optimizer state."""
        counts = self.counts
        if not bool(grads_ok):
            counts[1] += 1
            return
        if self.keep_last_good:
            torch._foreach_copy_(self.saved, self.params)
        self._step()
        if not bool(self._finite(self.params, 1)):
            if self.keep_last_good:
                torch._foreach_copy_(self.params, self.saved)
                counts[1] += 1
                return
            counts[3] += 1
        clamped = self.clamps()
        counts[0] += 1
        counts[2] += clamped

    def _decide_on_device(self, grads_ok: Tensor) -> None:
        state = self._state()
        if len(self.saved_state) != len(state):  # first update (or new state): buffers for its copy
            self.saved_state = [torch.empty_like(t) for t in state]
        if state:
            torch._foreach_copy_(self.saved_state, state)
        torch._foreach_copy_(self.saved, self.params)  # also for keep_last_good=False: bad grads
        self._step()
        params_ok = self._finite(self.params, 1)
        ok = grads_ok & params_ok if self.keep_last_good else grads_ok
        for p, old in zip(self.params, self.saved):
            torch.where(ok, p, old, out=p)
        new_state = self._state()
        if state:
            for t, old in zip(new_state, self.saved_state):
                torch.where(grads_ok, t, old, out=t)
        else:  # created by this step: zeros are the fresh state
            for t in new_state:
                torch.where(grads_ok, t, torch.zeros_like(t), out=t)
        clamped = self.clamps()
        self.counts += torch.stack([ok.long(), (~ok).long(), clamped,
                                    (grads_ok & ~params_ok).long() if not self.keep_last_good else
                                    clamped.new_zeros(())])


class NeuronClamps:
    """Clamp every neuron layer's leak and threshold into range; how many values were out (a tensor).
    Mirrors ``constrain_`` of the layers without their host reads, in a fixed handful of fused calls
    whatever the depth: the values gathered into one flat tensor, compared with flat bounds, clamped
    and copied back (per layer it was nine kernel launches at every update on a GPU)."""

    def __init__(self, neurons: list[L.Neuron], device: torch.device) -> None:
        self.neurons = neurons
        self._none = torch.zeros((), dtype=torch.int64, device=device)  # the count without neuron layers
        self._key: tuple | None = None
        self._lo = self._hi = torch.zeros(0)

    def _values(self) -> tuple[list[Tensor], list[float], list[float]]:
        """The clamped tensors (read each time: a layer's parameter may be replaced) and their bounds.
        A leak shared by several layers (one range: the layers check it) is clamped and counted once,
        as ``constrain_`` layer after layer finds it in range after the first."""
        values, lo, hi, seen = [], [], [], set()
        for n in self.neurons:
            if id(n.leak) not in seen:
                seen.add(id(n.leak))
                values.append(n.leak)
                lo.append(n.leak_range[0])
                hi.append(n.leak_range[1])
            th = getattr(n, "threshold", None)
            if th is not None:
                values.append(th)
                lo.append(n.threshold_floor)
                hi.append(math.inf)
        return values, lo, hi

    @torch.no_grad()
    def __call__(self) -> Tensor:
        values, lo, hi = self._values()
        if not values:
            return self._none
        sizes = [v.numel() for v in values]
        flat = torch.cat([v.reshape(-1) for v in values])
        key = (tuple(lo), tuple(hi), tuple(sizes), flat.dtype, flat.device)
        if key != self._key:  # bounds element by element, made once per layout
            counts = torch.tensor(sizes, device=flat.device)
            lo_t, hi_t = (torch.tensor(b, dtype=flat.dtype, device=flat.device).repeat_interleave(counts)
                          for b in (lo, hi))
            if self._lo.shape == lo_t.shape and self._lo.dtype == lo_t.dtype and self._lo.device == lo_t.device:
                self._lo.copy_(lo_t)  # in place: a captured update keeps reading these tensors
                self._hi.copy_(hi_t)
            else:
                self._lo, self._hi = lo_t, hi_t
            self._key = key
        out = ((flat < self._lo) | (flat > self._hi)).sum()
        torch.clamp(flat, self._lo, self._hi, out=flat)
        torch._foreach_copy_(values, [f.view_as(v) for f, v in zip(flat.split(sizes), values)])
        return out


class DeviceStats(LearnerStats):
    """:class:`LearnerStats` whose update counters and last loss live on the device and are read
    (a synchronisation) only when these attributes are read. Writes (a restored session) add host
    offsets, so the device counters are never reallocated. ``steps`` and ``samples`` are plain
    attributes (the step counts them: properties only where the device is read)."""

    def __init__(self, counts: Tensor, last_loss: Callable[[], float]) -> None:
        self._counts, self._last_loss = counts, last_loss
        self._offsets = [0, 0, 0]
        self.loss_override: float | None = None  # a restored last loss, until the next learning step
        self.steps, self.samples = 0, 0

    def _device(i: int) -> property:  # noqa: N805  (a property factory used in the class body)
        def get(self) -> int:
            return int(self._counts[i]) + self._offsets[i]

        def set_(self, value: int) -> None:
            self._offsets[i] = int(value) - int(self._counts[i])
        return property(get, set_)

    updates, rejected_updates, clamped_values = _device(0), _device(1), _device(2)
    del _device

    @property
    def last_loss(self) -> float:
        return self.loss_override if self.loss_override is not None else self._last_loss()

    @last_loss.setter
    def last_loss(self, value: float) -> None:
        self.loss_override = float(value)

    def __repr__(self) -> str:
        return f"DeviceStats({self.as_dict()})"
