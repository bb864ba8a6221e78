"""A JSON-able description of a network built from stoprt layers, and the network built back from it.

``describe(net)`` walks ``Sequential`` / ``Residual`` nesting and records every layer's constructor
arguments; ``build(desc)`` calls the same constructors, so the rebuilt network has the same
``state_dict`` keys and shapes (load the weights into it). Thresholds are recorded with their exact
shape, so a per-channel or per-neuron LIF needs no dry run to be sized again. A leak shared between
neuron layers (``LIF(share_leak_with=...)``) is recorded as the path of the first layer owning that
Parameter, e.g. ``"1.main.1"``, and tied again on build.

Example::

    desc = describe(net)                  # plain dicts, lists, numbers and strings
    json.dumps(desc)
    twin = build(desc); twin.load_state_dict(net.state_dict())
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..runtime import layers as L

FORMAT = "stoprt-architecture"
VERSION = 1


class ArchitectureError(ValueError):
    """A network or description that cannot be described or built."""


def _tuple(value: Any) -> Any:
    """JSON lists back to the tuples torch's layers store (ints and None stay as they are)."""
    return tuple(value) if isinstance(value, list) else value


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# Each entry: the exact class, its constructor arguments read off an instance, and the constructor.
# Exact classes (not isinstance): a subclass may add state or change the dynamics, so it is unknown.
def _conv_args(m: L.Conv2d) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation),
            "groups": m.groups, "bias": m.bias is not None}


def _lif_args(m: L.LIF) -> dict:
    return {"threshold": m.granularity,
            "shape": None if m.threshold is None or m.granularity == "layer" else list(m.threshold.shape),
            "init_threshold": m.init_threshold, "threshold_floor": m.threshold_floor,
            "leak": float(m.leak.detach()), "leak_range": list(m.leak_range), "surrogate": m.surrogate,
            "alpha": m.alpha, "learn_threshold": bool(m.learn_threshold),
            "learn_leak": bool(m.learn_leak), "reset": m.reset}


def _readout_args(m: L.LeakyReadout) -> dict:
    return {"leak": float(m.leak.detach()), "leak_range": list(m.leak_range),
            "learn_leak": bool(m.learn_leak)}


_LAYERS: dict[str, tuple[type, Callable[[Any], dict], Callable[..., nn.Module]]] = {
    "Linear": (L.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                    "bias": m.bias is not None}, L.Linear),
    "Conv2d": (L.Conv2d, _conv_args, lambda **k: L.Conv2d(**{n: _tuple(v) for n, v in k.items()})),
    "BatchNorm2d": (L.BatchNorm2d, lambda m: {"num_features": m.num_features, "eps": m.eps,
                                              "momentum": m.momentum}, L.BatchNorm2d),
    "Dropout": (L.Dropout, lambda m: {"p": m.p}, L.Dropout),
    "LIF": (L.LIF, _lif_args, lambda **k: L.LIF(**{n: _tuple(v) for n, v in k.items()})),
    "LeakyReadout": (L.LeakyReadout, _readout_args,
                     lambda **k: L.LeakyReadout(**{n: _tuple(v) for n, v in k.items()})),
    "AvgPool2d": (L.AvgPool2d, lambda m: {n: _jsonable(getattr(m, n)) for n in nn.AvgPool2d.__constants__},
                  lambda **k: L.AvgPool2d(**{n: _tuple(v) for n, v in k.items()})),
    "MaxPool2d": (nn.MaxPool2d, lambda m: {n: _jsonable(getattr(m, n)) for n in nn.MaxPool2d.__constants__},
                  lambda **k: nn.MaxPool2d(**{n: _tuple(v) for n, v in k.items()})),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, lambda m: {"output_size": _jsonable(m.output_size)},
                          lambda output_size: nn.AdaptiveAvgPool2d(_tuple(output_size))),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}, nn.Flatten),
    "Identity": (nn.Identity, lambda m: {}, nn.Identity),
}
_BY_CLASS = {cls: name for name, (cls, _, _) in _LAYERS.items()}
_BY_CLASS[nn.AvgPool2d] = "AvgPool2d"  # torch's own, as users and importers may build it


