"""The ops of a static STOP program (see :mod:`stoprt.runtime.static`): one class per kind of layer.

Each op advances its traces and state in place in ``forward`` and runs the explicit same-step rule
in ``backward`` (the pure functions of :mod:`stoprt.runtime.functional`), accumulating into the
parameters' ``.grad``. Buffers are allocated at the first forward (the program's dry run) and
published on the layer (``u``, ``s``, ``w_trace``, ...) so that tools that list a network's state
(``layers.state_tensors``) see them.

:func:`compile_net` is the one place that maps layer types to ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as SF
from . import layers as L


class Unsupported(ValueError):
    """The network holds something the static step does not implement (the learner runs eager)."""


class _Op:
    """One node of the program. ``needs``: its output carries gradient (it, or an op below, learns);
    ``needs_in``: its input does. ``backward`` is only called when ``needs`` is set and returns the
    input's gradient when ``needs_in`` is set (None otherwise)."""

    needs = needs_in = False

    def plan(self, needs_in: bool) -> bool:
        self.needs_in = needs_in
        self.needs = needs_in or self.learns()
        return self.needs

    def learns(self) -> bool:
        return False

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """The forward of a sample that will not learn: state advances, traces do not (ops without
        traces: their forward)."""
        return self.forward(x)

    def backward(self, g: Tensor) -> Tensor | None:
        return g if self.needs_in else None

    def state(self) -> list[Tensor]:
        """The buffers that carry over between steps (zeroed at each sample's start)."""
        return []

    def start_sample(self) -> None:
        """Called before a sample's first step (dropout draws its mask here)."""

    def refresh(self) -> None:
        """Called before a sample's first step (frozen BatchNorm updates its map here)."""


def _zeros(like: Tensor, shape=None) -> Tensor:
    return torch.zeros(like.shape if shape is None else shape, dtype=like.dtype, device=like.device)


class _Synapse(_Op):
    """Linear / Conv2d: y = op(x; W, b); dW += delta (x) w_tr, db += sum(delta) b_tr."""

    def __init__(self, m: nn.Module) -> None:
        self.m, self.op, self.leak = m, m._op, m.post_neuron.leak
        # The parameters themselves, held (a module attribute lookup per use cost ~0.3 us per step;
        # the learner's optimizer and gradient buffers hold these same tensors, in place)
        self.weight, self.bias = m.weight, m.bias
        self.learn_w = m.weight.requires_grad
        self.learn_b = m.bias is not None and m.bias.requires_grad
        self.w_tr: Tensor | None = None
        self.b_tr: Tensor | None = None
        self.x_shape: torch.Size | None = None

    def learns(self) -> bool:
        return self.learn_w or self.learn_b

    def forward(self, x: Tensor) -> Tensor:
        a = self.leak
        if self.learn_w:
            if self.w_tr is None:
                self.w_tr = self.m.w_trace = _zeros(x)
            SF.input_trace_step(self.w_tr, x, a, out=self.w_tr)
        if self.learn_b:
            if self.b_tr is None:
                self.b_tr = self.m.b_trace = _zeros(a)
            SF.bias_trace_step(self.b_tr, a, out=self.b_tr)
        self.x_shape = x.shape
        return self.op.forward(x, self.weight, self.bias)

    def predict(self, x: Tensor) -> Tensor:
        return self.op.forward(x, self.weight, self.bias)

    def backward(self, g: Tensor) -> Tensor | None:
        w = self.weight
        gx = self.op.backward_into(g, w, self.w_tr, self.x_shape, self.needs_in, w.grad if self.learn_w else None)
        if self.learn_b:
            SF.bias_grad_into(self.op, self.bias.grad, g, self.b_tr)
        return gx

    def state(self) -> list[Tensor]:
        return [t for t in (self.w_tr, self.b_tr) if t is not None]


