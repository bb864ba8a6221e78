"""Import SpikingJelly networks (``activation_based``): torch / ``layer.*`` layers and LIF neurons.

SpikingJelly's ``LIFNode`` (2.0, read from ``_ops/lif/reference.py``) charges, fires,
then resets, with ``v_r`` = ``v_reset`` (0 for the soft reset)::

    H[t] = v[t-1] + (X[t] - (v[t-1] - v_r)) / tau     # decay_input=True
    H[t] = v[t-1] - (v[t-1] - v_r) / tau + X[t]       # decay_input=False
    S[t] = H(H[t] - v_threshold)                      # Heaviside, fires at equality (>=)
    v[t] = H[t] - v_threshold * S[t]                  # v_reset=None (soft)
    v[t] = (1 - S[t]) H[t] + S[t] v_reset             # v_reset a number (hard)

``v`` starts at ``v_reset`` (0 for the soft reset). In stoprt's terms, with ``U = H - v_r``::

    U[t] = a (U[t-1] - th S[t-1]) + I[t]      (soft)     U[t] = a U[t-1] (1 - S[t-1]) + I[t]   (hard)
    a = 1 - 1/tau,  th = v_threshold - v_r,  I[t] = X[t] / tau (decay_input) or X[t]

which is stoprt's ``LIF`` with ``reset="soft"`` or ``"hard"``, leak ``a`` and threshold ``th``. The input
factor ``1/tau`` of ``decay_input=True`` is folded into the preceding Linear / Conv2d (weights and bias
times ``1/tau``) or BatchNorm2d (its affine weight and bias), through pooling, flattening and dropout in
between; a neuron layer with none of these before it is refused. ``ParametricLIFNode`` is the same with
``1/tau = sigmoid(w)`` (its ``w`` comes from the state dict; the leak stays learnable); after the import
the leak and the folded input factor are separate, so further learning changes the leak alone.

Differences: SpikingJelly fires at ``H >= th``, stoprt at ``U > th`` (they differ only when the membrane
equals the threshold exactly); stoprt's ``LIF.u`` is ``H - v_r`` before the reset, where SpikingJelly
keeps ``v`` after it; the surrogate (training only) is ``"atan"`` with alpha/2 for ``surrogate.ATan``
(same curve, peak scaled to 1) and stoprt's default ``"exp"`` otherwise. Both step modes hold the same
parameters; stoprt runs one step at a time. ``IFNode`` (no leak) is refused: stoprt's leak lies in (0, 1).

Spec entries: ``{"type": "LIFNode", "tau": 2.0, "decay_input": true, "v_threshold": 1.0, "v_reset": 0.0}``
(``"v_reset": null`` for the soft reset), ``{"type": "ParametricLIFNode", "init_tau": 2.0, ...}``,
``{"type": "Dropout", "p": 0.5}`` for ``layer.Dropout`` (one mask per sample, like stoprt's).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ...runtime import layers as L
from ._common import Chain, ConversionError, Layer, build, lif_layer, source_dtype
from ._spec import State, check_keys, convert, read_spec, sequential_entries

NODE_KEYS = ("tau", "init_tau", "decay_input", "v_threshold", "v_reset", "detach_reset", "step_mode",
             "store_v_seq", "surrogate", "alpha")


def from_spikingjelly(source: nn.Module | list | dict | str, state_dict: dict[str, Tensor] | None = None,
                      input_shape: Iterable[int] | None = None, dtype: torch.dtype | None = None) -> L.Sequential:
    """A stoprt network that fires exactly like the SpikingJelly network ``source`` (in eval mode).

    Args:
        source: an ``nn.Sequential`` of torch or ``layer.*`` layers and ``neuron.LIFNode`` /
            ``neuron.ParametricLIFNode``, or a layer spec (list, dict or JSON path).
        state_dict: the weights (default: the module's own); needed with a spec.
        input_shape: one step's input without batch; checks every layer's shape (default: the spec's).
        dtype: of the result (default: that of the source's weights).
    """
    layers, spec_shape = spikingjelly_layers(source, state_dict)
    shape = input_shape if input_shape is not None else spec_shape
    tensors = state_dict.values() if state_dict is not None else (
        source.state_dict().values() if isinstance(source, nn.Module) else ())
    return build(layers, shape, dtype or source_dtype(tensors))


def spikingjelly_layers(source: Any, state_dict: dict[str, Tensor] | None = None) -> tuple[list[Layer], Any]:
    """The stoprt layer records and the spec's input shape (None for a module) of a SpikingJelly network."""
    if isinstance(source, nn.Module):
        entries = sequential_entries(source, _node_entry, "SpikingJelly",
                                     "torch and layer.* layers, neuron.LIFNode, neuron.ParametricLIFNode")
        shape, state = None, (state_dict if state_dict is not None else source.state_dict())
    else:
        if state_dict is None:
            raise ConversionError("a layer spec needs the state dict with the weights")
        (entries, shape), state = read_spec(source), state_dict
    handlers = {"LIFNode": _add_node, "ParametricLIFNode": _add_node}
    return convert(entries, state, handlers, "SpikingJelly"), shape


def _node_entry(module: nn.Module) -> dict | None:
    kind = type(module).__name__
    if not type(module).__module__.startswith("spikingjelly"):
        return None
    if kind == "Dropout":
        return {"type": "Dropout", "p": float(module.p)}
    if kind not in ("LIFNode", "ParametricLIFNode"):
        return None
    entry = {"type": kind, "decay_input": bool(module.decay_input), "v_threshold": float(module.v_threshold),
             "v_reset": None if module.v_reset is None else float(module.v_reset)}
    if kind == "LIFNode":
        entry["tau"] = float(module.tau)
    surrogate = getattr(module, "surrogate_function", None)
    if type(surrogate).__name__ == "ATan":
        entry["surrogate"], entry["alpha"] = "atan", float(surrogate.alpha) / 2
    return entry


def _add_node(entry: dict, state: State, prefix: str, origin: str, chain: Chain) -> None:
    check_keys(entry, NODE_KEYS, origin)
    if entry["type"] == "LIFNode":
        tau = float(entry.get("tau", 2.0))
        if not tau > 1.0:
            raise ConversionError(f"{origin}: tau={tau:g}; SpikingJelly's LIFNode needs tau > 1")
        k = torch.tensor(1.0 / tau, dtype=torch.float64)
        learn_leak = False
    else:
        w = state.get(prefix + "w")
        if w is None:
            init_tau = float(entry.get("init_tau", 2.0))
            w = torch.tensor(-math.log(init_tau - 1.0))
        if w.numel() != 1:
            raise ConversionError(f"{origin}: w has shape {tuple(w.shape)}; ParametricLIFNode has one w")
        k = torch.sigmoid(w.reshape(())).to(torch.float64)  # in w's dtype, as SpikingJelly computes it
        learn_leak = True
    v_reset = entry.get("v_reset", 0.0)
    threshold = float(entry.get("v_threshold", 1.0)) - (0.0 if v_reset is None else float(v_reset))
    if entry.get("decay_input", True):
        chain.scale_input(k, None, origin)
    chain.add(lif_layer(torch.tensor(threshold, dtype=torch.float64), float(1.0 - k), "soft" if v_reset is None
                        else "hard", origin, chain.spatial, learn_threshold=False, learn_leak=learn_leak,
                        surrogate=entry.get("surrogate", "exp"), alpha=float(entry.get("alpha", 1.0)),
                        leak_source="1 - 1/tau"))
