"""Which neuron layer each synaptic op feeds: the wiring STOP's input traces need.

An op's input trace decays with the leak of the neuron layer its output current reaches. This module
follows the currents through the network's structure (``Sequential``, ``Residual``) and checks that the
network is one STOP computes exact gradients for:

* every synaptic op (Linear, Conv2d) takes spikes or the analog network input, never another op's
  current directly;
* between an op and its neuron layer only ops linear and fixed in time: frozen BatchNorm, average
  pooling, flattening, per-sample dropout, residual sums. Max pooling is fine on spikes (after a LIF),
  not on currents;
* an op whose current reaches several neuron layers (a residual stream) needs them to share one leak
  Parameter (``LIF(share_leak_with=...)``), so that one trace serves all of them.
"""

from __future__ import annotations

from torch import nn

from . import layers as L


class WiringError(ValueError):
    """The network has a structure STOP cannot compute exact gradients for."""


def _name(names: dict[int, str], module: nn.Module) -> str:
    return f"{names.get(id(module), '?')} ({type(module).__name__})"


def _flow(module: nn.Module, open_ops: frozenset, targets: dict, names: dict) -> frozenset:
    """Propagate the set of ops whose current is in flight through ``module``; record targets.

    What each layer does with a current is its role in the registry of layer kinds (``L.layer_kind``).
    """
    try:
        kind = L.layer_kind(module)
    except L.UnknownLayerError as err:
        raise WiringError(f"STOP cannot follow currents through {_name(names, module)}: {err}") from None
    if kind == L.NEURON:
        if getattr(module, "reset", "soft") == "hard":
            raise WiringError(f"{_name(names, module)} uses a hard reset: its per-neuron decay a (1 - s) would "
                              "need a trace per synapse; STOP needs reset='soft' or 'soft_nodecay'")
        for op in open_ops:
            targets.setdefault(op, []).append(module)
        return frozenset()
    if kind == L.SYNAPSE:
        if open_ops:
            feeders = ", ".join(_name(names, op) for op in open_ops)
            raise WiringError(f"{_name(names, module)} receives the current of {feeders} with no neuron "
                              "layer in between; STOP needs spikes (or the network input) at each op")
        return frozenset({module})
    if kind in (L.CURRENT_PASS, L.AFFINE_PASS):  # linear (or affine) and fixed in time
        return open_ops
    if kind == L.SPIKE_PASS:
        if open_ops:
            raise WiringError(f"{_name(names, module)} acts on a current: max pooling is not linear, so "
                              "STOP's traces are inexact there; pool after the LIF or use AvgPool2d")
        return open_ops
    if kind == L.RESIDUAL:
        return _flow(module.main, open_ops, targets, names) | _flow(module.shortcut, open_ops, targets, names)
    for child in module:  # a sequence
        open_ops = _flow(child, open_ops, targets, names)
    return open_ops


def wire(net: nn.Module) -> dict[nn.Module, list[nn.Module]]:
    """Attach each synaptic op of ``net`` to the neuron layer(s) it feeds; returns that map.

    Raises :class:`WiringError` naming the offending layer when the structure is not supported.
    """
    names = {id(m): n or "<net>" for n, m in net.named_modules()}
    targets: dict[nn.Module, list[nn.Module]] = {}
    dangling = _flow(net, frozenset(), targets, names)
    if dangling:
        ops = ", ".join(_name(names, op) for op in dangling)
        raise WiringError(f"the current of {ops} reaches the network output without a neuron layer; "
                          "end the network with LIF or LeakyReadout")
    for op, neurons in targets.items():
        leaks = {id(n.leak) for n in neurons}
        if len(leaks) > 1:
            raise WiringError(f"{_name(names, op)} feeds {len(neurons)} neuron layers with different leaks; "
                              "tie them with LIF(share_leak_with=...) so one input trace is exact")
        object.__setattr__(op, "post_neuron", neurons[0])
    for m in net.modules():
        if L.layer_kind(m, strict=False) == L.SYNAPSE and m not in targets:
            raise WiringError(f"{_name(names, m)} is not reached by the network's forward structure")
    return targets