class _LIF(_Op):
    """U = a (U - th s) + I (or the layer's other reset), s = H(U - th); traces for th and a."""

    def __init__(self, m: L.LIF) -> None:
        self.m, self.th, self.leak = m, m.threshold, m.leak
        self.learn_th, self.learn_a = m.threshold.requires_grad, m.leak.requires_grad
        self.u = self.s = self.term = self.th_tr = self.a_tr = None

    def learns(self) -> bool:
        return self.learn_th or self.learn_a

    def _allocate(self, current: Tensor) -> None:
        m = self.m
        self.u, self.s = m.u, m.s = _zeros(current), _zeros(current)
        # soft_nodecay's term is U itself (see functional.leak_term); the soft reset needs room
        self.term = _zeros(current) if m.reset == "soft" else None
        if self.learn_th:
            self.th_tr = m.th_trace = _zeros(current)
        if self.learn_a:
            self.a_tr = m.a_trace = _zeros(current)

    def forward(self, current: Tensor) -> Tensor:
        if self.u is None:
            self._allocate(current)
        th, a, reset = self.th, self.leak, self.m.reset
        term = SF.leak_term(self.u, self.s, th, reset, out=self.term)
        if self.learn_th:
            SF.threshold_trace_step(self.th_tr, self.s, a, reset, out=self.th_tr)
        if self.learn_a:
            SF.leak_trace_step(self.a_tr, term, a, out=self.a_tr)
        SF.membrane_update(current, term, a, th, self.s, reset, out=self.u)
        return SF.heaviside(self.u, th, out=self.s)

    def predict(self, current: Tensor) -> Tensor:  # (buffers exist: the program's dry run ran forward)
        th, reset = self.th, self.m.reset
        term = SF.leak_term(self.u, self.s, th, reset, out=self.term)
        SF.membrane_update(current, term, self.leak, th, self.s, reset, out=self.u)
        return SF.heaviside(self.u, th, out=self.s)

    def backward(self, g: Tensor) -> Tensor | None:
        delta = SF.lif_delta(g, self.u, self.th, self.m.surrogate, self.m.alpha)
        if self.learn_th:
            SF.threshold_grad_into(self.th.grad, delta, self.th_tr)
        if self.learn_a:
            SF.leak_grad_into(self.leak.grad, delta, self.a_tr)
        return delta if self.needs_in else None

    def state(self) -> list[Tensor]:
        return [t for t in (self.u, self.s, self.th_tr, self.a_tr) if t is not None]


class _Readout(_Op):
    """Non-spiking leaky integrator U = a U + I; its potential is the output."""

    def __init__(self, m: L.LeakyReadout) -> None:
        self.m, self.leak, self.learn_a = m, m.leak, m.leak.requires_grad
        self.u = self.a_tr = None

    def learns(self) -> bool:
        return self.learn_a

    def forward(self, current: Tensor) -> Tensor:
        if self.u is None:
            self.u = self.m.u = _zeros(current)
            if self.learn_a:
                self.a_tr = self.m.a_trace = _zeros(current)
        if self.learn_a:
            SF.leak_trace_step(self.a_tr, self.u, self.leak, out=self.a_tr)
        return SF.readout_step(current, self.u, self.leak, out=self.u)

    def predict(self, current: Tensor) -> Tensor:
        return SF.readout_step(current, self.u, self.leak, out=self.u)

    def backward(self, g: Tensor) -> Tensor | None:
        if self.learn_a:
            SF.leak_grad_into(self.leak.grad, g, self.a_tr)
        return g if self.needs_in else None

    def state(self) -> list[Tensor]:
        return [t for t in (self.u, self.a_tr) if t is not None]


class _Affine(_Op):
    """Frozen BatchNorm: x * scale + shift per channel; backward g * scale."""

    def __init__(self, m: L.BatchNorm2d) -> None:
        if not m.frozen or any(p.requires_grad for p in m.parameters()):
            raise Unsupported(f"{type(m).__name__} is not frozen")
        self.m = m
        self._source, shift = m._frozen_affine()
        self.scale, self.shift = self._source.clone(), shift.clone()
        self.view: tuple[int, ...] | None = None

    def refresh(self) -> None:
        """Copy the map in place if it changed (statistics may have changed between samples): the layer
        recomputes it only then, so an unchanged one is the same tensor (no copy, no kernel launch)."""
        scale, shift = self.m._frozen_affine()
        if scale is self._source:
            return
        self._source = scale
        self.scale.copy_(scale)
        self.shift.copy_(shift)

    def forward(self, x: Tensor) -> Tensor:
        view = (-1,) + (1,) * (x.dim() - 2)
        self.view = view
        return torch.addcmul(self.shift.view(view), x, self.scale.view(view))

    def backward(self, g: Tensor) -> Tensor | None:
        return g * self.scale.view(self.view) if self.needs_in else None


