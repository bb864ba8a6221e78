"""BPTT over the same layers: the exact-gradient baseline STOP is compared against.

The whole sample's graph is kept (memory grows with T) and differentiated once at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import layers as L
from .learner import Learner, LossFn


class BPTT(Learner):
    """Backpropagation through time with the same ``step`` / ``end_sample`` interface as STOP.

    The loss is the sum over steps of the per-step loss, as for STOP, so the two optimise the same
    objective; the update is applied once per sample. BatchNorm is frozen as under STOP unless
    ``freeze_batchnorm=False`` (then it normalises each step by its batch statistics while training).
    """

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, loss: str | LossFn = "ce",
                 check_inputs: bool = True, freeze_batchnorm: bool = True, keep_last_good: bool = True) -> None:
        L.freeze_batchnorm(net, freeze_batchnorm)  # before the base class reads requires_grad
        super().__init__(net, optimizer, loss, check_inputs, keep_last_good)
        L.set_stop_mode(net, False)
        L.reset_state(net)
        self._loss_sum: Tensor | None = None

    def step(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """Run one step ``x`` ``[B, ...]``, adding its loss on ``target`` ``[B]`` if given."""
        out = self._forward(x)
        if target is not None:
            loss = self._loss(out, target)
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        return out.detach()

    def end_sample(self) -> Tensor | None:
        """Backpropagate the sample's loss through time, update, reset; returns the prediction."""
        if self._loss_sum is not None:
            self._loss_sum.backward()
            self._loss_sum = None
            self._apply_update()
        return self._finish_sample()
