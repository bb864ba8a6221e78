"""What flows between the layers of a stoprt network in one time step, from a dry run.

:func:`trace_network` runs one step at batch 1 on a copy of the network with hooks on every leaf layer
(and on :class:`~stoprt.runtime.layers.Residual`, whose sum is a new tensor) and records, per call, the
value that went in and the value that came out. Values are followed by their storage; a layer whose
output is a view of its input (Flatten, Identity; Dropout outside training) says so in its declaration
(:func:`stoprt.runtime.kinds.step_keeps`), and the memory planner then counts that storage once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ...runtime import layers as L


@dataclass
class LayerCall:
    """One leaf layer (or Residual sum) run in the dry run: which values went in and came out."""

    module: nn.Module
    inp: int
    out: int


def trace_network(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[LayerCall], list[tuple[int, ...]]]:
    """Dry run of one step at batch 1 on a copy of ``net``: the leaf calls and every value's shape.

    Values are numbered in order of creation (0 is the network input); every call's output is a new
    value, views included (the layer's declaration says whether it is one). Shapes exclude the batch.
    Raises ValueError for a layer the registry of layer kinds does not know.
    """
    twin = copy.deepcopy(net).cpu().float().eval()
    L.set_stop_mode(twin, False)
    L.reset_state(twin)
    shapes: list[tuple[int, ...]] = [tuple(input_shape)]
    by_storage: dict[int, int] = {}
    calls: list[LayerCall] = []
    pending: dict[int, int] = {}

    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def before(module, args):
        if storage(args[0]) not in by_storage:
            raise ValueError(f"the memory planner cannot follow the input of {type(module).__name__}: "
                             "it comes from an operation outside stoprt's layers")
        pending[id(module)] = by_storage[storage(args[0])]

    def after(module, args, out):
        value = len(shapes)
        shapes.append(tuple(out.shape[1:]))  # [1, *shape] -> shape
        by_storage[storage(out)] = value  # a view's storage now names its newest value
        calls.append(LayerCall(module, pending.pop(id(module)), value))

    handles = []
    for m in twin.modules():
        leaf = not any(True for _ in m.children())  # containers of any class are walked through
        try:
            kind = L.layer_kind(m, strict=leaf)
        except L.UnknownLayerError as err:
            raise ValueError(f"the memory planner has no rule for layer {type(m).__name__}: {err}") from None
        if leaf or kind == L.RESIDUAL:
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    x = torch.zeros(1, *input_shape)
    by_storage[storage(x)] = 0
    try:
        with torch.no_grad():
            twin(x)
    finally:
        for h in handles:
            h.remove()
    # Map the twin's modules back to the caller's, so parameters are looked up on the real network.
    originals = dict(zip((id(m) for m in twin.modules()), net.modules()))
    return [LayerCall(originals[id(c.module)], c.inp, c.out) for c in calls], shapes
