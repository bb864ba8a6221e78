"""Run an exported step graph with ONNX Runtime, keeping the state between calls.

The state lives in two sets of buffers that swap roles every step (ping-pong): the graph reads the
state from one set and writes the new state into the other, so nothing is copied or allocated per
step. With IO binding (the default) each set is bound once, as OrtValues over the buffers, and a
step is: copy ``x`` in, ``run_with_iobinding``, flip. Without IO binding (``io_binding=False``, or an
onnxruntime without it) a plain ``run`` is used and its outputs become the next state.

torch is not needed here (a device may run ONNX Runtime alone); torch tensors are accepted when
torch is installed and come back as torch tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .signatures import StepGraphError, StepSignature


def _import_ort():
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - onnxruntime is a dependency
        raise ImportError("ONNX Runtime is not installed: pip install onnxruntime (Jetson: NVIDIA's "
                          "onnxruntime-gpu wheel for your JetPack)") from err
    return onnxruntime


class _Buffer:
    """One tensor the graph reads or writes, as an OrtValue on the session's device."""

    def __init__(self, ort, shape: tuple[int, ...], device: str) -> None:
        self.device, self.shape = device, shape
        if device == "cpu":
            self.array = np.zeros(shape, np.float32)   # the OrtValue wraps this memory, no copy
            self.value = ort.OrtValue.ortvalue_from_numpy(self.array)
        else:
            self.value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, device, 0)
            self.zero()

    def write(self, data: np.ndarray) -> None:
        if self.device == "cpu":
            np.copyto(self.array, data)
        else:
            self.value.update_inplace(np.ascontiguousarray(data, np.float32))

    def zero(self) -> None:
        if self.device == "cpu":
            self.array.fill(0.0)
        else:
            self.value.update_inplace(np.zeros(self.shape, np.float32))

    def read(self) -> np.ndarray:
        return self.array.copy() if self.device == "cpu" else self.value.numpy()


