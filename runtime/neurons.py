"""Neuron layers: :class:`Neuron` (the leak, the state, the STOP switch), :class:`LIF` and
:class:`LeakyReadout`, thin ``nn.Module`` wrappers over :mod:`stoprt.runtime.functional`.

Also the state every stateful layer holds between steps (:class:`_PlainState`: neurons, synapses'
traces, dropout masks) and the network-wide switches over it, :func:`reset_state` and
:func:`set_stop_mode`. The public namespace of all layers is :mod:`stoprt.runtime.layers`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as SF
from .kinds import NEURON, OUTPUT, Kept, StepContext, Steps

GRANULARITIES = ("layer", "channel", "neuron")
DEFAULT_LEAK_RANGE = (0.01, 0.99)  # where a leak is clamped after each update, unless a layer says otherwise


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

    def __init__(self, leak: float, leak_range: tuple[float, float] | None, learn_leak: bool,
                 share_leak_with: "Neuron | None") -> None:
        super().__init__()
        if leak_range is None:  # a shared leak keeps its range (it is clamped once, into one range)
            leak_range = DEFAULT_LEAK_RANGE if share_leak_with is None else share_leak_with.leak_range
        lo, hi = leak_range
        if not 0.0 < lo < hi < 1.0:
            raise ValueError(f"leak_range must satisfy 0 < low < high < 1, got {leak_range}")
        if share_leak_with is not None:
            # One Parameter object in several layers: neurons fed by the same synaptic op (a
            # residual stream) must decay alike for that op's single input trace to be exact.
            if (float(lo), float(hi)) != share_leak_with.leak_range:
                raise ValueError(f"leak_range {tuple(leak_range)} differs from {share_leak_with.leak_range}, the "
                                 "range of the leak shared with share_leak_with: a shared leak has one range "
                                 "(leave leak_range out to take it)")
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
            update (the leak is the parameter itself, so its gradient is exactly dE/da); the range
            defaults to ``DEFAULT_LEAK_RANGE``, or with ``share_leak_with`` to that layer's.
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
                 leak_range: tuple[float, float] | None = None, surrogate: str = "exp",
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

    def __init__(self, leak: float = 0.9, leak_range: tuple[float, float] | None = None,
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
