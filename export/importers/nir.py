"""Read and write NIR graphs (Neuromorphic Intermediate Representation, the ``nir`` package).

NIR describes neurons in continuous time; stoprt steps in discrete time. Both directions use the
forward-Euler step of length ``dt`` (default ``1e-4`` s, the value snnTorch and SpikingJelly use, so
their NIR files round-trip with ours)::

    LIF   tau dv/dt = (v_leak - v) + R I      ->  v[t] = a v[t-1] + k I[t] + (dt/tau) v_leak
          a = 1 - dt/tau,  k = dt R / tau;  spike when v > v_threshold, then v = v_reset
    LI    the same without spikes             ->  stoprt LeakyReadout
    IF    dv/dt = R I                         ->  a = 1 (refused: stoprt's leak lies in (0, 1))
    CubaLIF  tau_syn dI/dt = -I + w_in S, then the LIF on I (the current updated first, as snnTorch's
             Synaptic) -> LeakyReadout (a_syn = 1 - dt/tau_syn) + LIF; input factor (dt/tau_syn) w_in k

Importing: ``a`` must be the same for all neurons of a layer (one leak per layer); the input factor ``k``
and the constant drive ``(dt/tau)(v_leak - v_reset)`` are folded into the preceding Linear / Conv2d
(weight rows and bias); the membrane is taken relative to ``v_reset`` (it starts there, NIR leaves the
initial value open), so the threshold becomes ``v_threshold - v_reset`` and the reset is
``LIF(reset="hard")``. ``SumPool2d`` becomes ``AvgPool2d`` with its factor ``kh*kw`` folded into the
next layer's weights. Flatten's ``start_dim``/``end_dim`` count dimensions without the batch.

Exporting: ``LIF`` -> ``nir.LIF`` with ``tau = dt / (1 - a)``, ``r = tau / dt`` (so ``k = 1``),
``v_leak = v_reset = 0`` and the threshold per neuron; ``LeakyReadout`` -> ``nir.LI``; BatchNorm2d
right after a Conv2d is folded into it (``runtime.batchnorm.fold_batchnorm``); dropout and identity are
left out. NIR resets to ``v_reset`` only (hard reset): a ``reset="soft"`` or ``"soft_nodecay"`` LIF is
refused unless ``allow_reset_change=True``, which writes it as a hard reset. That changes the dynamics:
after each spike stoprt keeps the excess ``U - th`` (decayed) and NIR starts again from 0, so a neuron
driven above its threshold fires less often in NIR. Max pooling, residual blocks and layers other than
the ones named here are refused with an error naming the layer.

Graphs: sequential chains ``input -> n1 -> ... -> output`` only; a node with several inputs or outputs
(residual or recurrent connections) or a nested graph is refused, naming it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ...runtime import layers as L
from ...runtime.atomic import atomic_path
from ._common import (Chain, ConversionError, Layer, as_tensor, build, lif_layer, numeric_padding, readout_layer,
                      uniform)

DT = 1e-4
_ONE_LEAK = "stoprt's neurons have one leak per layer (STOP's input trace needs it)"


def _nir():
    try:
        import nir
    except ImportError as err:
        raise ConversionError("NIR support needs the 'nir' package (pip install nir; it needs numpy and "
                              "h5py)") from err
    return nir


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------

def import_nir(source: str | os.PathLike | Any, dt: float = DT, input_shape: Iterable[int] | None = None,
               dtype: torch.dtype | None = None) -> L.Sequential:
    """A stoprt network (eval mode) from a NIR file or ``nir.NIRGraph``; see the module docstring.

    ``input_shape`` defaults to the graph's input node; ``dtype`` to torch's default.
    """
    layers, graph_shape = nir_layers(source, dt)
    return build(layers, input_shape if input_shape is not None else graph_shape, dtype)


def nir_layers(source: Any, dt: float = DT) -> tuple[list[Layer], tuple[int, ...] | None]:
    """The stoprt layer records of a NIR graph (or file) and its input shape."""
    nir = _nir()
    if not dt > 0:
        raise ConversionError(f"dt must be positive, got {dt}")
    graph = read_nir(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(graph, nir.NIRGraph):
        raise ConversionError(f"expected a NIR graph or file, got {type(graph).__name__}")
    order, input_shape = _sequential_order(graph)
    chain = Chain()
    for name, node in order:
        _add_node(nir, chain, node, f"NIR node {name!r} ({type(node).__name__})", dt)
    return chain.finish(), input_shape


def read_nir(path: str | os.PathLike) -> Any:
    """``nir.read`` with a clear error for a missing or unreadable file."""
    nir = _nir()
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"no NIR file at {path}")
    try:
        return nir.read(path, type_check=False)
    except Exception as err:  # h5py and nir raise many types for foreign or damaged files
        raise ConversionError(f"{path} is not a readable NIR file: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}") from err


def _sequential_order(graph: Any) -> tuple[list[tuple[str, Any]], tuple[int, ...] | None]:
    """The nodes between the single input and output, in order; an error for any other topology."""
    nir = _nir()
    nodes, edges = graph.nodes, [tuple(e) for e in graph.edges]
    inputs = [n for n, v in nodes.items() if isinstance(v, nir.Input)]
    outputs = [n for n, v in nodes.items() if isinstance(v, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConversionError(f"the NIR graph has {len(inputs)} input and {len(outputs)} output nodes; stoprt "
                              "imports graphs with one of each")
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    pred: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        if a not in nodes or b not in nodes:
            raise ConversionError(f"the NIR graph has an edge {a!r} -> {b!r} to a node it does not have")
        succ[a].append(b)
        pred[b].append(a)
    for name, node in nodes.items():
        if isinstance(node, nir.NIRGraph):
            raise ConversionError(f"NIR node {name!r} is a nested graph (e.g. a recurrent layer); stoprt imports "
                                  "sequential chains of layers")
        if len(succ[name]) > 1 or len(pred[name]) > 1:
            many = f"feeds {succ[name]}" if len(succ[name]) > 1 else f"receives from {pred[name]}"
            raise ConversionError(f"NIR node {name!r} ({type(node).__name__}) {many}: a branch, residual or "
                                  "recurrent connection; stoprt imports sequential chains only")
    order, current = [], inputs[0]
    while current != outputs[0]:
        if not succ[current]:
            raise ConversionError(f"NIR node {current!r} leads nowhere: no path from the input to the output")
        current = succ[current][0]
        if current in (name for name, _ in order):
            raise ConversionError(f"the NIR graph has a cycle through {current!r}")
        order.append((current, nodes[current]))
    missing = sorted(set(nodes) - {inputs[0]} - {name for name, _ in order})
    if missing:
        raise ConversionError(f"NIR nodes {missing} are not on the path from the input to the output")
    shape = nodes[inputs[0]].input_type.get("input")
    shape = None if shape is None else tuple(int(n) for n in np.asarray(shape).reshape(-1))
    return order[:-1], shape


def _add_node(nir: Any, chain: Chain, node: Any, origin: str, dt: float) -> None:
    if isinstance(node, (nir.Affine, nir.Linear)):
        w = _array(node.weight, origin, "weight")
        if w.dim() != 2:
            raise ConversionError(f"{origin}: weight has shape {tuple(w.shape)}; stoprt's Linear takes 2-D weights")
        tensors = {"weight": w}
        if isinstance(node, nir.Affine):
            tensors["bias"] = _array(node.bias, origin, "bias").reshape(-1)
            if tensors["bias"].shape[0] != w.shape[0]:
                raise ConversionError(f"{origin}: bias has {tensors['bias'].shape[0]} values for {w.shape[0]} outputs")
        chain.add(Layer("Linear", {"in_features": w.shape[1], "out_features": w.shape[0],
                                   "bias": "bias" in tensors}, tensors, origin))
    elif isinstance(node, nir.Conv2d):
        chain.add(_conv(node, origin))
    elif isinstance(node, nir.Flatten):
        start, end = int(node.start_dim), int(node.end_dim)
        chain.add(Layer("Flatten", {"start_dim": start + 1 if start >= 0 else start,
                                    "end_dim": end + 1 if end >= 0 else end}, {}, origin))
    elif isinstance(node, (nir.AvgPool2d, nir.SumPool2d)):
        kernel = _pair(node.kernel_size)
        chain.add(Layer("AvgPool2d", {"kernel_size": kernel, "stride": _pair(node.stride),
                                      "padding": _pair(node.padding)}, {}, origin))
        if isinstance(node, nir.SumPool2d):
            chain.scale_next_input(float(kernel[0] * kernel[1]), origin)
    elif isinstance(node, (nir.LIF, nir.LI)):
        tau = _array(node.tau, origin, "tau")
        leak = uniform(1.0 - dt / tau, origin, "1 - dt/tau", _ONE_LEAK)
        v_reset = _array(getattr(node, "v_reset", 0.0), origin, "v_reset")
        scale = dt * _array(node.r, origin, "r") / tau
        drive = dt / tau * (_array(node.v_leak, origin, "v_leak") - v_reset)
        if isinstance(node, nir.LI):
            layer = readout_layer(leak, origin, leak_source="1 - dt/tau")
        else:
            threshold = _array(node.v_threshold, origin, "v_threshold") - v_reset
            layer = lif_layer(threshold, leak, "hard", origin, chain.spatial, coarsen=True, leak_source="1 - dt/tau")
        chain.scale_input(scale, drive, origin)
        chain.add(layer)
    elif isinstance(node, nir.CubaLIF):
        tau_syn, tau_mem = _array(node.tau_syn, origin, "tau_syn"), _array(node.tau_mem, origin, "tau_mem")
        v_reset = _array(node.v_reset, origin, "v_reset")
        if bool((_array(node.v_leak, origin, "v_leak") != v_reset).any()):
            raise ConversionError(f"{origin}: v_leak differs from v_reset; the constant drive would pass through "
                                  "the synaptic current, which stoprt cannot fold exactly")
        syn = readout_layer(uniform(1.0 - dt / tau_syn, origin, "1 - dt/tau_syn", _ONE_LEAK), origin,
                            leak_source="1 - dt/tau_syn")
        lif = lif_layer(_array(node.v_threshold, origin, "v_threshold") - v_reset,
                        uniform(1.0 - dt / tau_mem, origin, "1 - dt/tau_mem", _ONE_LEAK), "hard", origin,
                        chain.spatial, coarsen=True, leak_source="1 - dt/tau_mem")
        w_in = _array(node.w_in, origin, "w_in")
        chain.scale_input(dt / tau_syn * w_in * dt * _array(node.r, origin, "r") / tau_mem, None, origin)
        chain.add(syn)
        chain.add(lif)
    elif isinstance(node, nir.IF):
        lif_layer(_array(node.v_threshold, origin, "v_threshold"), 1.0, "hard", origin, chain.spatial,
                  leak_source="IF")  # raises: stoprt has no leak-free neuron
    else:
        raise ConversionError(f"{origin} is not supported; supported: Affine, Linear, Conv2d, Flatten, AvgPool2d, "
                              "SumPool2d, LIF, CubaLIF, LI")


def _conv(node: Any, origin: str) -> Layer:
    w = _array(node.weight, origin, "weight")
    if w.dim() != 4:
        raise ConversionError(f"{origin}: weight has shape {tuple(w.shape)}; a Conv2d weight is 4-D")
    groups = int(node.groups)
    stride, dilation = _pair(node.stride), _pair(node.dilation)
    padding = numeric_padding(node.padding, tuple(w.shape[2:]), tuple(stride), tuple(dilation), origin)
    bias = _array(node.bias, origin, "bias").reshape(-1)
    if bias.numel() not in (0, 1, w.shape[0]):
        raise ConversionError(f"{origin}: bias has {bias.numel()} values for {w.shape[0]} output channels")
    kwargs = {"in_channels": w.shape[1] * groups, "out_channels": w.shape[0], "kernel_size": list(w.shape[2:]),
              "stride": stride, "padding": list(padding), "dilation": dilation, "groups": groups, "bias": True}
    return Layer("Conv2d", kwargs, {"weight": w, "bias": bias.expand(w.shape[0]).clone()}, origin)


def _array(value: Any, origin: str, what: str) -> Tensor:
    return as_tensor(np.asarray(value, dtype=np.float64), origin, what)


def _pair(value: Any) -> list[int]:
    flat = [int(v) for v in np.asarray(value).reshape(-1)]
    return flat * 2 if len(flat) == 1 else flat


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def export_nir(net: nn.Module, path: str | os.PathLike | None = None, input_shape: Iterable[int] | None = None,
               dt: float = DT, allow_reset_change: bool = False) -> Any:
    """The ``nir.NIRGraph`` of a sequential stoprt network; written atomically to ``path`` if given.

    ``input_shape`` (one step without batch) defaults to ``net.input_shape``. See the module docstring
    for the mapping and for what ``allow_reset_change`` changes.
    """
    from ...runtime.batchnorm import fold_batchnorm
    nir = _nir()
    if not dt > 0:
        raise ConversionError(f"dt must be positive, got {dt}")
    shape = tuple(input_shape) if input_shape is not None else getattr(net, "input_shape", None)
    if shape is None:
        raise ConversionError("exporting to NIR needs the input shape (pass input_shape=(C, H, W) or build the "
                              "Sequential with input_shape)")
    work = fold_batchnorm(copy.deepcopy(net)).eval()
    L.reset_state(work)
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array(shape)})}
    x = torch.zeros(1, *shape, dtype=next(work.parameters(), torch.zeros(())).dtype)
    with torch.no_grad():
        for name, module in _leaves(work, ""):
            out = module(x)
            node = _to_nir(nir, module, f"layer {name} ({type(module).__name__})", tuple(x.shape[1:]),
                           tuple(out.shape[1:]), dt, allow_reset_change)
            if node is not None:
                nodes[name] = node
            x = out
    nodes["output"] = nir.Output(output_type={"output": np.array(x.shape[1:])})
    names = list(nodes)
    graph = nir.NIRGraph(nodes=nodes, edges=list(zip(names[:-1], names[1:])), type_check=False)
    if path is not None:
        _write_atomic(nir, graph, Path(path))
    return graph


def _leaves(module: nn.Module, path: str) -> Iterable[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{path}.{name}" if path else name)
    elif isinstance(module, L.Residual):
        raise ConversionError(f"layer {path} (Residual): NIR export supports sequential chains only")
    else:
        yield path, module


def _to_nir(nir: Any, m: nn.Module, origin: str, in_shape: tuple, out_shape: tuple, dt: float,
            allow_reset_change: bool) -> Any:
    if isinstance(m, (L.Dropout, nn.Identity)):
        return None  # inference: dropout is the identity
    if type(m) is L.Linear:
        w = _np(m.weight)
        return nir.Linear(weight=w) if m.bias is None else nir.Affine(weight=w, bias=_np(m.bias))
    if type(m) is L.Conv2d:
        bias = _np(m.bias) if m.bias is not None else np.zeros(m.out_channels, dtype=_np(m.weight).dtype)
        return nir.Conv2d(input_shape=in_shape[1:], weight=_np(m.weight), stride=m.stride, padding=m.padding,
                          dilation=m.dilation, groups=m.groups, bias=bias)
    if type(m) is nn.Flatten:
        start, end = m.start_dim, m.end_dim
        if start == 0:
            raise ConversionError(f"{origin}: start_dim=0 flattens the batch; NIR shapes have no batch dimension")
        return nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=start - 1 if start > 0 else start,
                           end_dim=end - 1 if end > 0 else end)
    if type(m) in (L.AvgPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        return _avgpool(nir, m, origin, in_shape)
    if type(m) is L.LIF:
        if m.reset != "hard" and not allow_reset_change:
            raise ConversionError(f"{origin}: reset={m.reset!r}, but NIR's LIF resets to v_reset (hard reset); "
                                  "pass allow_reset_change=True (stoprt export: --allow-reset-change) to write it "
                                  "as a hard reset (the dynamics after each spike change), or use reset='hard'")
        tau = _tau(m, origin, dt, out_shape)
        threshold = np.broadcast_to(_np(m.threshold).astype(np.float64), out_shape).copy()
        return nir.LIF(tau=tau, r=tau / dt, v_leak=np.zeros(out_shape), v_threshold=threshold,
                       v_reset=np.zeros(out_shape))
    if type(m) is L.LeakyReadout:
        tau = _tau(m, origin, dt, out_shape)
        return nir.LI(tau=tau, r=tau / dt, v_leak=np.zeros(out_shape))
    if isinstance(m, nn.BatchNorm2d):
        raise ConversionError(f"{origin}: only a BatchNorm2d right after a Conv2d can be folded; NIR has no "
                              "batch normalisation")
    raise ConversionError(f"{origin} has no NIR equivalent stoprt writes; supported: Linear, Conv2d (+ BatchNorm2d), "
                          "AvgPool2d, AdaptiveAvgPool2d (exact divisions), Flatten, Dropout, LIF, LeakyReadout")


def _tau(m: nn.Module, origin: str, dt: float, shape: tuple) -> np.ndarray:
    """NIR's time constant of a stoprt leak, one per neuron: a = 1 - dt/tau."""
    a = float(m.leak.detach().double())
    if not 0.0 <= a < 1.0:
        raise ConversionError(f"{origin}: leak {a} has no NIR time constant")
    return np.full(shape, dt / (1.0 - a))


def _avgpool(nir: Any, m: nn.Module, origin: str, in_shape: tuple) -> Any:
    if isinstance(m, nn.AdaptiveAvgPool2d):
        out = [o if o is not None else i for o, i in zip(_pair(m.output_size), in_shape[1:])]
        if any(i % o for i, o in zip(in_shape[1:], out)):
            raise ConversionError(f"{origin}: input {in_shape[1:]} does not divide into {out}; only exact "
                                  "adaptive pooling maps to NIR's AvgPool2d")
        kernel = [i // o for i, o in zip(in_shape[1:], out)]
        stride, padding = kernel, [0, 0]
    else:
        if m.ceil_mode or m.divisor_override:
            raise ConversionError(f"{origin}: ceil_mode and divisor_override have no NIR equivalent")
        kernel = _pair(m.kernel_size)
        stride, padding = _pair(m.stride or m.kernel_size), _pair(m.padding)
        if any(padding) and not m.count_include_pad:
            raise ConversionError(f"{origin}: padding with count_include_pad=False has no NIR equivalent")
    return nir.AvgPool2d(kernel_size=np.array(kernel), stride=np.array(stride), padding=np.array(padding))


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _write_atomic(nir: Any, graph: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        nir.write(tmp, graph)
