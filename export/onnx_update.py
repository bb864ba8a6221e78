"""Export the optimizer update of a learning-step graph (:mod:`.onnx_learn`) as one ONNX graph.

    (lr, *params, *grads, *opt_state) -> (*new_params, *new_opt_state, ok, clamped)

``params``/``grads``: the learned parameters (``param.<name>``) and their accumulators
(``grad.<name>``), in the learning graph's order; ``opt_state``: the optimizer's state
(:attr:`UpdateSignature.state`, zeros at the start); ``lr``: a float32 scalar, so a schedule needs
no new graph. The graph is built node by node (:func:`update_graph`, no tracing: it takes
milliseconds, where ``torch.onnx.export`` took seconds for a few elementwise ops per parameter).
Two optimizers, each torch's single-tensor arithmetic written out:

* ``"sgd"`` (torch.optim.SGD; momentum, weight decay; dampening 0, no Nesterov): state
  ``momentum.<name>`` (with no dampening a zero buffer's first step is torch's ``clone(grad)``);
* ``"adam"`` (torch.optim.Adam; L2 weight decay added to the gradient, as Adam, not AdamW, does;
  no amsgrad): state ``exp_avg.<name>``, ``exp_avg_sq.<name>`` and ``adam.step``, the update count
  as a float32 scalar (exact to 2^24 updates; by then both bias corrections are 1). The bias
  corrections ``1 - beta^step`` are computed in the graph in float32 (torch: in float64 on the host),
  a relative difference of ~1e-5 in an update of size ~lr.

Around the arithmetic, the eager learner's guards (:meth:`~stoprt.runtime.learner.Learner._apply_update`)
as selects:

* a non-finite gradient: nothing changes (parameters and optimizer state kept), ``ok`` false;
* finite gradients, non-finite parameters after the step: parameters kept, the optimizer state
  keeps the step (as in eager, where the optimizer ran), ``ok`` false;
* else the new parameters, with each neuron's leak clamped into its ``leak_range`` and each
  threshold to its ``threshold_floor`` (``clamped``, float32: how many values were out, as the
  layers' ``constrain_`` counts them).

The ops (Abs, Add, And, Cast, Clip, Div, Equal, Greater, LessOrEqual, Min, Mul, Not, Pow,
ReduceMin, ReduceSum, Sqrt, Sub, Sum, Where, Identity) are valid from opset 17 and in the ONNX
operator lists of TensorRT 8.5 and 10.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..runtime import layers as L
from .onnx_learn import _check_graph
from .onnx_step import DEFAULT_OPSET, write_graph
from .signatures import (ADAM_STEP, OPTIMIZERS, UPDATE_FORMAT, UPDATE_OPSETS,  # noqa: F401 (re-exported)
                         UPDATE_VERSION, LearnGraphError, UpdateSignature)

FLOAT = 1  # onnx.TensorProto.FLOAT (onnx is imported only where a graph is built)

def neuron_clamps(net: nn.Module) -> dict[str, list]:
    """``param.<name>`` -> ``[lo, hi]`` for every leak and threshold of ``net`` (the layers' ranges)."""
    names = {id(p): f"param.{n}" for n, p in net.named_parameters()}
    clamps: dict[str, list] = {}
    for n in L.neurons(net):
        clamps[names[id(n.leak)]] = list(n.leak_range)
        th = getattr(n, "threshold", None)
        if th is not None:
            clamps[names[id(th)]] = [n.threshold_floor, None]
    return clamps


def optimizer_options(optimizer: torch.optim.Optimizer) -> dict:
    """The keyword arguments of :func:`export_update` (and the learning rate) that reproduce a torch
    ``optimizer``; a setting the update graph lacks raises :class:`LearnGraphError` naming it."""
    groups = optimizer.param_groups
    g = groups[0]
    if len(groups) != 1:
        raise LearnGraphError(f"the update graph takes one parameter group; the optimizer has {len(groups)}")
    kind = type(optimizer).__name__
    if kind == "SGD":
        if g["dampening"] or g["nesterov"] or g.get("maximize"):
            raise LearnGraphError("the update graph's SGD has no dampening, Nesterov or maximize")
        return {"optimizer": "sgd", "lr": g["lr"], "momentum": g["momentum"], "weight_decay": g["weight_decay"]}
    if kind == "Adam":
        if g["amsgrad"] or g.get("maximize") or g.get("decoupled_weight_decay"):
            raise LearnGraphError("the update graph's Adam has no amsgrad, maximize or decoupled weight decay")
        return {"optimizer": "adam", "lr": g["lr"], "betas": tuple(g["betas"]), "eps": g["eps"],
                "weight_decay": g["weight_decay"]}
    raise LearnGraphError(f"the update graph supports {OPTIMIZERS} (torch SGD and Adam), not {kind}")


class _Graph:
    """A small ONNX graph builder: ``op`` appends a node and returns its output's name."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._consts: dict = {}

    def const(self, value: float) -> str:
        """A float32 scalar initializer (one per value)."""
        from onnx import numpy_helper
        key = float(np.float32(value))
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(np.array(value, np.float32), name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        from onnx import helper
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def finite(self, names: list[str]) -> str:
        """A bool scalar: every element of ``names`` is finite, as |x| <= FLT_MAX (NaN compares
        false): Abs + LessOrEqual, which every TensorRT ONNX parser takes (8.5's lacks IsInf)."""
        big = self.const(np.finfo(np.float32).max)
        each = [self.op("ReduceMin", self.op("Cast", self.op("LessOrEqual", self.op("Abs", n), big),
                                             to=FLOAT), keepdims=0) for n in names]
        return self.op("Greater", self.op("Min", *each), self.const(0.5))

    def select(self, cond: str, a: str, b: str) -> str:
        return self.op("Where", cond, a, b)


def _sgd(g: _Graph, sig: UpdateSignature, lr: str, params: list[str], grads: list[str],
         state: list[str]) -> tuple[list[str], list[str]]:
    """torch.optim.SGD (dampening 0, no Nesterov): buf = m buf + g; p - lr buf."""
    if sig.momentum:
        grads = [g.op("Add", g.op("Mul", g.const(sig.momentum), b), d) for d, b in zip(grads, state)]
    return [g.op("Sub", p, g.op("Mul", lr, d)) for p, d in zip(params, grads)], (grads if sig.momentum else [])


def _adam(g: _Graph, sig: UpdateSignature, lr: str, params: list[str], grads: list[str],
          state: list[str]) -> tuple[list[str], list[str]]:
    """torch.optim.Adam's single-tensor path: m.lerp_(g, 1 - b1); v = b2 v + (1 - b2) g^2;
    p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""
    n, (b1, b2) = len(params), sig.betas
    ms, vs = state[:n], state[n:2 * n]
    t = g.op("Add", state[2 * n], g.const(1.0))
    one = g.const(1.0)
    step_size = g.op("Div", lr, g.op("Sub", one, g.op("Pow", g.const(b1), t)))
    root = g.op("Sqrt", g.op("Sub", one, g.op("Pow", g.const(b2), t)))
    ms = [g.op("Add", m, g.op("Mul", g.const(1.0 - b1), g.op("Sub", d, m))) for m, d in zip(ms, grads)]
    vs = [g.op("Add", g.op("Mul", v, g.const(b2)), g.op("Mul", g.const(1.0 - b2), g.op("Mul", d, d)))
          for v, d in zip(vs, grads)]
    denom = [g.op("Add", g.op("Div", g.op("Sqrt", v), root), g.const(sig.eps)) for v in vs]
    new = [g.op("Sub", p, g.op("Mul", step_size, g.op("Div", m, d))) for p, m, d in zip(params, ms, denom)]
    return new, [*ms, *vs, t]


UPDATES = {"sgd": _sgd, "adam": _adam}


def update_graph(sig: UpdateSignature):
    """The guarded update of ``sig`` as an ONNX ModelProto (module doc: inputs, outputs, guards)."""
    from onnx import TensorProto, helper
    g = _Graph()
    names = [n for n, _ in sig.learned]
    state = [n for n, _ in sig.state]
    grad_inputs = [n.replace("param.", "grad.", 1) for n in names]
    grads_ok = g.finite(grad_inputs)
    grads = grad_inputs
    if sig.weight_decay:  # L2 decay into the gradient, as SGD and Adam (not AdamW) do
        grads = [g.op("Add", d, g.op("Mul", g.const(sig.weight_decay), p)) for d, p in zip(grads, names)]
    stepped, new_state = UPDATES[sig.optimizer](g, sig, "lr", names, grads, state)
    ok = g.op("And", grads_ok, g.finite(stepped))
    counts, out = [], []
    for (name, _), p in zip(sig.learned, stepped):
        lo, hi = sig.clamps.get(name, [None, None])
        if lo is not None or hi is not None:
            c = g.op("Clip", p, "" if lo is None else g.const(lo), *([] if hi is None else [g.const(hi)]))
            counts.append(g.op("ReduceSum", g.op("Cast", g.op("Not", g.op("Equal", c, p)), to=FLOAT), keepdims=0))
            p = c
        out.append(g.select(ok, p, name))
    clamped = g.op("Sum", *counts) if counts else g.const(0.0)
    kept = [g.select(grads_ok, s, before) for s, before in zip(new_state, state)]
    results = [*out, *kept, ok, g.select(ok, clamped, g.const(0.0))]
    out_names = ["new_" + n for n in names] + ["new_" + n for n in state] + ["ok", "clamped"]
    for src, dst in zip(results, out_names):  # name the outputs
        g.nodes.append(helper.make_node("Identity", [src], [dst]))
    shapes = {**dict(sig.learned), **dict(sig.state)}
    shapes.update({d: shapes[n] for d, n in zip(grad_inputs, names)})

    def tensor(name: str, shape: list, kind: int = TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, kind, shape)

    inputs = [tensor("lr", []), *[tensor(n, shapes[n]) for n in [*names, *grad_inputs, *state]]]
    outputs = [*[tensor(n, shapes[n[len("new_"):]]) for n in out_names[:-2]],
               tensor("ok", [], TensorProto.BOOL), tensor("clamped", [])]
    graph = helper.make_graph(g.nodes, "stoprt_update", inputs, outputs, initializer=g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", sig.opset)],
                             producer_name="stoprt")


def export_update(net: nn.Module, learned: list[list], path: str | os.PathLike, *, optimizer: str = "sgd",
                  momentum: float = 0.0, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8, opset: int = DEFAULT_OPSET) -> UpdateSignature:
    """Export the guarded update for the learned parameters ``learned`` (``[name, shape]``, the
    learning graph's order) of ``net`` to ``path`` (atomically). ``optimizer``: ``"sgd"`` (with
    ``momentum``) or ``"adam"`` (with ``betas``, ``eps``); :func:`optimizer_options` reads these
    from a torch optimizer."""
    if opset not in UPDATE_OPSETS:
        raise LearnGraphError(f"opset {opset} is not supported; choose one of {UPDATE_OPSETS}")
    if optimizer not in OPTIMIZERS:
        raise LearnGraphError(f"unknown optimizer {optimizer!r}; the update graph supports {OPTIMIZERS}")
    if not learned:
        raise LearnGraphError("the network learns no parameter: there is no update to export")
    sig = UpdateSignature(learned=[[n, list(s)] for n, s in learned], clamps=neuron_clamps(net),
                          optimizer=optimizer, momentum=float(momentum) if optimizer == "sgd" else 0.0,
                          weight_decay=float(weight_decay), betas=[float(b) for b in betas], eps=float(eps),
                          opset=opset)
    proto = update_graph(sig)
    _check_graph(proto)
    write_graph(proto, sig, path)
    return sig
