"""Layer specs (the JSON that stands in for a network's Python code) and the torch layers in them.

A spec is a list of layer entries, or a dict ``{"input_shape": [C, H, W], "layers": [...]}``. Each entry
is a dict with a ``"type"`` (``"Linear"``, ``"nn.Conv2d"``, ``"snn.Leaky"``, ...: anything before the last
dot is ignored), an optional ``"name"`` (its prefix in the state dict; default: its index, as in
``nn.Sequential``) and the constructor arguments that the state dict does not hold. Unknown keys are
errors, so a misspelt argument cannot be silently ignored.

Torch layers and their keys (shapes come from the weights; a key given must agree with them):
``Linear`` (in_features, out_features, bias), ``Conv2d`` (stride, padding, dilation, groups, ...),
``BatchNorm2d`` (eps, momentum), ``AvgPool2d`` / ``MaxPool2d`` (kernel_size, stride, padding, ...),
``Flatten`` (start_dim, end_dim), ``Dropout`` (p).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._common import Chain, ConversionError, Layer, as_tensor, numeric_padding

TORCH_KEYS: dict[str, tuple[str, ...]] = {
    "Linear": ("in_features", "out_features", "bias"),
    "Conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
               "padding_mode"),
    "BatchNorm2d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "AvgPool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "MaxPool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "Flatten": ("start_dim", "end_dim"),
    "Dropout": ("p", "inplace"),
}
_TORCH_CLASSES = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "BatchNorm2d": nn.BatchNorm2d,
                  "AvgPool2d": nn.AvgPool2d, "MaxPool2d": nn.MaxPool2d, "Flatten": nn.Flatten,
                  "Dropout": nn.Dropout}

# A neuron handler adds the stoprt layers for one entry: (entry, state, prefix, origin, chain) -> None.
Handler = Callable[[dict, "State", str, str, Chain], None]


class State:
    """A state dict that remembers which entries were used, so leftovers can be reported."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise ConversionError(f"state dict entries {bad[:5]} are not tensors")
        self.tensors = tensors
        self.used: set[str] = set()

    def get(self, key: str) -> Tensor | None:
        if key not in self.tensors:
            return None
        self.used.add(key)
        value = self.tensors[key].detach().to("cpu")
        if value.is_floating_point():
            as_tensor(value, f"state dict entry {key!r}", "it")  # NaN or Inf: a clear error
        return value

    def need(self, key: str, origin: str) -> Tensor:
        value = self.get(key)
        if value is None:
            raise ConversionError(f"{origin}: the state dict has no {key!r}")
        return value

    def unused(self) -> list[str]:
        return [k for k in self.tensors if k not in self.used]


