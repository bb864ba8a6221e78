"""Spiking layers: thin ``nn.Module`` wrappers over :mod:`stoprt.runtime.functional`.

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
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as SF
from .kinds import (AFFINE_PASS, CURRENT_PASS, INPUT, NEURON, OUTPUT, RESIDUAL, SEQUENCE, SPIKE_PASS,  # noqa: F401
                    SYNAPSE, Kept, StepContext, Steps, UnknownLayerError, layer_kind, step_keeps)
from .lean import AvgPool2d, BatchNorm2d  # noqa: F401  (stoprt layers, defined beside the ops they use)

# Pooling, flattening and identity need nothing of their own: torch's modules are used as they are
# (their roles are registered in kinds.TORCH_LAYERS).
AdaptiveAvgPool2d = nn.AdaptiveAvgPool2d
MaxPool2d = nn.MaxPool2d
Flatten = nn.Flatten
Identity = nn.Identity

GRANULARITIES = ("layer", "channel", "neuron")


class _PlainState:
    """Writes the state attributes named in ``STATE`` (every tensor the layer holds between steps)
    straight into the instance: they are never Parameters, buffers or modules, and nn.Module's
    registry checks on every write cost more than the small per-step ops themselves."""

    STATE: tuple[str, ...] = ()

    def __setattr__(self, name: str, value) -> None:
        if name in self.STATE:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def reset_state(self) -> None:
        """Forget the sample: every tensor in ``STATE`` (membrane, spikes, traces, masks) back to None."""
        for name in self.STATE:
            self.__dict__[name] = None


class Neuron(_PlainState, nn.Module):
    """Common part of LIF and LeakyReadout: the leak, the state and the STOP switch.

    ``state_names``: the state the plain dynamics carry from one step to the next (what a step graph
    takes and returns), read and written with :meth:`get_state` / :meth:`set_state`; STOP's traces
    are not part of it.
    """

    KIND = NEURON
    STATE = ("u", "s", "th_trace", "a_trace")  # each [B, *shape] (a trace None until it is nonzero)
    state_names: tuple[str, ...] = ()
    MEMBRANE = "u"  # what ``keeps`` calls the membrane: a tensor of its own, or the output itself

    def __init__(self, leak: float, leak_range: tuple[float, float], learn_leak: bool,
                 share_leak_with: "Neuron | None") -> None:
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

    def get_state(self) -> dict[str, Tensor | None]:
        """The plain dynamics' state by name (``[B, *shape]`` each; None before the first step)."""
        return {name: getattr(self, name) for name in self.state_names}

    def set_state(self, values: dict[str, Tensor | None]) -> None:
        """Set some or all of the state named in ``state_names`` (e.g. a step graph's inputs)."""
        unknown = set(values) - set(self.state_names)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no state {sorted(unknown)}; its state is "
                             f"{list(self.state_names)}")
        for name, value in values.items():
            setattr(self, name, value)

    def _clamp_leak(self) -> int:
        lo, hi = self.leak_range
        out = int((self.leak < lo).item() or (self.leak > hi).item())
        self.leak.clamp_(lo, hi)
        return out

    def keeps(self, ctx: StepContext) -> list[Kept]:
        """Inference: the last step's state. STOP: the state and traces (TracedLIF / TracedReadout save
        U[t] and the traces, nothing else). BPTT: what the plain dynamics save, see ``_plain_keeps``."""
        u, th, lk = self.MEMBRANE, ctx.learns(getattr(self, "threshold", None)), ctx.learns(self.leak)
        if not ctx.train:
            return [Kept(u, Steps.LAST, state=True), Kept(OUTPUT, Steps.LAST, state=True)]
        if ctx.mode == "bptt":
            return self._plain_keeps(th, lk, ctx.input_grad or th or lk)
        out = [Kept(u, Steps.EVERY, state=True), Kept(OUTPUT, Steps.EVERY, state=True)]
        if th:
            out.append(Kept("th_trace", Steps.FROM1, state=True))
        if lk:
            out.append(Kept("a_trace", Steps.FROM1, state=True))
        return out

    def _plain_keeps(self, th: bool, lk: bool, out_grad: bool) -> list[Kept]:
        raise NotImplementedError


class LIF(Neuron):
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

    state_names = ("u", "s")

    def __init__(self, threshold: str = "layer", shape: int | Iterable[int] | None = None,
                 init_threshold: float = 1.0, threshold_floor: float = 0.05, leak: float = 0.5,
                 leak_range: tuple[float, float] = (0.01, 0.99), surrogate: str = "exp",
                 alpha: float = 1.0, learn_threshold: bool = True, learn_leak: bool = True,
                 share_leak_with: Neuron | None = None, reset: str = "soft") -> None:
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
            # neuron: [*shape]; channel: [C, 1, 1] (broadcasts over [B, C, H, W]) or [N]
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
            shape = tuple(current.shape[1:])  # [B, *shape] -> [*shape]
            if self.granularity == "channel":
                shape = shape[:1] + (1,) * (len(shape) - 1)  # [C, H, W] -> [C, 1, 1]
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

    def _plain_keeps(self, th: bool, lk: bool, out_grad: bool) -> list[Kept]:
        """What ``functional.lif_step`` saves for backward at every step (BPTT keeps every step's graph),
        besides the last step's state u, s. Step 0 starts from scalar zeros: what it saves is a scalar
        or threshold-shaped there (STEP0)."""
        every, prev, from1, step0 = Steps.EVERY, Steps.PREV, Steps.FROM1, Steps.STEP0
        out = [Kept("u", Steps.LAST, state=True), Kept(OUTPUT, Steps.LAST, state=True)]
        if th and self.reset in ("soft", "soft_nodecay"):  # th * s[t-1] keeps s[t-1]
            out += [Kept(OUTPUT, prev), Kept("s0", step0, 1)]
        if self.reset == "soft" and lk:  # leak * (U - th s) keeps U - th s
            out += [Kept("carried", from1), Kept("carried0", step0, self.threshold.numel())]
        if self.reset in ("soft_nodecay", "hard") and lk:  # leak * U[t-1] keeps U[t-1]
            out += [Kept("u", prev), Kept("u0", step0, 1)]
        if self.reset == "hard":  # (a U) * (1 - s) keeps 1 - s
            out.append(Kept("keep", from1))
            if lk:
                out.append(Kept("keep0", step0, 1))
        if out_grad:  # the spike's surrogate keeps U - th
            out.append(Kept("x", every))
        return out

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


