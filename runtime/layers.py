"""Spiking layers: the public namespace of stoprt's layers (``from stoprt.runtime import layers as L``).

The layers live in modules named for what they hold: :mod:`.neurons` (Neuron, LIF, LeakyReadout,
the state every layer keeps between steps), :mod:`.synapses` (Linear, Conv2d), :mod:`.batchnorm`
(BatchNorm2d, freezing, calibration, folding), :mod:`.pooling` (AvgPool2d); this module holds the
containers (Sequential, Residual), Dropout, and the network-wide helpers.

Every layer owns its state (membrane, last spikes) and, under STOP, its forward traces. The runtime
resets them (:func:`reset_state`); user code never touches them. Shapes: a step's input is
``[B, C, H, W]`` for convolutional layers and ``[B, N]`` for dense ones.

Each layer declares its role (``KIND``) and what it keeps in a step (``keeps``) next to its code;
:mod:`stoprt.runtime.kinds` is the registry that reads them (:func:`layer_kind`, :func:`step_keeps`).

A layer runs in one of two ways:

* plain (default): the dynamics of :func:`~stoprt.runtime.functional.lif_step`; with autograd enabled
  the membrane chain stays attached across steps, which is what BPTT differentiates;
* STOP (``stop_mode`` set by :class:`~stoprt.runtime.stop.STOP`): state is detached after each step,
  traces are carried forward, and gradients come from the traces through the autograd functions of
  :mod:`~stoprt.runtime.functional`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .kinds import (AFFINE_PASS, CURRENT_PASS, INPUT, NEURON, OUTPUT, RESIDUAL, SEQUENCE, SPIKE_PASS,  # noqa: F401
                    SYNAPSE, Kept, StepContext, Steps, UnknownLayerError, layer_kind, step_keeps)
from .batchnorm import BatchNorm2d, freeze_batchnorm  # noqa: F401  (re-exported: the layers' namespace)
from .neurons import GRANULARITIES, LIF, LeakyReadout, Neuron, _PlainState, reset_state, set_stop_mode  # noqa: F401
from .pooling import AvgPool2d  # noqa: F401
from .synapses import Conv2d, Linear, Synapse  # noqa: F401

# Pooling, flattening and identity need nothing of their own: torch's modules are used as they are
# (their roles are registered in kinds.TORCH_LAYERS).
AdaptiveAvgPool2d = nn.AdaptiveAvgPool2d
MaxPool2d = nn.MaxPool2d
Flatten = nn.Flatten
Identity = nn.Identity


class Dropout(_PlainState, nn.Module):
    """Dropout with one mask per sample, reused at every time step (a fixed, linear op in time).

    The mask is drawn at the first step after :func:`reset_state` in training mode.
    """

    KIND = CURRENT_PASS
    STATE = ("mask",)

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.reset_state()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None or self.mask.shape != x.shape:
            keep = torch.full_like(x, 1.0 - self.p)
            self.mask = torch.bernoulli(keep) / (1.0 - self.p)
        return x * self.mask

    def keeps(self, ctx: StepContext) -> list[Kept] | None:
        if not ctx.train or self.p == 0.0:
            return None  # forward returns its input itself
        return [Kept("mask", Steps.ONCE, INPUT, state=True)]  # the sample's mask, saved by the product too

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Residual(nn.Module):
    """``main(x) + shortcut(x)`` (identity shortcut when none is given).

    The sum is a current: follow the block with a neuron layer, or feed it into the next block.
    """

    KIND = RESIDUAL

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.shortcut(x)

    def keeps(self, ctx: StepContext) -> list[Kept]:
        return []  # the sum is a new tensor; its backward keeps nothing


class Sequential(nn.Sequential):
    """``nn.Sequential`` that fills in per-channel threshold shapes from the preceding layers.

    Args:
        *layers: the layers in order.
        input_shape: optional feature shape of one step's input without batch, e.g. ``(2, 32, 32)``;
            when given, a dry run creates per-neuron thresholds and the learners check inputs
            against it.
    """

    def __init__(self, *layers: nn.Module, input_shape: Iterable[int] | None = None) -> None:
        super().__init__(*layers)
        _fill_channels(self, None, False)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if self.input_shape is not None:
            # Eval mode: the dry run must not touch BatchNorm's running statistics.
            self.eval()
            with torch.no_grad():
                self(torch.zeros(1, *self.input_shape))
            self.train()
            reset_state(self)


def _fill_channels(module: nn.Module, channels: int | None, spatial: bool) -> tuple[int | None, bool]:
    """Walk the layers in order, tracking the channel count (C of ``[B, C, H, W]``, ``spatial``; N of
    ``[B, N]``), and size per-channel thresholds. Layers that keep the layout pass it on."""
    kind = layer_kind(module, strict=False)
    if kind == SEQUENCE:
        for child in module:
            channels, spatial = _fill_channels(child, channels, spatial)
        return channels, spatial
    if kind == RESIDUAL:
        out = _fill_channels(module.main, channels, spatial)
        _fill_channels(module.shortcut, channels, spatial)
        return out
    if isinstance(module, LIF):
        if channels is not None:
            module.materialize(channels, spatial)
        return channels, spatial
    if isinstance(module, nn.Flatten):
        return None, False  # [B, C, H, W] -> [B, C*H*W]: no channels any more
    if isinstance(module, (nn.Conv2d, BatchNorm2d)):  # -> [B, C_out, H', W']
        return getattr(module, "out_channels", getattr(module, "num_features", None)), True
    if isinstance(module, nn.Linear):  # -> [B, out_features]
        return module.out_features, False
    return channels, spatial


def neurons(net: nn.Module) -> list[Neuron]:
    """All neuron layers (LIF and LeakyReadout) of ``net`` in module order."""
    return [m for m in net.modules() if isinstance(m, Neuron)]


def state_tensors(net: nn.Module) -> list[Tensor]:
    """Every state and trace tensor the layers hold now (what the runtime keeps between steps)."""
    return [t for m in net.modules() if isinstance(m, _PlainState)
            for n in m.STATE if isinstance(t := getattr(m, n, None), Tensor)]