def read_spec(spec: Any) -> tuple[list[dict], tuple[int, ...] | None]:
    """The entries and optional input shape of a spec: a path to a JSON file, a dict or a list."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path} is not valid JSON: {err}") from err
    input_shape = None
    if isinstance(spec, dict):
        unknown = set(spec) - {"layers", "input_shape"}
        if unknown or "layers" not in spec:
            raise ConversionError("a layer spec dict has 'layers' and optionally 'input_shape'"
                                  + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
        if spec.get("input_shape") is not None:
            input_shape = tuple(int(n) for n in spec["input_shape"])
        spec = spec["layers"]
    if not isinstance(spec, list) or not spec:
        raise ConversionError("a layer spec is a non-empty list of layer entries")
    entries = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise ConversionError(f"layer spec entry {i} must be a dict with a 'type', got {entry!r:.80}")
        entries.append({**entry, "type": entry["type"].rsplit(".", 1)[-1], "name": str(entry.get("name", i))})
    return entries, input_shape


def check_keys(entry: dict, allowed: tuple[str, ...], origin: str) -> None:
    unknown = set(entry) - set(allowed) - {"type", "name"}
    if unknown:
        raise ConversionError(f"{origin}: unknown keys {sorted(unknown)}; {entry['type']} takes {list(allowed)}")


def convert(entries: list[dict], state: dict[str, Any], handlers: dict[str, Handler], library: str,
            ignorable: tuple[str, ...] = ()) -> list[Layer]:
    """The stoprt layers of a spec's entries with values from ``state``; every state entry must be used
    (``ignorable`` suffixes excepted), so a spec that does not match the state dict is an error."""
    tensors = State(state)
    chain = Chain()
    for entry in entries:
        kind, name = entry["type"], entry["name"]
        origin = f"layer {name} ({library} {kind})"
        if kind in TORCH_KEYS:
            check_keys(entry, TORCH_KEYS[kind], origin)
            chain.add(torch_layer(entry, tensors, f"{name}.", origin))
        elif kind in handlers:
            handlers[kind](entry, tensors, f"{name}.", origin, chain)
        else:
            raise ConversionError(f"{origin} is not supported; supported: {', '.join([*TORCH_KEYS, *handlers])}")
    left = [k for k in tensors.unused() if not k.endswith(ignorable)]
    if left:
        raise ConversionError(f"the state dict has entries no layer of the spec uses: {left[:6]}"
                              f"{' ...' if len(left) > 6 else ''} (is the spec missing layers, or are the names "
                              "wrong?)")
    return chain.finish()


def _agree(entry: dict, key: str, actual: Any, origin: str) -> None:
    if key in entry and entry[key] is not None:
        given = entry[key]
        same = (list(given) if isinstance(given, (list, tuple)) else given) == \
               (list(actual) if isinstance(actual, (list, tuple)) else actual)
        if not same and not (isinstance(given, int) and isinstance(actual, (list, tuple))
                             and all(a == given for a in actual)):
            raise ConversionError(f"{origin}: {key}={given!r}, but the weights say {actual!r}")


def torch_layer(entry: dict, state: State, prefix: str, origin: str) -> Layer:
    """The stoprt layer of one torch-layer entry, with its tensors from the state dict."""
    kind = entry["type"]
    g = entry.get
    if kind == "Linear":
        w = state.need(prefix + "weight", origin)
        if w.dim() != 2:
            raise ConversionError(f"{origin}: weight has shape {tuple(w.shape)}; a Linear weight is 2-D")
        b = state.get(prefix + "bias")
        _agree(entry, "out_features", w.shape[0], origin)
        _agree(entry, "in_features", w.shape[1], origin)
        _agree(entry, "bias", b is not None, origin)
        _check_bias(b, w.shape[0], origin)
        kwargs = {"in_features": w.shape[1], "out_features": w.shape[0], "bias": b is not None}
        return Layer(kind, kwargs, {"weight": w} | ({} if b is None else {"bias": b}), origin)
    if kind == "Conv2d":
        w = state.need(prefix + "weight", origin)
        if w.dim() != 4:
            raise ConversionError(f"{origin}: weight has shape {tuple(w.shape)}; a Conv2d weight is 4-D")
        b = state.get(prefix + "bias")
        if g("padding_mode", "zeros") != "zeros":
            raise ConversionError(f"{origin}: padding_mode {g('padding_mode')!r}; stoprt's Conv2d pads with zeros")
        groups = int(g("groups", 1))
        kernel = tuple(w.shape[2:])
        stride, dilation = _pair(g("stride", 1)), _pair(g("dilation", 1))
        _agree(entry, "out_channels", w.shape[0], origin)
        _agree(entry, "in_channels", w.shape[1] * groups, origin)
        _agree(entry, "kernel_size", list(kernel), origin)
        _agree(entry, "bias", b is not None, origin)
        _check_bias(b, w.shape[0], origin)
        kwargs = {"in_channels": w.shape[1] * groups, "out_channels": w.shape[0], "kernel_size": list(kernel),
                  "stride": list(stride), "padding": list(numeric_padding(g("padding", 0), kernel, stride,
                                                                           dilation, origin)),
                  "dilation": list(dilation), "groups": groups, "bias": b is not None}
        return Layer(kind, kwargs, {"weight": w} | ({} if b is None else {"bias": b}), origin)
    if kind == "BatchNorm2d":
        if g("track_running_stats", True) is False:
            raise ConversionError(f"{origin}: normalises with each batch's statistics; stoprt's BatchNorm2d "
                                  "needs running statistics (track_running_stats=True)")
        mean = state.need(prefix + "running_mean", origin)
        n = mean.shape[0]
        _agree(entry, "num_features", n, origin)
        tensors = {"running_mean": mean, "running_var": state.need(prefix + "running_var", origin),
                   "weight": _or(state.get(prefix + "weight"), torch.ones(n)),
                   "bias": _or(state.get(prefix + "bias"), torch.zeros(n))}
        for key, value in tensors.items():
            if tuple(value.shape) != (n,):
                raise ConversionError(f"{origin}: {key} has shape {tuple(value.shape)}, expected ({n},)")
        tracked = state.get(prefix + "num_batches_tracked")
        if tracked is not None:
            tensors["num_batches_tracked"] = tracked
        kwargs = {"num_features": n, "eps": float(g("eps", 1e-5)), "momentum": g("momentum", 0.1)}
        return Layer(kind, kwargs, tensors, origin)
    if kind == "AvgPool2d":
        kwargs = {"kernel_size": _need(entry, "kernel_size", origin), "stride": g("stride"),
                  "padding": g("padding", 0), "ceil_mode": bool(g("ceil_mode", False)),
                  "count_include_pad": bool(g("count_include_pad", True)), "divisor_override": g("divisor_override")}
        return Layer(kind, _plain(kwargs), {}, origin)
    if kind == "MaxPool2d":
        if g("return_indices"):
            raise ConversionError(f"{origin}: return_indices=True returns a tuple; stoprt passes one tensor on")
        kwargs = {"kernel_size": _need(entry, "kernel_size", origin), "stride": g("stride"),
                  "padding": g("padding", 0), "dilation": g("dilation", 1), "ceil_mode": bool(g("ceil_mode", False))}
        return Layer(kind, _plain(kwargs), {}, origin)
    if kind == "Flatten":
        return Layer(kind, {"start_dim": int(g("start_dim", 1)), "end_dim": int(g("end_dim", -1))}, {}, origin)
    return Layer("Dropout", {"p": float(g("p", 0.5))}, {}, origin)


def torch_entry(module: nn.Module) -> dict | None:
    """The spec entry of a torch layer instance (or a same-named subclass, e.g. SpikingJelly's ``layer.*``)."""
    kind = type(module).__name__
    base = _TORCH_CLASSES.get(kind)
    if base is None or not isinstance(module, base):
        return None
    entry = {"type": kind, **{k: getattr(module, k) for k in TORCH_KEYS[kind] if hasattr(module, k)}}
    if kind in ("Linear", "Conv2d"):
        entry["bias"] = module.bias is not None
    return entry


def sequential_entries(net: nn.Module, neuron_entry: Callable[[nn.Module], dict | None], library: str,
                       supported: str) -> list[dict]:
    """The spec entries of an ``nn.Sequential`` instance (nested Sequentials flattened, names dotted)."""
    if not isinstance(net, nn.Sequential):
        raise ConversionError(f"only nn.Sequential networks can be imported from {library} (the forward of "
                              f"{type(net).__name__} is Python code); export it as a layer spec + state dict")
    entries = []
    for name, module in net.named_modules():
        if isinstance(module, nn.Sequential):
            continue
        if "." in name and not isinstance(net.get_submodule(name.rsplit(".", 1)[0]), nn.Sequential):
            continue  # a part of a layer already taken whole
        entry = torch_entry(module) or neuron_entry(module)
        if entry is None:
            raise ConversionError(f"layer {name} ({type(module).__module__}.{type(module).__qualname__}) is not "
                                  f"supported; supported: {supported}")
        entries.append({**entry, "name": name})
    return entries


def _check_bias(b: Tensor | None, n: int, origin: str) -> None:
    if b is not None and tuple(b.shape) != (n,):
        raise ConversionError(f"{origin}: bias has shape {tuple(b.shape)}, but the weight has {n} outputs")


def _pair(v: Any) -> tuple[int, int]:
    t = tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else (v, v)))
    return t * 2 if len(t) == 1 else t  # type: ignore[return-value]


def _need(entry: dict, key: str, origin: str) -> Any:
    if entry.get(key) is None:
        raise ConversionError(f"{origin}: the spec must give {key!r}")
    return entry[key]


def _or(value: Tensor | None, default: Tensor) -> Tensor:
    return default if value is None else value


def _plain(kwargs: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
