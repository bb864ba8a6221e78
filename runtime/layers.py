"""Spiking layers: thin ``nn.Module`` wrappers over :mod:`stoprt.runtime.functional`.

Every layer owns its state (membrane, last spikes) and, under STOP, its forward traces. The runtime
resets them (:func:`reset_state`); user code never touches them. Shapes: a step's input is
``[B, C, H, W]`` for convolutional layers and ``[B, N]`` for dense ones.

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
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as SF
from .lean import AvgPool2d, BatchNorm2d  # noqa: F401  (stoprt layers, defined beside the ops they use)

# Pooling, flattening and identity need nothing of their own: torch's modules are used as they are.
AdaptiveAvgPool2d = nn.AdaptiveAvgPool2d
MaxPool2d = nn.MaxPool2d
Flatten = nn.Flatten
Identity = nn.Identity

GRANULARITIES = ("layer", "channel", "neuron")


class _PlainState:
    """Writes the state attributes named in ``STATE`` straight into the instance: they are never
    Parameters, buffers or modules, and nn.Module's registry checks on every write cost more than
    the small per-step ops themselves."""

    STATE: frozenset = frozenset()

    def __setattr__(self, name: str, value) -> None:
        if name in self.STATE:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)


class _Neuron(_PlainState, nn.Module):
    """Common part of LIF and LeakyReadout: the leak, the state and the STOP switch."""

    STATE = frozenset({"u", "s", "th_trace", "a_trace"})

    def __init__(self, leak: float, leak_range: tuple[float, float], learn_leak: bool,
                 share_leak_with: "_Neuron | None") -> None:
        super().__init__()
        lo, hi = leak_range
        if not 0.0 < lo < hi < 1.0:
            raise ValueError(f"leak_range must satisfy 0 < low < high < 1, got {leak_range}")
        if share_leak_with is not None:
            # One Parameter object in several layers: neurons fed by the same synaptic op (a
            # residual stream) must decay alike for that op's single input trace to be exact.
            self.leak = share_leak_with.leak
        else:
            if not lo <= leak <= hi:
                raise ValueError(f"leak {leak} is outside leak_range {leak_range}")
            self.leak = nn.Parameter(torch.tensor(float(leak)), requires_grad=learn_leak)
        self.leak_range = (float(lo), float(hi))
        # The layer's own setting; learners may switch requires_grad off for a run without changing it.
        self.learn_leak = learn_leak if share_leak_with is None else share_leak_with.learn_leak
        self.stop_mode = False
        self.reset_state()

    def reset_state(self) -> None:
        """Forget the sample: membrane, spikes and traces back to zero."""
        self.u: Tensor | None = None
        self.s: Tensor | None = None
        self.th_trace: Tensor | None = None
        self.a_trace: Tensor | None = None

    def _clamp_leak(self) -> int:
        lo, hi = self.leak_range
        out = int((self.leak < lo).item() or (self.leak > hi).item())
        self.leak.clamp_(lo, hi)
        return out


class LIF(_Neuron):
    """Leaky integrate-and-fire neurons with soft reset, learnable threshold and leak.

    Args:
        threshold: granularity of the learnable threshold: ``"layer"`` (one), ``"channel"`` (one per
            channel or feature) or ``"neuron"`` (one per neuron).
        shape: feature shape of the layer without batch, e.g. ``(C, H, W)`` or ``(N,)``. Needed for
            ``"neuron"``; for ``"channel"`` the channel count is enough and :class:`Sequential`
            fills it in from the preceding layer.
        init_threshold, threshold_floor: starting value and the positive floor thresholds are
            clamped to after every update.
        leak, leak_range: starting leak factor ``a`` and the interval it is clamped to after every
            update (the leak is the parameter itself, so its gradient is exactly dE/da).
        surrogate, alpha: surrogate derivative of the spike (see ``functional.SURROGATES``).
        learn_threshold, learn_leak: whether these parameters get gradients at all.
        share_leak_with: another neuron layer whose leak Parameter this one uses.
        reset: ``"soft"`` (default, the paper's: a (U - th s)), ``"soft_nodecay"`` (a U - th s, snnTorch's
            subtract reset) or ``"hard"`` (to zero; inference and imports only, STOP refuses it).

    Input ``[B, *shape]`` current, output spikes of the same shape.
    """

    def __init__(self, threshold: str = "layer", shape: int | Iterable[int] | None = None,
                 init_threshold: float = 1.0, threshold_floor: float = 0.05, leak: float = 0.5,
                 leak_range: tuple[float, float] = (0.01, 0.99), surrogate: str = "exp",
                 alpha: float = 1.0, learn_threshold: bool = True, learn_leak: bool = True,
                 share_leak_with: _Neuron | None = None, reset: str = "soft") -> None:
        if threshold not in GRANULARITIES:
            raise ValueError(f"threshold granularity must be one of {GRANULARITIES}, got {threshold!r}")
        if surrogate not in SF.SURROGATES:
            raise ValueError(f"unknown surrogate {surrogate!r}; choose one of {SF.SURROGATES}")
        if reset not in SF.RESETS:
            raise ValueError(f"unknown reset {reset!r}; choose one of {SF.RESETS}")
        if not 0.0 < threshold_floor <= init_threshold:
            raise ValueError("need 0 < threshold_floor <= init_threshold")
        super().__init__(leak, leak_range, learn_leak, share_leak_with)
        self.granularity = threshold
        self.init_threshold = float(init_threshold)
        self.threshold_floor = float(threshold_floor)
        self.surrogate, self.alpha = surrogate, float(alpha)
        self.reset = reset
        self.learn_threshold = learn_threshold
        self.register_parameter("threshold", None)
        if threshold == "layer":
            self._make_threshold(())
        elif shape is not None:
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            self._make_threshold(shape if threshold == "neuron" else (shape[0],) + (1,) * (len(shape) - 1))

    def _make_threshold(self, shape: tuple[int, ...], like: Tensor | None = None) -> None:
        value = torch.full(shape, self.init_threshold) if like is None else like.new_full(shape, self.init_threshold)
        self.threshold = nn.Parameter(value, requires_grad=self.learn_threshold)

    def materialize(self, channels: int, spatial: bool) -> None:
        """Create a per-channel threshold once the channel count is known (used by Sequential)."""
        if self.threshold is None and self.granularity == "channel":
            self._make_threshold((channels, 1, 1) if spatial else (channels,))

    def forward(self, current: Tensor) -> Tensor:
        if self.threshold is None:  # sized by the first input (Sequential's dry run does this)
            shape = tuple(current.shape[1:])
            if self.granularity == "channel":
                shape = shape[:1] + (1,) * (len(shape) - 1)
            self._make_threshold(shape, like=current)
        th, a = self.threshold, self.leak
        if not self.stop_mode:
            u_prev = current.new_zeros(()) if self.u is None else self.u
            s_prev = current.new_zeros(()) if self.s is None else self.s
            u, s = SF.lif_step(current, u_prev, s_prev, th, a, self.surrogate, self.alpha, self.reset)
            self.u, self.s = u, s
            return s
        with torch.no_grad():
            term = None if self.u is None else SF.leak_term(self.u, self.s, th, self.reset)
            if th.requires_grad:
                self.th_trace = SF.threshold_trace_step(self.th_trace, self.s, a, self.reset)
            if a.requires_grad:
                self.a_trace = SF.leak_trace_step(self.a_trace, term, a)
        if torch.is_grad_enabled():
            s, u = SF.TracedLIF.apply(current, term, th, a, self.s, self.th_trace, self.a_trace, self.reset,
                                      self.surrogate, self.alpha)
        else:
            u = current if term is None else SF.membrane_update(current, term, a, th, self.s, self.reset)
            s = SF.heaviside(u, th)
        self.u, self.s = u.detach(), s.detach()
        return s

    @torch.no_grad()
    def constrain_(self) -> int:
        """Clamp threshold and leak into their ranges; returns how many values were clamped."""
        clamped = self._clamp_leak()
        if self.threshold is not None:
            clamped += int((self.threshold < self.threshold_floor).sum())
            self.threshold.clamp_(min=self.threshold_floor)
        return clamped

    def extra_repr(self) -> str:
        shape = None if self.threshold is None else tuple(self.threshold.shape)
        reset = "" if self.reset == "soft" else f", reset={self.reset!r}"
        return (f"threshold={self.granularity!r}, threshold_shape={shape}, "
                f"leak={self.leak.item():.3f}, surrogate={self.surrogate!r}{reset}")


class LeakyReadout(_Neuron):
    """Non-spiking leaky integrator, an alternative output layer: U[t] = a U[t-1] + I[t].

    Its output is the membrane potential ``[B, N]``, used directly as logits.
    """

    def __init__(self, leak: float = 0.9, leak_range: tuple[float, float] = (0.01, 0.99),
                 learn_leak: bool = True, share_leak_with: _Neuron | None = None) -> None:
        super().__init__(leak, leak_range, learn_leak, share_leak_with)
        self.threshold = None

    def forward(self, current: Tensor) -> Tensor:
        a = self.leak
        if not self.stop_mode:
            self.u = current if self.u is None else SF.readout_step(current, self.u, a)
            return self.u
        with torch.no_grad():
            carried = None if self.u is None else a * self.u
            if a.requires_grad:
                self.a_trace = SF.leak_trace_step(self.a_trace, self.u, a)
        if torch.is_grad_enabled():
            u = SF.TracedReadout.apply(current, carried, a, self.a_trace)
        else:
            u = current if carried is None else current + carried
        self.u = u.detach()
        return u

    @torch.no_grad()
    def constrain_(self) -> int:
        return self._clamp_leak()

    def extra_repr(self) -> str:
        return f"leak={self.leak.item():.3f}"


class _Synapse(_PlainState):
    """Mixin for synaptic ops: input and bias traces under STOP, decaying with the target's leak."""

    STATE = frozenset({"w_trace", "b_trace"})

    def _init_synapse(self, op: SF.SynapticOp) -> None:
        self._op = op
        self.stop_mode = False
        # The neuron layer this op's output feeds (set by stoprt.runtime.wiring). Stored outside
        # nn.Module's registry so the neuron is not counted as a child of this layer.
        object.__setattr__(self, "post_neuron", None)
        self.reset_state()

    def reset_state(self) -> None:
        self.w_trace: Tensor | None = None
        self.b_trace: Tensor | None = None

    def _forward_stop(self, x: Tensor) -> Tensor:
        if self.post_neuron is None:
            raise RuntimeError(f"{type(self).__name__} is not wired to a neuron layer; create the "
                               "STOP learner over the whole network")
        a = self.post_neuron.leak
        with torch.no_grad():
            if self.weight.requires_grad:
                self.w_trace = SF.input_trace_step(self.w_trace, x, a)
            if self.bias is not None and self.bias.requires_grad:
                self.b_trace = SF.bias_trace_step(self.b_trace, a)
        if not torch.is_grad_enabled():
            return self._op.forward(x, self.weight, self.bias)
        return SF.TracedSynapse.apply(x, self.weight, self.bias, self.w_trace, self.b_trace, self._op)