def layer_class(name: str) -> type:
    """The class of a layer type of the format (``"Linear"``, ``"MaxPool2d"``, ...); KeyError if unknown."""
    return _LAYERS[name][0]


def _is_neuron(m: nn.Module) -> bool:
    return L.layer_kind(m, strict=False) == L.NEURON


def describe(net: nn.Module) -> dict:
    """The architecture of ``net`` as plain JSON-able data (no weights).

    Raises :class:`ArchitectureError` naming the first layer (path and type) that is not a stoprt
    layer, a supported torch layer, ``Sequential`` or ``Residual``.
    """
    leak_owner: dict[int, str] = {}  # id(leak Parameter) -> path of the first layer holding it
    return {"format": FORMAT, "version": VERSION, "net": _describe(net, "", leak_owner)}


def _describe(m: nn.Module, path: str, leak_owner: dict[int, str]) -> dict:
    def child(name: str) -> str:
        return f"{path}.{name}" if path else name

    if isinstance(m, nn.Sequential) and type(m) in (L.Sequential, nn.Sequential):
        shape = getattr(m, "input_shape", None)
        return {"type": "Sequential", "input_shape": None if shape is None else list(shape),
                "layers": [_describe(layer, child(name), leak_owner) for name, layer in m.named_children()]}
    if type(m) is L.Residual:
        return {"type": "Residual", "main": _describe(m.main, child("main"), leak_owner),
                "shortcut": _describe(m.shortcut, child("shortcut"), leak_owner)}
    name = _BY_CLASS.get(type(m))
    if name is None:
        raise ArchitectureError(f"layer {path or '<net>'} ({type(m).__module__}.{type(m).__qualname__}) "
                                f"cannot be described: not a stoprt layer; supported: Sequential, Residual, "
                                f"{', '.join(_LAYERS)}")
    node = {"type": name, **_LAYERS[name][1](m)}
    if _is_neuron(m):
        owner = leak_owner.setdefault(id(m.leak), path)
        node["share_leak_with"] = owner if owner != path else None
    return node


def build(desc: dict) -> nn.Module:
    """Build the network ``desc`` describes (weights freshly initialised: load a state_dict after).

    Raises :class:`ArchitectureError` for another format or version, an unknown layer type, or bad
    arguments, naming the layer's path.
    """
    if not isinstance(desc, dict) or desc.get("format") != FORMAT or "net" not in desc:
        raise ArchitectureError("not a stoprt architecture description (expected a dict with "
                                f"format {FORMAT!r} and 'net')")
    if desc.get("version") != VERSION:
        raise ArchitectureError(f"architecture description version {desc.get('version')}; this stoprt "
                                f"reads version {VERSION}")
    return _build(desc["net"], "", {})


def _build(node: Any, path: str, built: dict[str, nn.Module]) -> nn.Module:
    where = path or "<net>"
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise ArchitectureError(f"layer {where}: expected a dict with a 'type', got {node!r:.80}")

    def child(name: Any) -> str:
        return f"{path}.{name}" if path else str(name)

    kind, args = node["type"], {k: v for k, v in node.items() if k != "type"}
    try:
        if kind == "Sequential":
            layers = [_build(n, child(i), built) for i, n in enumerate(args.get("layers", []))]
            module: nn.Module = L.Sequential(*layers, input_shape=args.get("input_shape"))
        elif kind == "Residual":
            main = _build(args["main"], child("main"), built)
            module = L.Residual(main, _build(args["shortcut"], child("shortcut"), built))
        elif kind in _LAYERS:
            shared = args.pop("share_leak_with", None)
            if shared is not None:
                if shared not in built or not _is_neuron(built[shared]):
                    raise ArchitectureError(f"layer {where} shares the leak of {shared!r}, which is not an "
                                            "earlier neuron layer")
                args["share_leak_with"] = built[shared]
            module = _LAYERS[kind][2](**args)
        else:
            raise ArchitectureError(f"layer {where} has unknown type {kind!r}; known: Sequential, Residual, "
                                    f"{', '.join(_LAYERS)}")
    except (TypeError, KeyError, ValueError) as err:
        if isinstance(err, ArchitectureError):
            raise
        raise ArchitectureError(f"layer {where} ({kind}) cannot be built from {args}: {err}") from err
    built[path] = module
    return module
