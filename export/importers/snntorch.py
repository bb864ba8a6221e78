"""Import snnTorch networks: ``nn.Sequential`` of torch layers and ``snntorch.Leaky``.

snnTorch's ``Leaky`` (1.0, ``reset_delay=True``, read from its source) does at each step::

    reset = H(mem[t-1] - threshold)                       # the previous step's spike, detached
    mem[t] = clamp(beta, 0, 1) * mem[t-1] + input[t] - reset * threshold     # "subtract"
    mem[t] = clamp(beta, 0, 1) * (1 - reset) * mem[t-1] + input[t]          # "zero"
    spk[t] = H(mem[t] - threshold) * graded_spikes_factor                  # H(x) = [x > 0]

and stoprt's ``LIF`` (``functional.carried_membrane``) does ``U[t] = a U[t-1] - th s[t-1] + I[t]``
(``reset="soft_nodecay"``) or ``U[t] = a U[t-1] (1 - s[t-1]) + I[t]`` (``reset="hard"``). So:

* ``beta`` (clamped to [0, 1] as snnTorch does) -> ``LIF.leak``, one per layer: a per-neuron beta
  must hold one value;
* ``threshold`` -> ``LIF.threshold``: a scalar -> ``"layer"``, ``(C,)`` after a Linear or ``(C, 1, 1)``
  -> ``"channel"``, any other shape -> ``"neuron"`` with that shape (broadcast as in snnTorch);
* ``reset_mechanism="subtract"`` -> ``reset="soft_nodecay"``; ``"zero"`` -> ``reset="hard"``;
* ``learn_beta`` / ``learn_threshold`` -> ``learn_leak`` / ``learn_threshold``;
* ``graded_spikes_factor`` g -> folded into the next Linear / Conv2d's weights (exact);
* ``mem`` -> ``LIF.u`` (the same value: both are taken before the reset);
* the surrogate (not in a state dict) -> ``"atan"`` with alpha 1, snnTorch's default ``atan(alpha=2)``
  (a spec entry may give stoprt's ``"surrogate"`` and ``"alpha"``).

Refused with a clear error: ``reset_mechanism="none"``, ``inhibition=True``, ``state_quant``,
``reset_delay=False`` with the subtract reset (it subtracts in the same step and again later; with
``"zero"`` the spikes are those of ``reset="hard"``, only the reported membrane is after the reset),
other snnTorch neurons (``Synaptic``, ``RLeaky``, ``Alpha``, ...), beta 0 or 1 (stoprt's leak lies in (0, 1)).

A state dict holds ``beta``, ``threshold``, ``graded_spikes_factor`` and ``reset_mechanism_val`` of each
``Leaky``; a spec entry may give them instead (``{"type": "Leaky", "beta": 0.9, "threshold": 1.0,
"reset_mechanism": "zero", "learn_beta": true}``); where both give one, they must agree.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ...runtime import layers as L
from ._common import Chain, ConversionError, Layer, as_tensor, build, lif_layer, source_dtype, uniform
from ._spec import State, check_keys, convert, read_spec, sequential_entries

LEAKY_KEYS = ("beta", "threshold", "reset_mechanism", "learn_beta", "learn_threshold", "graded_spikes_factor",
              "learn_graded_spikes_factor", "reset_delay", "inhibition", "state_quant", "init_hidden", "output",
              "surrogate", "alpha")
RESETS = {"subtract": "soft_nodecay", "zero": "hard"}
_RESET_NAMES = ("subtract", "zero", "none")  # snnTorch's reset_mechanism_val order


def from_snntorch(source: nn.Module | list | dict | str, state_dict: dict[str, Tensor] | None = None,
                  input_shape: Iterable[int] | None = None, dtype: torch.dtype | None = None) -> L.Sequential:
    """A stoprt network that steps exactly like the snnTorch network ``source`` (in eval mode).

    Args:
        source: an ``nn.Sequential`` of torch layers and ``snntorch.Leaky`` (its own state dict is used
            unless ``state_dict`` is given), or a layer spec (list, dict or JSON path; see ``_spec``).
        state_dict: the weights, keyed as ``nn.Sequential`` names them (``"0.weight"``, ``"1.beta"``).
        input_shape: one step's input without batch, e.g. ``(2, 32, 32)``; checks every layer's shape
            (default: the spec's ``input_shape``, if any).
        dtype: of the result (default: that of the source's weights).
    """
    layers, spec_shape = snntorch_layers(source, state_dict)
    shape = input_shape if input_shape is not None else spec_shape
    return build(layers, shape, dtype or source_dtype(_tensors(source, state_dict)))


def snntorch_layers(source: Any, state_dict: dict[str, Tensor] | None = None) -> tuple[list[Layer], Any]:
    """The stoprt layer records and the spec's input shape (None for a module) of an snnTorch network."""
    if isinstance(source, nn.Module):
        entries = sequential_entries(source, _leaky_entry, "snnTorch", "torch layers and snntorch.Leaky")
        shape = None
        state = state_dict if state_dict is not None else source.state_dict()
    else:
        if state_dict is None:
            raise ConversionError("a layer spec needs the state dict with the weights")
        entries, shape = read_spec(source)
        state = state_dict
    return convert(entries, state, {"Leaky": _add_leaky}, "snnTorch", ignorable=(".mem",)), shape


def _tensors(source: Any, state_dict: dict | None) -> Iterable[Tensor]:
    if state_dict is not None:
        return state_dict.values()
    return source.state_dict().values() if isinstance(source, nn.Module) else ()


def _leaky_entry(module: nn.Module) -> dict | None:
    if type(module).__name__ != "Leaky" or not type(module).__module__.startswith("snntorch"):
        return None
    return {"type": "Leaky", "reset_mechanism": module.reset_mechanism,
            "learn_beta": isinstance(module.beta, nn.Parameter),
            "learn_threshold": isinstance(module.threshold, nn.Parameter),
            "reset_delay": bool(getattr(module, "reset_delay", True)), "inhibition": bool(module.inhibition),
            "state_quant": bool(module.state_quant)}


def _value(entry: dict, state: State, key: str, default: Any, origin: str) -> Tensor:
    """The state dict's value of ``key``, else the spec's, else ``default``; both given must agree."""
    stored = state.get(f"{entry['name']}.{key}")
    given = entry.get(key)
    if stored is not None and given is not None:
        g, s = as_tensor(given, origin, key), stored.to(torch.float64)
        if g.numel() == 1:
            g = g.reshape(()).expand_as(s)
        if g.shape != s.shape or not torch.allclose(g, s, rtol=1e-6, atol=1e-7):
            raise ConversionError(f"{origin}: the spec says {key}={given!r}, the state dict holds {stored.tolist()!r}")
    if stored is not None:
        return stored.to(torch.float64)
    return as_tensor(default if given is None else given, origin, key)


def _add_leaky(entry: dict, state: State, prefix: str, origin: str, chain: Chain) -> None:
    check_keys(entry, LEAKY_KEYS, origin)
    if entry.get("inhibition"):
        raise ConversionError(f"{origin}: inhibition=True (only the strongest neuron fires) has no stoprt equivalent")
    if entry.get("state_quant"):
        raise ConversionError(f"{origin}: state_quant quantises the membrane; stoprt's LIF does not")
    mechanism = entry.get("reset_mechanism")
    stored = state.get(prefix + "reset_mechanism_val")
    if stored is not None:
        from_state = _RESET_NAMES[int(stored)]
        if mechanism is not None and mechanism != from_state:
            raise ConversionError(f"{origin}: the spec says reset_mechanism={mechanism!r}, the state dict {from_state!r}")
        mechanism = from_state
    mechanism = mechanism or "subtract"
    if mechanism not in RESETS:
        raise ConversionError(f"{origin}: reset_mechanism={mechanism!r}; stoprt supports 'subtract' (as "
                              "reset='soft_nodecay') and 'zero' (as reset='hard')")
    if entry.get("reset_delay", True) is False and mechanism == "subtract":
        raise ConversionError(f"{origin}: reset_delay=False with the subtract reset has no stoprt equivalent "
                              "(use the default reset_delay=True)")
    if "beta" not in entry and prefix + "beta" not in state.tensors:
        raise ConversionError(f"{origin}: beta is in neither the state dict nor the spec")
    beta = _value(entry, state, "beta", None, origin).clamp(0.0, 1.0)  # as snnTorch's forward does
    leak = uniform(beta, origin, "beta", "stoprt's LIF has one leak per layer (STOP's input trace needs it); "
                   "give the layer one beta")
    threshold = _value(entry, state, "threshold", 1.0, origin)
    chain.add(lif_layer(threshold, leak, RESETS[mechanism], origin, chain.spatial,
                        learn_threshold=bool(entry.get("learn_threshold", False)),
                        learn_leak=bool(entry.get("learn_beta", False)), leak_source="beta, clamped to [0, 1]",
                        surrogate=entry.get("surrogate", "atan"), alpha=float(entry.get("alpha", 1.0))))
    graded = _value(entry, state, "graded_spikes_factor", 1.0, origin)
    chain.scale_next_input(uniform(graded, origin, "graded_spikes_factor", "stoprt folds it into the next "
                                   "layer's weights, which needs one value"), origin)
