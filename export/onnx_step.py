"""Export ONE time step of a stoprt network as a pure ONNX function ``(x, *state) -> (y, *new_state)``.

The state is explicit: each neuron layer's membrane ``u`` and last spikes ``s`` (a LeakyReadout has
only ``u``) are graph inputs named ``state.<layer path>.<u|s>`` and come back as outputs named
``new_state.<layer path>.<u|s>``; the host feeds them back at the next step (no Loop/Scan, no
in-place buffers). The initial state is all zeros. The dynamics are not rewritten here: a wrapper
(:class:`StepFunction`) loads the state into the stoprt layers, runs their plain forward (eval mode,
no STOP), reads the new state back and clears it, so the graph is what
:mod:`stoprt.runtime.functional` computes. The Heaviside spike exports as ``Greater`` + ``Cast``.

Two flavours:

* parameters as initializers (``params_as_inputs=False``): inference deploy;
* parameters as graph inputs named ``param.<name>`` (``params_as_inputs=True``): weights,
  thresholds and leaks learned on the device are fed at every call, no rebuild. Buffers (BatchNorm
  running statistics) stay baked in: STOP keeps BatchNorm frozen.

The batch dimension is dynamic. What a runner needs (names, state shapes without batch, the
output) is stored in the model's ``metadata_props`` under ``stoprt.*`` keys; a graph without them
is "not a stoprt step graph".
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..runtime import layers as L
from ..runtime.atomic import atomic_path
from .signatures import (DEFAULT_OPSET, OPSETS, STEP_FORMAT, STEP_VERSION, GraphMetadata,  # noqa: F401 (re-exported)
                         StepGraphError, StepSignature, new_name, read_graph_signature)

_TRACE_BATCH = 2  # torch.export specialises a size-1 dimension: trace with 2, keep the batch dynamic


def write_graph(proto, sig: GraphMetadata, path: str | os.PathLike) -> None:
    """Replace ``proto``'s metadata by ``sig``'s and write it atomically."""
    del proto.metadata_props[:]
    for key, value in sig.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    _save_atomic(proto, Path(path))


class StepFunction(nn.Module):
    """One step of ``net`` as a pure function ``(x, *state[, *params]) -> (y, *new_state)``.

    Works on a frozen float32 copy of ``net`` (eval mode, plain dynamics, no gradients), so the caller's
    network and its state are untouched. ``x``: ``[B, *input_shape]``; state tensors
    ``[B, *shape]`` in the order of :attr:`state_names`; params in the order of :attr:`param_names`.
    """

    def __init__(self, net: nn.Module, params_as_inputs: bool = False) -> None:
        super().__init__()
        net = copy.deepcopy(net).float()  # step graphs are float32 (an import may carry float64)
        L.set_stop_mode(net, False)
        L.reset_state(net)
        net.eval().requires_grad_(False)
        self.net = net
        self.params_as_inputs = params_as_inputs
        self.neurons: list[L.Neuron] = []
        self.state_names: list[str] = []
        for path, m in net.named_modules():
            if isinstance(m, L.Neuron):  # a layer with state, read and written by name
                self.neurons.append(m)
                self.state_names += [f"state.{path}.{name}" for name in m.state_names]
        if not self.neurons:
            raise StepGraphError("the network has no neuron layer: nothing carries state between steps")
        # named_parameters drops duplicates: a shared leak is one input (functional_call ties it).
        self.param_names = [name for name, _ in net.named_parameters()] if params_as_inputs else []

    def forward(self, x: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        n = len(self.state_names)
        if len(flat) != n + len(self.param_names):
            raise ValueError(f"expected {n} state and {len(self.param_names)} parameter tensors, got {len(flat)}")
        state = iter(flat[:n])  # each [B, *shape], in the order of state_names
        for m in self.neurons:
            m.set_state({name: next(state) for name in m.state_names})
        try:
            if self.params_as_inputs:
                params = dict(zip(self.param_names, flat[n:]))
                y = torch.func.functional_call(self.net, params, (x,))
            else:
                y = self.net(x)
            new_state = self._state()
        finally:
            L.reset_state(self.net)  # no tensor of this call survives in the modules
        return (y, *new_state)

    def _state(self) -> list[Tensor]:
        """The neurons' state tensors ``[B, *shape]``, in the order of :attr:`state_names`."""
        return [t for m in self.neurons for t in m.get_state().values()]

    @property
    def device(self) -> torch.device:
        first = next(self.net.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def parameters_list(self) -> list[Tensor]:
        """The current parameter values, in the order of :attr:`param_names`."""
        named = dict(self.net.named_parameters())
        return [named[n] for n in self.param_names]

    @torch.no_grad()
    def shapes(self, input_shape: tuple[int, ...]) -> tuple[list[int], list[list[int]]]:
        """Output shape and state shapes (without batch), by a dry run on zeros."""
        y = self.net(torch.zeros(1, *input_shape, device=self.device))  # [1, *output_shape]
        shapes = [list(t.shape[1:]) for t in self._state()]  # [1, *shape] -> shape
        L.reset_state(self.net)
        return list(y.shape[1:]), shapes

    def initial_state(self, batch: int, input_shape: tuple[int, ...]) -> list[Tensor]:
        """All-zero state for ``batch`` samples."""
        _, shapes = self.shapes(input_shape)
        return [torch.zeros(batch, *s, device=self.device) for s in shapes]


def _input_shape(net: nn.Module, input_shape) -> tuple[int, ...]:
    shape = input_shape if input_shape is not None else getattr(net, "input_shape", None)
    if shape is None:
        raise StepGraphError("the network has no input_shape: pass input_shape=(C, H, W) (one step, no batch)")
    return tuple(int(s) for s in shape)


def export_step(net: nn.Module, path: str | os.PathLike, *, input_shape=None, opset: int = DEFAULT_OPSET,
                params_as_inputs: bool = False, input_spec: dict | None = None) -> StepSignature:
    """Export one step of ``net`` to the ONNX file ``path`` (written atomically); returns its signature.

    Args:
        net: a network of stoprt layers (float32). Its state and mode are left as they are.
        input_shape: one step's input without batch; default ``net.input_shape``.
        opset: ONNX opset, one of 18, 19, 20.
        params_as_inputs: parameters as graph inputs ``param.<name>`` instead of initializers.
        input_spec: how the input is made from events (stored in the metadata for deployment).
    """
    if opset not in OPSETS:
        raise StepGraphError(f"opset {opset} is not supported; choose one of {OPSETS}")
    shape = _input_shape(net, input_shape)
    # Traced with the parameters as inputs in both flavours: the exporter's optimizer then cannot fold
    # BatchNorm into a convolution under the convolution's name, nor merge equal-valued thresholds
    # into one initializer. Either would make a parameter's name lie about its value (refit, updates).
    fn = StepFunction(net, params_as_inputs=True).cpu()
    out_shape, state_shapes = fn.shapes(shape)
    params = fn.parameters_list()
    x = torch.zeros(_TRACE_BATCH, *shape)  # [B, *input_shape]
    state = [torch.zeros(_TRACE_BATCH, *s) for s in state_shapes]  # each [B, *state_shape]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = {"x": {0: batch}, "flat": tuple([{0: batch} for _ in state] + [None for _ in params])}
    pnames = [f"param.{n}" for n in fn.param_names]
    sig = StepSignature(input_name="x", input_shape=list(shape), output_name="y", output_shape=out_shape,
                        state=[[n, s] for n, s in zip(fn.state_names, state_shapes)],
                        params=[[n, list(p.shape)] for n, p in zip(pnames, params)] if params_as_inputs else [],
                        weights=_weight_names(fn), buffers=[k for k, _ in fn.net.named_buffers()],
                        params_as_inputs=params_as_inputs, opset=opset, input_spec=input_spec)
    with torch.no_grad(), _quiet_exporter():
        try:
            program = torch.onnx.export(fn, (x, *state, *params), None, dynamo=True, opset_version=opset,
                                        input_names=["x", *fn.state_names, *pnames],
                                        output_names=["y", *sig.state_outputs], dynamic_shapes=dynamic,
                                        external_data=False, verbose=False)
        except Exception as err:  # the exporter raises many types; keep its own summary
            raise StepGraphError(f"ONNX export failed: {_summary(err)}") from err
    proto = program.model_proto
    traced = {f"net.{k}": k for k in sig.buffers}  # the exporter names buffers by their module path
    sig.constants = {traced[i.name]: i.name for i in proto.graph.initializer if i.name in traced}
    if not params_as_inputs:
        _bake(proto, {n: p.detach().numpy() for n, p in zip(pnames, params)})
    check_step_graph(proto, n_lif=sum(isinstance(m, L.LIF) for m in net.modules()))  # spiking neurons
    write_graph(proto, sig, path)
    return sig


def _weight_names(fn: StepFunction) -> dict[str, str]:
    """Every parameter key (tied ones included) -> the graph name of its one input."""
    first = {id(p): f"param.{n}" for n, p in fn.net.named_parameters()}
    return {n: first[id(p)] for n, p in fn.net.named_parameters(remove_duplicate=False)}


def _bake(proto, values: dict) -> None:
    """Turn the graph inputs named in ``values`` into initializers holding those values."""
    from onnx import numpy_helper
    kept = [i for i in proto.graph.input if i.name not in values]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in values.items())


def _summary(err: Exception) -> str:
    """The exporter's own exception summary (its message opens with generic advice)."""
    text = str(err)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].strip()
    return f"{type(err).__name__}: {text.split(chr(10) + chr(10))[0][:500]}"


def check_step_graph(proto, n_lif: int) -> None:
    """``onnx.checker`` plus the spike: at least one ``Greater`` per LIF layer, no loops over time."""
    import onnx
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise StepGraphError(f"the exported step graph is not valid ONNX: {str(err)[:500]}") from err
    ops = [node.op_type for node in proto.graph.node]
    if ops.count("Greater") < n_lif or not {"Cast", "Where"} & set(ops):
        raise StepGraphError(f"the spike did not export as Greater + Cast/Where ({n_lif} LIF layers, ops: "
                             f"{sorted(set(ops))})")
    if {"Loop", "Scan", "If"} & set(ops):
        raise StepGraphError("the step graph contains control flow (Loop/Scan/If); expected one plain step")


def read_signature(path: str | os.PathLike) -> StepSignature:
    """The signature stored in a step graph file (without loading its weights)."""
    return read_graph_signature(path, StepSignature)


def _save_atomic(proto, path: Path) -> None:
    import onnx
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress logging and warnings (failures still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