class Linear(_Synapse, nn.Linear):
    """Dense synaptic layer: ``[B, in_features] -> [B, out_features]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_synapse(SF.LinearOp())

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_stop(x) if self.stop_mode else F.linear(x, self.weight, self.bias)


class Conv2d(_Synapse, nn.Conv2d):
    """Convolutional synaptic layer: ``[B, C_in, H, W] -> [B, C_out, H', W']``.

    Stride, padding, dilation and groups as in ``torch.nn.Conv2d``; padding must be numeric and the
    padding mode ``"zeros"`` (the transpose used for the spatial error assumes it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True) -> None:
        if isinstance(padding, str):
            raise ValueError("stoprt Conv2d takes numeric padding (e.g. padding=1 for a 3x3 'same')")
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias)
        self._init_synapse(SF.Conv2dOp(self.stride, self.padding, self.dilation, self.groups))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_stop(x) if self.stop_mode else self._conv_forward(x, self.weight, self.bias)


class Dropout(nn.Module):
    """Dropout with one mask per sample, reused at every time step (a fixed, linear op in time).

    The mask is drawn at the first step after :func:`reset_state` in training mode.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.reset_state()

    def reset_state(self) -> None:
        self.mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None or self.mask.shape != x.shape:
            keep = torch.full_like(x, 1.0 - self.p)
            self.mask = torch.bernoulli(keep) / (1.0 - self.p)
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Residual(nn.Module):
    """``main(x) + shortcut(x)`` (identity shortcut when none is given).

    The sum is a current: follow the block with a neuron layer, or feed it into the next block.
    """

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.shortcut(x)


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
    """Walk the layers in order, tracking the channel count, and size per-channel thresholds."""
    if isinstance(module, (nn.Conv2d, BatchNorm2d)):
        return getattr(module, "out_channels", getattr(module, "num_features", None)), True
    if isinstance(module, nn.Linear):
        return module.out_features, False
    if isinstance(module, nn.Flatten):
        return None, False
    if isinstance(module, LIF):
        if channels is not None:
            module.materialize(channels, spatial)
        return channels, spatial
    if isinstance(module, Residual):
        out = _fill_channels(module.main, channels, spatial)
        _fill_channels(module.shortcut, channels, spatial)
        return out
    if isinstance(module, nn.Sequential):
        for child in module:
            channels, spatial = _fill_channels(child, channels, spatial)
    return channels, spatial


def reset_state(net: nn.Module) -> None:
    """Reset every stateful layer of ``net`` (membranes, spikes, traces, dropout masks)."""
    for m in net.modules():
        if isinstance(m, (_Neuron, _Synapse, Dropout)):
            m.reset_state()


def set_stop_mode(net: nn.Module, enabled: bool) -> None:
    """Switch every layer of ``net`` between plain dynamics and STOP's traced dynamics."""
    for m in net.modules():
        if hasattr(m, "stop_mode"):
            m.stop_mode = enabled


def freeze_batchnorm(net: nn.Module, frozen: bool = True) -> None:
    """Freeze (or unfreeze) every stoprt BatchNorm2d: running statistics and no affine learning."""
    for m in net.modules():
        if isinstance(m, BatchNorm2d):
            m.frozen = frozen
            for p in m.parameters():
                p.requires_grad_(not frozen)


def neurons(net: nn.Module) -> list[_Neuron]:
    """All neuron layers (LIF and LeakyReadout) of ``net`` in module order."""
    return [m for m in net.modules() if isinstance(m, _Neuron)]


def state_tensors(net: nn.Module) -> list[Tensor]:
    """Every state and trace tensor the layers hold now (what the runtime keeps between steps)."""
    names = ("u", "s", "th_trace", "a_trace", "w_trace", "b_trace", "mask")
    return [t for m in net.modules() for n in names if isinstance(t := getattr(m, n, None), Tensor)]