class LeakyReadout(Neuron):
    """Non-spiking leaky integrator, an alternative output layer: U[t] = a U[t-1] + I[t].

    Its output is the membrane potential ``[B, N]``, used directly as logits.
    """

    state_names = ("u",)
    MEMBRANE = OUTPUT

    def __init__(self, leak: float = 0.9, leak_range: tuple[float, float] = (0.01, 0.99),
                 learn_leak: bool = True, share_leak_with: Neuron | None = None) -> None:
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

    def _plain_keeps(self, th: bool, lk: bool, out_grad: bool) -> list[Kept]:
        # readout_step: leak * U[t-1] keeps U[t-1]
        return [Kept(OUTPUT, Steps.LAST, state=True)] + ([Kept(OUTPUT, Steps.PREV)] if lk else [])

    @torch.no_grad()
    def constrain_(self) -> int:
        return self._clamp_leak()

    def extra_repr(self) -> str:
        return f"leak={self.leak.item():.3f}"


class Synapse(_PlainState):
    """Mixin for synaptic ops: input and bias traces under STOP, decaying with the target's leak.

    ``PLAIN_KEEPS_INPUT``: whether torch's own op keeps its input whenever any gradient flows through
    it (convolution), or only when the weight learns (linear).
    """

    KIND = SYNAPSE
    STATE = ("w_trace", "b_trace")  # shaped like the input; a scalar
    PLAIN_KEEPS_INPUT = False

    def _init_synapse(self, op: SF.SynapticOp) -> None:
        self._op = op
        self.stop_mode = False
        # The neuron layer this op's output feeds (set by stoprt.runtime.wiring). Stored outside
        # nn.Module's registry so the neuron is not counted as a child of this layer.
        object.__setattr__(self, "post_neuron", None)
        self.reset_state()

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

    def keeps(self, ctx: StepContext) -> list[Kept]:
        """STOP: the input trace (input-shaped) and the scalar bias trace, as state (TracedSynapse saves
        only these and the weight). BPTT: torch's op keeps its input."""
        w, b = ctx.learns(self.weight), ctx.learns(self.bias)
        if ctx.mode == "stop":
            return ([Kept("w_trace", Steps.EVERY, INPUT, state=True)] if w else []) + (
                [Kept("b_trace", Steps.EVERY, 1, state=True)] if b else [])
        if ctx.mode == "bptt" and (w or (ctx.input_grad and self.PLAIN_KEEPS_INPUT)):
            return [Kept(INPUT, Steps.EVERY, INPUT)]
        return []


class Linear(Synapse, nn.Linear):
    """Dense synaptic layer: ``[B, in_features] -> [B, out_features]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_synapse(SF.LinearOp())

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_stop(x) if self.stop_mode else F.linear(x, self.weight, self.bias)


class Conv2d(Synapse, nn.Conv2d):
    """Convolutional synaptic layer: ``[B, C_in, H, W] -> [B, C_out, H', W']``.

    Stride, padding, dilation and groups as in ``torch.nn.Conv2d``; padding must be numeric and the
    padding mode ``"zeros"`` (the transpose used for the spatial error assumes it).
    """

    PLAIN_KEEPS_INPUT = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True) -> None:
        if isinstance(padding, str):
            raise ValueError("stoprt Conv2d takes numeric padding (e.g. padding=1 for a 3x3 'same')")
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias)
        self._init_synapse(SF.Conv2dOp(self.stride, self.padding, self.dilation, self.groups))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_stop(x) if self.stop_mode else self._conv_forward(x, self.weight, self.bias)


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


def reset_state(net: nn.Module) -> None:
    """Reset every stateful layer of ``net`` (membranes, spikes, traces, dropout masks)."""
    for m in net.modules():
        if isinstance(m, _PlainState):
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


def neurons(net: nn.Module) -> list[Neuron]:
    """All neuron layers (LIF and LeakyReadout) of ``net`` in module order."""
    return [m for m in net.modules() if isinstance(m, Neuron)]


def state_tensors(net: nn.Module) -> list[Tensor]:
    """Every state and trace tensor the layers hold now (what the runtime keeps between steps)."""
    return [t for m in net.modules() if isinstance(m, _PlainState)
            for n in m.STATE if isinstance(t := getattr(m, n, None), Tensor)]
