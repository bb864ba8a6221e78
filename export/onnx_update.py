"""Export the optimizer update of a learning-step graph (:mod:`.onnx_learn`) as one ONNX graph.

    (lr, *params, *grads, *momentum) -> (*new_params, *new_momentum, ok, clamped)

``params``/``grads``: the learned parameters (``param.<name>``) and their accumulators
(``grad.<name>``), in the learning graph's order; ``momentum``: SGD's momentum buffers
(``momentum.<name>``, zeros at the start: with no dampening a zero buffer's first step is torch's
``clone(grad)`` exactly); ``lr``: a float32 scalar, so a schedule needs no new graph.

The arithmetic is torch.optim.SGD's (its single-tensor path, written out: tracing torch's own
``sgd`` with a tensor ``lr`` would take its autograd branch, ``lr.requires_grad``). Around it, the
eager learner's guards (:meth:`~stoprt.runtime.learner.Learner._apply_update`) as selects:

* a non-finite gradient: nothing changes (parameters and momentum kept), ``ok`` false;
* finite gradients, non-finite parameters after the step: parameters kept, momentum keeps the step
  (as in eager), ``ok`` false;
* else the new parameters, with each neuron's leak clamped into its ``leak_range`` and each
  threshold to its ``threshold_floor`` (``clamped``: how many values were out, as the layers'
  ``constrain_`` counts them).

Only SGD (momentum, weight decay, dampening 0, no Nesterov) is exported for now.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..runtime import layers as L
from .onnx_step import DEFAULT_OPSET, _quiet_exporter, _summary, write_graph
from .signatures import UPDATE_FORMAT, UPDATE_VERSION, LearnGraphError, UpdateSignature  # noqa: F401 (re-exported)

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


def _finite(tensors: list[Tensor]) -> Tensor:
    """Whether every element is finite, as |x| <= FLT_MAX (NaN compares false): Abs + LessOrEqual,
    which TensorRT's ONNX parser takes (older ones lack IsInf)."""
    big = torch.finfo(torch.float32).max
    return torch.stack([(t.abs() <= big).all() for t in tensors]).all()


def _direction(p: Tensor, g: Tensor, buf: Tensor, sig: UpdateSignature) -> Tensor:
    """torch.optim.SGD's direction (single-tensor path, dampening 0, no Nesterov): the momentum buffer
    m buf + (g + wd p); a zero buffer gives torch's first step, ``clone(g + wd p)``, exactly."""
    if sig.weight_decay:
        g = g + sig.weight_decay * p
    return sig.momentum * buf + g if sig.momentum else g


class SgdUpdate(nn.Module):
    """The guarded SGD update as a pure function (see the module doc)."""

    def __init__(self, sig: UpdateSignature) -> None:
        super().__init__()
        self.sig = sig

    def forward(self, lr: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        n, sig = len(self.sig.learned), self.sig
        old, grads, bufs = list(flat[:n]), list(flat[n:2 * n]), list(flat[2 * n:])
        grads_ok = _finite(grads)
        moms = [_direction(p, g, b, sig) for p, g, b in zip(old, grads, bufs if sig.momentum else old)]
        params = [p - lr * m for p, m in zip(old, moms)]
        params_ok = _finite(params)
        ok = grads_ok & params_ok
        clamped = torch.zeros((), dtype=torch.int64)
        out = []
        for (name, _), p, before in zip(sig.learned, params, old):
            lo, hi = sig.clamps.get(name, [None, None])
            if lo is not None or hi is not None:
                c = p.clamp(lo, hi)
                clamped = clamped + (c != p).sum()
                p = c
            out.append(torch.where(ok, p, before))
        new_bufs = [torch.where(grads_ok, m, b) for m, b in zip(moms, bufs)] if sig.momentum else []
        return (*out, *new_bufs, ok, torch.where(ok, clamped, torch.zeros_like(clamped)))


def export_update(net: nn.Module, learned: list[list], path: str | os.PathLike, *, momentum: float = 0.0,
                  weight_decay: float = 0.0, opset: int = DEFAULT_OPSET) -> UpdateSignature:
    """Export the SGD update for the learned parameters ``learned`` (``[name, shape]``, the learning
    graph's order) of ``net`` to ``path`` (atomically)."""
    if not learned:
        raise LearnGraphError("the network learns no parameter: there is no update to export")
    sig = UpdateSignature(learned=[[n, list(s)] for n, s in learned], clamps=neuron_clamps(net),
                          momentum=float(momentum), weight_decay=float(weight_decay), opset=opset)
    # distinct example tensors: the tracer treats one tensor passed twice as one input
    params, grads = ([torch.zeros(s) for _, s in sig.learned] for _ in range(2))
    bufs = [torch.zeros(s) for _, s in sig.learned] if momentum else []
    names = [n for n, _ in sig.learned]
    inputs = ["lr", *names, *[n.replace("param.", "grad.", 1) for n in names],
              *[n.replace("param.", "momentum.", 1) for n in (names if momentum else [])]]
    outputs = ["new_" + n for n in names] + ["new_" + n for n in inputs[1 + 2 * len(names):]] + ["ok", "clamped"]
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(SgdUpdate(sig), (torch.tensor(0.1), *params, *grads, *bufs), None,
                                        dynamo=True, opset_version=opset, input_names=inputs,
                                        output_names=outputs, external_data=False, verbose=False)
        except Exception as err:
            raise LearnGraphError(f"ONNX export of the update failed: {_summary(err)}") from err
    proto = program.model_proto
    write_graph(proto, sig, path)
    return sig