class OrtStepRunner:
    """A step graph on ONNX Runtime with the :class:`~stoprt.export.runners.StepRunner` interface.

    Args:
        path: an ONNX file written by :func:`~stoprt.export.onnx_step.export_step`.
        providers: ONNX Runtime execution providers; default CUDA when available, else CPU.
        io_binding: bind the ping-pong buffers once (default) instead of a plain ``run`` per step.
        threads: intra-op threads (default: ONNX Runtime's choice).
        spinning: let idle intra-op threads spin between runs. Off by default: a streaming session
            interleaves the graph with Python and torch work (a hybrid head), which spinning threads
            would starve; turn it on when ONNX Runtime has the cores to itself.
        parameters: initial parameters (a state_dict) for a graph with parameters as inputs.

    ``step(x)``: ``x`` ``[B, *input_shape]`` float (numpy or torch); the batch is fixed from the first
    step after :meth:`reset` to the next reset.
    """

    def __init__(self, path: str | os.PathLike, providers: list | None = None, io_binding: bool = True,
                 threads: int | None = None, parameters: Mapping[str, Any] | None = None,
                 spinning: bool = False) -> None:
        ort = _import_ort()
        self._ort = ort
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no step graph at {path}")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            _foreign_graph_first(path)
            raise StepGraphError(f"{path} cannot be loaded as an ONNX model: {str(err).splitlines()[0][:300]}") from err
        self.signature = sig = StepSignature.from_metadata(self.session.get_modelmeta().custom_metadata_map,
                                                           str(path))
        self._state_names = [name for name, _ in sig.state]
        self._param_names = [name for name, _ in sig.params]
        expected_in = [sig.input_name, *self._state_names, *self._param_names]
        expected_out = [sig.output_name, *sig.state_outputs]
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != expected_in or got_out != expected_out:
            raise StepGraphError(f"{path}: the graph's inputs/outputs do not match its stoprt metadata "
                                 f"(inputs {got_in[:4]}..., expected {expected_in[:4]}...)")
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.io_binding = io_binding and hasattr(self.session, "io_binding")
        self._params = {name: _Buffer(ort, tuple(shape), self.device) for name, shape in sig.params}
        self._params_set: set[str] = set()
        self._batch: int | None = None  # batch of the current allocation
        self._started = False
        if parameters is not None:
            self.set_parameters(parameters)

    # ---- the StepRunner interface -------------------------------------------------------------
    def step(self, x: Any) -> Any:
        as_torch = type(x).__module__.startswith("torch")
        data = np.ascontiguousarray(x.detach().cpu().numpy() if as_torch else x, dtype=np.float32)
        self._check_input(data)
        if not self._started:
            if data.shape[0] != self._batch:
                self._allocate(data.shape[0])
            self._started = True
        if self.io_binding:
            self._x.write(data)
            self.session.run_with_iobinding(self._bindings[self._k])
            self._k ^= 1
            y = self._y.read()
        else:
            feeds = {self.signature.input_name: data, **dict(zip(self._state_names, self._plain_state)),
                     **{name: buf.read() for name, buf in self._params.items()}}
            y, *self._plain_state = self.session.run(None, feeds)
        if as_torch:
            import torch
            return torch.from_numpy(y)
        return y

    def reset(self) -> None:
        """Forget the sample: the state the next step reads is zero."""
        if self._batch is not None:
            for buf in self._state[self._k]:
                buf.zero()
            self._plain_state = [np.zeros_like(s) for s in self._plain_state]
        self._started = False

    # ---- parameters and state -----------------------------------------------------------------
    def set_parameters(self, state_dict: Mapping[str, Any]) -> None:
        """Feed new parameter values (a state_dict, or part of one) to a graph with parameters as inputs.

        BatchNorm running statistics are baked into the graph and ignored here (STOP keeps them
        frozen). Unknown keys and shape mismatches raise ``ValueError`` naming the key.
        """
        sig = self.signature
        if not sig.params_as_inputs:
            raise StepGraphError("this step graph has its parameters baked in; export it with "
                                 "params_as_inputs=True to update parameters without a rebuild")
        for key, value in state_dict.items():
            if key in sig.buffers:
                continue
            if key not in sig.weights:
                raise ValueError(f"parameter {key!r} is not an input of this step graph")
            name = sig.weights[key]
            data = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
            expected = dict(sig.params)[name]
            if list(data.shape) != list(expected):
                raise ValueError(f"parameter {key!r} has shape {tuple(data.shape)}; the graph expects "
                                 f"{tuple(expected)}")
            self._params[name].write(data)
            self._params_set.add(name)

    def state(self) -> dict[str, np.ndarray]:
        """The state after the last step (zeros after a reset), as numpy arrays."""
        if self._batch is None:
            return {}
        current = [b.read() for b in self._state[self._k]] if self.io_binding else list(self._plain_state)
        return dict(zip(self._state_names, current))

    # ---- internals ----------------------------------------------------------------------------
    def _check_input(self, data: np.ndarray) -> None:
        expected = tuple(self.signature.input_shape)
        if data.ndim != len(expected) + 1 or tuple(data.shape[1:]) != expected:
            raise ValueError(f"input of shape {tuple(data.shape)} does not fit the step graph: expected "
                             f"[B, {', '.join(map(str, expected))}]")
        if self._started and data.shape[0] != self._batch:
            raise ValueError(f"batch changed within a sample ({self._batch} then {data.shape[0]}); "
                             "call reset() between samples")
        missing = [n for n in self._param_names if n not in self._params_set]
        if missing:
            raise StepGraphError(f"this step graph takes its parameters as inputs and {missing[0]} (and "
                                 f"{len(missing) - 1} more) is not set: call set_parameters(state_dict) first")

    def _allocate(self, batch: int) -> None:
        sig, ort = self.signature, self._ort
        self._batch, self._k = batch, 0
        self._state = [[_Buffer(ort, (batch, *shape), self.device) for _, shape in sig.state] for _ in range(2)]
        self._plain_state = [np.zeros((batch, *shape), np.float32) for _, shape in sig.state]
        if not self.io_binding:
            return
        self._x = _Buffer(ort, (batch, *sig.input_shape), self.device)
        self._y = _Buffer(ort, (batch, *sig.output_shape), self.device)
        self._bindings = []
        for k in (0, 1):  # binding k reads state set k and writes set 1 - k
            io = self.session.io_binding()
            io.bind_ortvalue_input(sig.input_name, self._x.value)
            for name, buf in zip(self._state_names, self._state[k]):
                io.bind_ortvalue_input(name, buf.value)
            for name, buf in self._params.items():
                io.bind_ortvalue_input(name, buf.value)
            io.bind_ortvalue_output(sig.output_name, self._y.value)
            for name, buf in zip(sig.state_outputs, self._state[1 - k]):
                io.bind_ortvalue_output(name, buf.value)
            self._bindings.append(io)


def _foreign_graph_first(path: Path) -> None:
    """Raise "not a stoprt step graph" for a readable ONNX file without our metadata: that is the
    cause to name when onnxruntime also cannot load it (an opset newer than this onnxruntime, say)."""
    from .onnx_step import read_signature
    try:
        read_signature(path)
    except StepGraphError as err:
        if "not a stoprt step graph" in str(err):
            raise
