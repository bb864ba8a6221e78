"""What flows between the layers of a stoprt network in one time step, from a dry run.

:func:`trace_network` runs one step at batch 1 on a copy of the network with hooks on every leaf layer
(and on :class:`~stoprt.runtime.layers.Residual`, whose sum is a new tensor) and records, per call, the
value that went in and the value that came out. Values are identified by their storage, so views
(Flatten, Identity) pass a value through and the memory planner can count every storage once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..runtime import layers as L


@dataclass
class LayerCall:
    """One leaf layer run in the dry run: which value went in and which came out."""

    module: nn.Module
    kind: str
    inp: int
    out: int


KINDS = ((L.Linear, "synapse"), (L.Conv2d, "synapse"), (L.BatchNorm2d, "bn"), (L.LIF, "lif"),
          (L.LeakyReadout, "readout"), (nn.AvgPool2d, "pool"), (nn.AdaptiveAvgPool2d, "pool"),
          (nn.MaxPool2d, "maxpool"), (nn.AdaptiveMaxPool2d, "maxpool"), (L.Dropout, "dropout"),
          (nn.Flatten, "view"), (nn.Identity, "view"))


def layer_kind(module: nn.Module) -> str | None:
    return next((k for cls, k in KINDS if isinstance(module, cls)), None)


def global_mean(module: nn.Module) -> bool:
    """AdaptiveAvgPool2d to 1x1, which torch computes as a mean: its backward keeps no tensor."""
    size = getattr(module, "output_size", None) if isinstance(module, nn.AdaptiveAvgPool2d) else None
    return size is not None and all(s == 1 for s in ((size, size) if isinstance(size, int) else size))


def trace_network(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[LayerCall], list[tuple[int, ...]]]:
    """Dry run of one step at batch 1 on a copy of ``net``: the leaf calls and every value's shape.

    Values are numbered in order of creation (0 is the network input); shapes exclude the batch.
    Raises ValueError for a layer the planner has no rule for.
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
        kind = "add" if isinstance(module, L.Residual) else layer_kind(module)
        inp = pending.pop(id(module))
        if kind == "view":
            value = inp
        else:
            value = len(shapes)
            shapes.append(tuple(out.shape[1:]))
        by_storage[storage(out)] = value
        calls.append(LayerCall(module, kind, inp, value))

    handles = []
    for m in twin.modules():
        leaf = not any(True for _ in m.children())
        if leaf or isinstance(m, L.Residual):
            if leaf and layer_kind(m) is None:
                raise ValueError(f"the memory planner has no rule for layer {type(m).__name__}; it knows "
                                 + ", ".join(sorted({c.__name__ for c, _ in KINDS})))
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
    return [LayerCall(originals[id(c.module)], c.kind, c.inp, c.out) for c in calls], shapes
