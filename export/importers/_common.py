"""What every importer shares: a list of stoprt layers with their values, folding, checks, building.

An importer turns the source network into :class:`Layer` records (a stoprt layer type, its constructor
arguments, its parameter values and where it came from) through a :class:`Chain`, which checks channel
counts as layers arrive and folds constant input scales into the synaptic layers (SpikingJelly's
``1/tau``, NIR's ``dt R / tau``, sum pooling). :func:`build` then makes the ``Sequential``.

The layer types and constructor arguments are those of ``stoprt.export.architecture``, so
:func:`describe` gives the same kind of description that module writes for a model file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ...runtime import layers as L
from ..architecture import layer_class


class ConversionError(ValueError):
    """A source network that cannot be imported (or a stoprt network that cannot be exported) exactly."""


@dataclass
class Layer:
    """One stoprt layer to build: ``kind`` (a key of ``BUILDERS``), constructor ``kwargs`` (plain values),
    ``tensors`` (attribute name -> value, loaded after construction) and ``origin`` (for messages)."""

    kind: str
    kwargs: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    origin: str = "?"


# The layer types an importer makes (the architecture format's names), and what their roles allow:
# synaptic ops take a folded factor; layers linear in their input and blind to a positive common
# factor (current_pass; max pooling, a spike_pass, too) let a scalar scale pass through.
BUILDERS = ("Linear", "Conv2d", "BatchNorm2d", "Dropout", "AvgPool2d", "MaxPool2d", "Flatten", "LIF",
            "LeakyReadout")
SYNAPTIC = tuple(n for n in BUILDERS if L.layer_kind(layer_class(n)) == L.SYNAPSE)
SCALE_PASSTHROUGH = tuple(n for n in BUILDERS if L.layer_kind(layer_class(n)) in (L.CURRENT_PASS, L.SPIKE_PASS))
SNAP = 1e-9  # relative distance from 1 (or from 0 for offsets) below which a factor is taken as exact


def as_tensor(value: Any, origin: str, what: str) -> Tensor:
    """A float64 tensor of ``value`` (array, tensor or number); NaN or Inf is an error naming it."""
    t = torch.as_tensor(value).detach().to("cpu", torch.float64)
    # A sum is NaN or Inf if any value is (and, far more rarely, on overflow: then check them all).
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise ConversionError(f"{origin}: {what} has NaN or Inf values")
    return t


def uniform(value: Any, origin: str, what: str, why: str) -> float:
    """The single value of a scalar or constant array; otherwise an error saying ``why`` it must be one."""
    t = as_tensor(value, origin, what)
    if t.numel() == 0:
        raise ConversionError(f"{origin}: {what} is empty")
    if not bool((t == t.flatten()[0]).all()):
        raise ConversionError(f"{origin}: {what} differs between neurons (from {t.min().item():.6g} to "
                              f"{t.max().item():.6g}); {why}")
    return float(t.flatten()[0])


def threshold_layout(th: Tensor, spatial: bool, coarsen: bool) -> tuple[str, tuple[int, ...] | None, Tensor]:
    """Granularity, ``shape`` argument and value of a LIF threshold given as a tensor.

    ``coarsen`` (NIR, whose parameters are always per neuron) picks the coarsest granularity that holds
    the values exactly; otherwise the tensor's own layout is kept, so a per-neuron learnable threshold
    stays per neuron.
    """
    if th.numel() == 1:
        return "layer", None, th.reshape(())
    if coarsen and bool((th == th.flatten()[0]).all()):
        return "layer", None, th.flatten()[0].clone()
    if th.dim() == 3 and (th.shape[1:] == (1, 1) or (coarsen and bool((th == th[:, :1, :1]).all()))):
        return "channel", (th.shape[0], 1, 1), th[:, :1, :1].clone()
    if th.dim() == 1 and not spatial:
        return "channel", tuple(th.shape), th
    return "neuron", tuple(th.shape), th


def lif_layer(threshold: Tensor, leak: float, reset: str, origin: str, spatial: bool, coarsen: bool = False,
              learn_threshold: bool = True, learn_leak: bool = True, surrogate: str = "exp",
              alpha: float = 1.0, leak_source: str = "leak") -> Layer:
    """A LIF record; the leak range is widened to hold the imported leak, the threshold floor lowered to
    hold the smallest imported threshold. ``leak_source`` says where the leak came from, for messages."""
    _check_leak(leak, origin, leak_source)
    if float(threshold.min()) <= 0.0:
        raise ConversionError(f"{origin}: threshold {float(threshold.min()):.6g} is not positive; stoprt's "
                              "LIF needs thresholds above zero")
    granularity, shape, value = threshold_layout(threshold, spatial, coarsen)
    low = float(value.min())
    kwargs = {"threshold": granularity, "shape": None if shape is None else list(shape),
              "init_threshold": low, "threshold_floor": min(0.05, low), "leak": leak,
              "leak_range": [min(0.01, leak), max(0.99, leak)], "surrogate": surrogate, "alpha": alpha,
              "learn_threshold": learn_threshold, "learn_leak": learn_leak, "reset": reset}
    return Layer("LIF", kwargs, {"threshold": value, "leak": torch.tensor(leak, dtype=torch.float64)}, origin)


def _check_leak(leak: float, origin: str, leak_source: str) -> None:
    if not 0.0 < leak < 1.0:
        kind = " (no leak: integrate-and-fire)" if leak == 1.0 else ""
        raise ConversionError(f"{origin}: leak factor {leak:g} from {leak_source}{kind}; stoprt's neurons need a "
                              "leak strictly between 0 and 1 (one shared factor per layer, as STOP's traces assume)")


def readout_layer(leak: float, origin: str, learn_leak: bool = True, leak_source: str = "leak") -> Layer:
    _check_leak(leak, origin, leak_source)
    kwargs = {"leak": leak, "leak_range": [min(0.01, leak), max(0.99, leak)], "learn_leak": learn_leak}
    return Layer("LeakyReadout", kwargs, {"leak": torch.tensor(leak, dtype=torch.float64)}, origin)


def numeric_padding(padding: Any, kernel: tuple[int, int], stride: tuple[int, int],
                    dilation: tuple[int, int], origin: str) -> tuple[int, int]:
    """Numeric padding for torch's/NIR's ``"valid"`` and ``"same"`` (stoprt's Conv2d takes numbers)."""
    if isinstance(padding, bytes):
        padding = padding.decode()
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if padding == "same" and all(s == 1 for s in stride) and all(t % 2 == 0 for t in total):
            return (total[0] // 2, total[1] // 2)
        raise ConversionError(f"{origin}: padding {padding!r} with kernel {kernel}, stride {stride}, dilation "
                              f"{dilation} has no symmetric numeric equivalent")
    pad = tuple(int(p) for p in torch.as_tensor(padding).flatten().tolist())
    return pad * 2 if len(pad) == 1 else pad  # type: ignore[return-value]


class Chain:
    """Collects the layers of a sequential network, checking channel counts and folding scales.

    ``add`` rejects a layer whose input channels or features cannot be what the previous layers give;
    ``scale_input`` folds a per-neuron scale (and offset) of the current entering the layer about to be
    added into the synaptic layer (or BatchNorm) before it; ``scale_next_input`` folds a scalar factor on
    the output of the layers so far into the next synaptic layer's weights.
    """

    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self.channels: int | None = None  # channels (maps) or features (vectors) of the current output
        self.spatial = False
        self.where: str | None = None     # origin of the layer that set ``channels``
        self._pending: tuple[float, str] | None = None

    def add(self, layer: Layer) -> None:
        self._check_input(layer)
        if self._pending is not None:
            factor, origin = self._pending
            if layer.kind in SYNAPTIC:
                layer.tensors["weight"] = layer.tensors["weight"] * factor
                self._pending = None
            elif layer.kind not in SCALE_PASSTHROUGH:
                raise ConversionError(f"{origin}: its output factor {factor:g} cannot be folded into "
                                      f"{layer.origin}; stoprt needs a Linear or Conv2d after it")
        self.layers.append(layer)
        self._track(layer)

    def finish(self) -> list[Layer]:
        if self._pending is not None:
            raise ConversionError(f"{self._pending[1]}: its output factor {self._pending[0]:g} reaches the "
                                  "network output and cannot be folded into a following layer")
        if not self.layers:
            raise ConversionError("the network has no layers")
        return self.layers

    def scale_next_input(self, factor: float, origin: str) -> None:
        if abs(factor - 1.0) <= SNAP:
            return
        if factor <= 0:
            raise ConversionError(f"{origin}: output factor {factor:g} must be positive to be folded")
        previous = self._pending[0] if self._pending else 1.0
        self._pending = (previous * factor, origin)

    def scale_input(self, scale: Tensor, offset: Tensor | None, origin: str) -> None:
        """Fold ``I -> scale * I + offset`` (per neuron or scalar) into the preceding layers."""
        scale = as_tensor(scale, origin, "input scale")
        offset = None if offset is None else as_tensor(offset, origin, "input offset")
        if bool(((scale - 1).abs() <= SNAP).all()):
            scale = torch.ones(())
        if offset is not None and bool((offset.abs() <= SNAP).all()):
            offset = None
        if bool((scale == 1).all()) and offset is None:
            return
        for layer in reversed(self.layers):
            if layer.kind in SYNAPTIC or layer.kind == "BatchNorm2d":
                _fold_affine(layer, scale, offset, origin)
                return
            scalar = scale.numel() == 1 or bool((scale == scale.flatten()[0]).all())
            if layer.kind not in SCALE_PASSTHROUGH or not scalar or offset is not None:
                break
            if layer.kind == "MaxPool2d" and float(scale.flatten()[0]) <= 0:
                break
            scale = scale.flatten()[0]
        raise ConversionError(f"{origin}: its input is scaled by {_summary(scale)}"
                              f"{'' if offset is None else f' and shifted by {_summary(offset)}'}; stoprt folds "
                              "this into the Linear, Conv2d or BatchNorm2d right before the neuron layer, and "
                              "there is none")

    def _check_input(self, layer: Layer) -> None:
        needs = {"Linear": ("in_features", False), "Conv2d": ("in_channels", True),
                 "BatchNorm2d": ("num_features", True)}.get(layer.kind)
        if needs is None or self.channels is None or self.spatial != needs[1]:
            return
        want = layer.kwargs[needs[0]]
        if want != self.channels:
            unit = "channels" if needs[1] else "input features"
            raise ConversionError(f"{layer.origin} expects {want} {unit}, but {self.where} gives {self.channels}")

    def _track(self, layer: Layer) -> None:
        kw = layer.kwargs
        if layer.kind == "Linear":
            self.channels, self.spatial, self.where = kw["out_features"], False, layer.origin
        elif layer.kind == "Conv2d":
            self.channels, self.spatial, self.where = kw["out_channels"], True, layer.origin
        elif layer.kind == "Flatten":
            self.channels, self.spatial = None, False
        elif layer.kind == "LIF" and kw["threshold"] == "channel" and self.channels is not None:
            if kw["shape"][0] != self.channels:
                raise ConversionError(f"{layer.origin}: {kw['shape'][0]} per-channel thresholds, but "
                                      f"{self.where} gives {self.channels} channels")


def _summary(t: Tensor) -> str:
    return f"{float(t):g}" if t.numel() == 1 else f"a tensor of shape {tuple(t.shape)}"


def _fold_affine(layer: Layer, scale: Tensor, offset: Tensor | None, origin: str) -> None:
    """``y -> scale * y + offset`` folded into a Linear, Conv2d or BatchNorm2d (weight rows, bias)."""
    out = layer.kwargs.get("out_features", layer.kwargs.get("out_channels", layer.kwargs.get("num_features")))
    spatial = layer.kind != "Linear"
    k = _per_output(scale, out, spatial, layer, origin, "scale")
    c = None if offset is None else _per_output(offset, out, spatial, layer, origin, "offset")
    w = layer.tensors["weight"]
    layer.tensors["weight"] = w * k.reshape((-1,) + (1,) * (w.dim() - 1))
    bias = layer.tensors.get("bias")
    if bias is not None or c is not None:
        if bias is None:
            bias = torch.zeros(out, dtype=torch.float64)
            layer.kwargs["bias"] = True
        layer.tensors["bias"] = bias * k + (0 if c is None else c)


def _per_output(value: Tensor, out: int, spatial: bool, layer: Layer, origin: str, what: str) -> Tensor:
    """A per-neuron (or scalar) factor as one value per output channel/feature of ``layer``."""
    if value.numel() == 1:
        return value.reshape(()).expand(out)
    if spatial and value.dim() == 3 and value.shape[0] == out:
        if bool((value == value[:, :1, :1]).all()):
            return value[:, 0, 0]
        raise ConversionError(f"{origin}: its input {what} varies within a channel; it cannot be folded into "
                              f"{layer.origin}, which has one weight set per channel")
    if value.shape == (out,):
        return value
    raise ConversionError(f"{origin}: input {what} of shape {tuple(value.shape)} does not fit the {out} "
                          f"outputs of {layer.origin}")


def build(layers: Iterable[Layer], input_shape: Iterable[int] | None = None,
          dtype: torch.dtype | None = None) -> L.Sequential:
    """The stoprt ``Sequential`` of ``layers`` with their values, in eval mode and ``dtype``.

    With ``input_shape`` (one step without batch) every layer is run once on zeros first, so a shape that
    does not fit names the layer.
    """
    layers = list(layers)
    modules = []
    for layer in layers:
        try:
            modules.append(layer_class(layer.kind)(**_constructor_args(layer.kwargs)))
        except (TypeError, ValueError) as err:
            raise ConversionError(f"{layer.origin}: cannot make a stoprt {layer.kind} from {layer.kwargs}: "
                                  f"{err}") from err
    if input_shape is not None:
        _check_shapes(modules, layers, tuple(int(n) for n in input_shape))
    net = L.Sequential(*modules, input_shape=input_shape)
    net.to(dtype or torch.get_default_dtype())
    with torch.no_grad():
        for module, layer in zip(modules, layers):
            for name, value in layer.tensors.items():
                _assign(module, name, value, layer.origin)
    return net.eval()


def _constructor_args(kwargs: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _check_shapes(modules: list[nn.Module], layers: list[Layer], shape: tuple[int, ...]) -> None:
    x = torch.zeros(1, *shape)
    with torch.no_grad():
        for module, layer in zip(modules, layers):
            try:
                x = module.eval()(x)
            except RuntimeError as err:
                raise ConversionError(f"{layer.origin} does not fit its input of shape "
                                      f"{tuple(x.shape[1:])}: {str(err).splitlines()[0]}") from err
    L.reset_state(nn.Sequential(*modules))


def _assign(module: nn.Module, name: str, value: Tensor, origin: str) -> None:
    target = getattr(module, name, None)
    if not isinstance(target, Tensor):
        raise ConversionError(f"{origin}: the stoprt {type(module).__name__} has no {name!r} to load")
    if tuple(target.shape) != tuple(value.shape):
        raise ConversionError(f"{origin}: {name} has shape {tuple(value.shape)}, but the layer needs "
                              f"{tuple(target.shape)}")
    target.copy_(value.to(target.dtype))


def describe(layers: Iterable[Layer], input_shape: Iterable[int] | None = None) -> dict:
    """The architecture of the built network as plain data (``stoprt.export.architecture``'s format)."""
    shape = None if input_shape is None else [int(n) for n in input_shape]
    return {"format": "stoprt-architecture", "version": 1,
            "net": {"type": "Sequential", "input_shape": shape,
                    "layers": [{"type": layer.kind, **layer.kwargs} for layer in layers]}}


def source_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """The floating dtype of the source's weights (float64 stays float64), else torch's default."""
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()