class _Pool(_Op):
    """Average or max pooling (max only on spikes; the wiring checks that). ``kind``: ``"avg"``,
    ``"adaptive_avg"``, ``"max"`` or ``"adaptive_max"``."""

    def __init__(self, m: nn.Module, kind: str) -> None:
        self.m, self.kind = m, kind
        self.x: Tensor | None = None
        self.indices: Tensor | None = None
        if kind == "avg":
            self.args = (_pair(m.kernel_size), _pair(m.stride), _pair(m.padding), m.ceil_mode,
                         m.count_include_pad, m.divisor_override)
        elif kind == "max":
            k = _pair(m.kernel_size)
            self.args = (k, _pair(m.stride or k), _pair(m.padding), _pair(m.dilation), m.ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        self.x = x
        if self.kind == "avg":
            return F.avg_pool2d(x, *self.args)
        if self.kind == "adaptive_avg":
            return F.adaptive_avg_pool2d(x, self.m.output_size)
        if self.kind == "max":
            y, self.indices = torch.ops.aten.max_pool2d_with_indices(x, *self.args)
            return y
        y, self.indices = F.adaptive_max_pool2d(x, self.m.output_size, return_indices=True)
        return y

    def backward(self, g: Tensor) -> Tensor | None:
        if not self.needs_in:
            return None
        x, aten = self.x, torch.ops.aten
        if self.kind == "avg":
            return aten.avg_pool2d_backward(g.contiguous(), x, *self.args)
        if self.kind == "adaptive_avg":
            return aten._adaptive_avg_pool2d_backward(g.contiguous(), x)
        if self.kind == "max":
            return aten.max_pool2d_with_indices_backward(g, x, *self.args, self.indices)
        return aten.adaptive_max_pool2d_backward(g, x, self.indices)


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class _Flatten(_Op):
    def __init__(self, m: nn.Flatten) -> None:
        self.start, self.end = m.start_dim, m.end_dim
        self.x_shape: torch.Size | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.x_shape = x.shape
        return x.flatten(self.start, self.end)

    def backward(self, g: Tensor) -> Tensor | None:
        return g.reshape(self.x_shape) if self.needs_in else None


class _Identity(_Op):
    def forward(self, x: Tensor) -> Tensor:
        return x


class _Dropout(_Op):
    """Per-sample dropout: one mask for the whole sample, drawn before its first step (the eager
    layer draws it in its first forward; no random op runs in between, so the draws are the same).
    Outside training the mask is all ones, so a captured step does not change."""

    def __init__(self, m: L.Dropout) -> None:
        self.m = m
        self.mask: Tensor | None = None
        self.keep: Tensor | None = None

    def start_sample(self) -> None:
        m = self.m
        if m.training and m.p > 0.0:
            torch.bernoulli(self.keep, out=self.mask).div_(1.0 - m.p)
        else:
            self.mask.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        if self.mask is None:  # the program's dry run; start_sample draws
            self.mask, self.keep = torch.ones_like(x), torch.full_like(x, 1.0 - self.m.p)
            self.m.mask = self.mask
        return x * self.mask

    def backward(self, g: Tensor) -> Tensor | None:
        return g * self.mask if self.needs_in else None


class _Sequence(_Op):
    def __init__(self, ops: list[_Op]) -> None:
        self.ops = ops

    def plan(self, needs_in: bool) -> bool:
        self.needs_in = needs_in
        for op in self.ops:
            needs_in = op.plan(needs_in)
        self.needs = needs_in
        return self.needs

    def forward(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op.forward(x)
        return x

    def predict(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op.predict(x)
        return x

    def backward(self, g: Tensor) -> Tensor | None:
        for op in reversed(self.ops):
            if g is None:
                break
            g = op.backward(g)
        return g

    def children(self) -> list[_Op]:
        return self.ops


class _Residual(_Op):
    def __init__(self, main: _Op, shortcut: _Op) -> None:
        self.main, self.shortcut = main, shortcut

    def plan(self, needs_in: bool) -> bool:
        self.needs_in = needs_in
        self.needs = self.main.plan(needs_in) | self.shortcut.plan(needs_in)
        return self.needs

    def forward(self, x: Tensor) -> Tensor:
        return self.main.forward(x) + self.shortcut.forward(x)

    def predict(self, x: Tensor) -> Tensor:
        return self.main.predict(x) + self.shortcut.predict(x)

    def backward(self, g: Tensor) -> Tensor | None:
        gm = self.main.backward(g) if self.main.needs else None
        gs = self.shortcut.backward(g) if self.shortcut.needs else None
        return gm + gs if self.needs_in else None

    def children(self) -> list[_Op]:
        return [self.main, self.shortcut]


_POOLS = (("avg", nn.AvgPool2d), ("adaptive_avg", nn.AdaptiveAvgPool2d), ("max", nn.MaxPool2d),
          ("adaptive_max", nn.AdaptiveMaxPool2d))


def compile_net(module: nn.Module) -> _Op:
    """The program of ``module`` (already wired by the STOP learner). The one place that maps layer
    types to static ops; raises :class:`Unsupported` for anything else."""
    if isinstance(module, L.LIF):
        return _LIF(module)
    if isinstance(module, L.LeakyReadout):
        return _Readout(module)
    if isinstance(module, (L.Linear, L.Conv2d)):
        return _Synapse(module)
    if isinstance(module, L.BatchNorm2d):
        return _Affine(module)
    for kind, types in _POOLS:
        if isinstance(module, types):
            return _Pool(module, kind)
    if isinstance(module, nn.Flatten):
        return _Flatten(module)
    if isinstance(module, L.Dropout):
        return _Dropout(module)
    if isinstance(module, nn.Identity):
        return _Identity()
    if isinstance(module, L.Residual):
        return _Residual(compile_net(module.main), compile_net(module.shortcut))
    if isinstance(module, nn.Sequential):
        return _Sequence([compile_net(m) for m in module])
    raise Unsupported(f"the static step has no op for {type(module).__name__}")


def walk(op: _Op) -> list[_Op]:
    """Every op of a program, in forward order."""
    kids = getattr(op, "children", None)
    return [op] if kids is None else [op] + [o for k in kids() for o in walk(k)]
