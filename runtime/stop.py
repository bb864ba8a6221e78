"""STOP: online learning of weights, thresholds and leaks with forward traces (Gao et al. 2024).

How one step works (the whole rule; the traces live in the layers, see ``functional.py``):

1. forward the step once: each synaptic op advances its input trace ``w_tr = a w_tr + x`` (``a`` the
   leak of the neuron layer it feeds), each LIF its threshold and leak traces, and all state is
   detached, so the step's graph reaches back to no earlier step;
2. ``E[t].backward()``: autograd carries the same-step spatial errors down through the layers; where
   a gradient reaches a parameter, the autograd functions use the trace instead of the input or the
   history: ``dW += delta (x) w_tr``, ``db += delta b_tr``, ``dth += delta (th_tr - 1)``,
   ``da += sum(delta a_tr)``;
3. on the update schedule, the optimizer applies ``.grad`` and thresholds and leaks are clamped into
   their ranges.

Memory: previous-step state, the traces and one step's graph, whatever the length of the sample.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from . import layers as L
from .learner import Learner, LossFn
from .wiring import wire

KINDS = ("weight", "threshold", "leak")


class STOP(Learner):
    """The STOP learner.

    Args:
        net: network of stoprt layers (see :mod:`stoprt.runtime.wiring` for what is supported).
        optimizer: ``torch.optim`` optimizer; parameters it does not hold stay frozen.
        learn: which kinds to learn, any subset of ``("weight", "threshold", "leak")`` (STOP-W, -WT,
            -WL, -WTL). ``"weight"`` covers synaptic weights and biases. BatchNorm is frozen.
        update: ``"sample"`` (apply at :meth:`end_sample`), ``"step"`` (every step, fully online) or
            an int k (every k steps, and at the end of a sample for the rest).
        loss: see :class:`~stoprt.runtime.learner.Learner`.

    Use::

        for x_t in sample:            # x_t: [B, *input_shape]
            out = learner.step(x_t, target=y)
        prediction = learner.end_sample()
    """

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer,
                 learn: Iterable[str] = KINDS, update: str | int = "sample",
                 loss: str | LossFn = "ce", check_inputs: bool = True, keep_last_good: bool = True) -> None:
        learn = tuple(learn)
        unknown = set(learn) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds to learn {sorted(unknown)}; choose from {KINDS}")
        if update not in ("sample", "step") and not (isinstance(update, int) and update >= 1):
            raise ValueError(f"update must be 'sample', 'step' or an int >= 1, got {update!r}")
        super().__init__(net, optimizer, loss, check_inputs, keep_last_good)
        self.learn, self.update = learn, update
        for m in net.modules():
            if isinstance(m, L.Synapse) and "weight" not in learn:
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.requires_grad_(False)
            # Thresholds and leaks follow the layer's own learn flags (so an earlier learner that
            # switched them off does not leave them frozen), the kinds asked for and the optimizer.
            if isinstance(m, L.LIF):
                m.threshold.requires_grad_("threshold" in learn and m.learn_threshold
                                           and id(m.threshold) in self._held)
            if isinstance(m, L.Neuron):
                m.leak.requires_grad_("leak" in learn and m.learn_leak and id(m.leak) in self._held)
        L.freeze_batchnorm(net)
        self.wiring = wire(net)
        L.set_stop_mode(net, True)
        L.reset_state(net)
        self._steps_since_update = 0

    def step(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """Run one time step ``x`` ``[B, *input_shape]``; learn from ``target`` ``[B]`` if given.

        Returns the step's output (spikes or readout potential), detached. Without a target the
        traces still advance, so a later labelled step of the same sample learns correctly.
        """
        with torch.set_grad_enabled(target is not None):
            out = self._forward(x)
            if target is not None:
                self._loss(out, target).backward()
                self._steps_since_update += 1
        if self.update == "step" or (isinstance(self.update, int) and self._steps_since_update >= self.update):
            self._update()
        return out.detach()

    def end_sample(self) -> Tensor | None:
        """End the sample: apply pending gradients, reset state and traces.

        Returns the sample's prediction ``[B]`` (argmax of the summed outputs) or None if no step ran.
        """
        self._update()
        return self._finish_sample()

    def _update(self) -> None:
        if self._steps_since_update:
            self._apply_update()
            self._steps_since_update = 0

    def __repr__(self) -> str:
        return f"STOP(learn={self.learn}, update={self.update!r}, layers={len(self.wiring)} synaptic)"
