"""TensorRT engines from the ONNX step graph, run with torch CUDA buffers and state ping-pong.

Written for TensorRT 10 (JetPack 6.1+ / 7) and its named-tensor API. Older TensorRT is refused with
one line: 8.5 and 8.6 (JetPack 5.1 / 6.0) parse ONNX up to opset 17 (onnx-tensorrt's operator
matrix on its 8.5-GA branch), and stoprt's step and learning graphs are opset 18-20. TensorRT is
imported only when used: install JetPack's ``python3-libnvinfer`` (apt; a venv then needs
``--system-site-packages``) or ``pip install tensorrt`` on a desktop GPU.

Building (:func:`build_engine`; :func:`serialize_engine` is its builder, which the TensorRT
learner, :mod:`.trt_learner`, uses for the learning graphs too): ``trt.Builder`` -> network from ``trt.OnnxParser`` -> builder config
with a workspace limit (small on a 4 GB board), one optimization profile for the dynamic batch,
FP16 where the TensorRT version has ``BuilderFlag.FP16`` (TensorRT 11 removed it), optionally
``REFIT``; the serialized engine is written atomically with a JSON sidecar (``<engine>.json``)
holding the step graph's signature (state names and shapes), since an engine keeps no metadata.

Running (:class:`TrtStepRunner`): the same ``step`` / ``reset`` interface as the other runners. The
state lives in two sets of torch CUDA tensors that swap roles each step; addresses are set with
``set_tensor_address`` and the step is enqueued with ``execute_async_v3`` on torch's current
stream, so torch work before and after is ordered with it without extra synchronisation.
Weights learned elsewhere reach the engine by :meth:`TrtStepRunner.set_parameters` (graph built
with parameters as inputs: every step) or :meth:`TrtStepRunner.refit` (engine built with
``refit=True``: a periodic sync, too slow for every step).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..runtime.atomic import write_bytes, write_text
from .signatures import StepSignature, read_graph_signature

SIDECAR_FORMAT = "stoprt-tensorrt-engine"
MIN_TENSORRT = 10


class TensorRTError(RuntimeError):
    """TensorRT could not parse, build, load, run or refit."""


def import_tensorrt():
    """The ``tensorrt`` module, or an ImportError that says how to install it."""
    try:
        import tensorrt
    except ImportError as err:
        raise ImportError("TensorRT is not installed: on a Jetson, `sudo apt install python3-libnvinfer` "
                          "(JetPack) and use a venv with --system-site-packages; on a desktop GPU, "
                          "`pip install tensorrt`") from err
    return tensorrt


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def require_tensorrt():
    """The ``tensorrt`` module, refusing one older than :data:`MIN_TENSORRT` (see the module docstring)."""
    trt = import_tensorrt()
    if _major(trt) < MIN_TENSORRT:
        raise TensorRTError(f"TensorRT {trt.__version__} reads ONNX only up to opset 17 and stoprt's graphs are "
                            f"opset 18-20: TensorRT {MIN_TENSORRT} or newer is needed (JetPack 6.1+)")
    return trt


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, max_batch: int = 1,
                 opt_batch: int | None = None, fp16: bool = False, workspace_mib: int = 1024,
                 refit: bool = False) -> Path:
    """Build a TensorRT engine from a stoprt step graph and write it (plus its ``.json`` sidecar).

    Args:
        max_batch, opt_batch: the optimization profile's largest and tuned-for batch (min is 1).
        fp16: let TensorRT pick FP16 kernels. The elementwise layers (membrane update, threshold
            comparison) are asked to stay FP32: spikes sitting at the threshold would flip otherwise.
        workspace_mib: the builder's workspace pool limit; keep it small on 4 GB boards (e.g. 256).
        refit: build a refittable engine (see :meth:`TrtStepRunner.refit`).
    """
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    sig = read_graph_signature(onnx_path, StepSignature)
    serialized = serialize_engine(onnx_path, max_batch=max_batch, opt_batch=opt_batch, fp16=fp16,
                                  workspace_mib=workspace_mib, refit=refit)
    write_bytes(engine_path, serialized)
    sidecar = {"format": SIDECAR_FORMAT, "tensorrt": str(trt.__version__), "signature": asdict(sig),
               "fp16": fp16, "refit": refit, "max_batch": max_batch, "opt_batch": opt_batch or max_batch,
               "workspace_mib": workspace_mib}
    write_text(_sidecar(engine_path), json.dumps(sidecar, indent=2))
    return engine_path


def serialize_engine(onnx_path: str | os.PathLike, *, max_batch: int = 1, opt_batch: int | None = None,
                     fp16: bool = False, workspace_mib: int = 1024, refit: bool = False, tf32: bool = True) -> bytes:
    """The serialized TensorRT engine of any stoprt graph (step, learning step or update; the
    arguments as :func:`build_engine`'s). Inputs whose first axis is dynamic (the batch) get one
    optimization profile from 1 to ``max_batch``; a graph without one (the update) gets none.
    ``tf32=False`` keeps matrix products in full FP32 (TensorRT allows TF32 by default on Ampere and
    newer, Orin included: 10 mantissa bits, too coarse for learning to match float32 STOP)."""
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    if not 1 <= (opt_batch or max_batch) <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}")
    if workspace_mib < 1:
        raise ValueError(f"workspace_mib must be positive, got {workspace_mib}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode from TensorRT 10 on
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 5)))
        raise TensorRTError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise TensorRTError(f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed "
                                "networks only); build in FP32")
        config.set_flag(trt.BuilderFlag.FP16)
        _keep_elementwise_fp32(trt, network, config)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if shape and shape[0] == -1:
            rest = shape[1:]
            profile.set_shape(tensor.name, [1, *rest], [opt_batch or max_batch, *rest], [max_batch, *rest])
            dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT could not build an engine from {onnx_path} (see its log above); "
                            f"a larger workspace (now {workspace_mib} MiB) may help")
    return bytes(serialized)


def load_engine(trt, logger, data: bytes, where: str | os.PathLike, built_by: str | None = None):
    """``(runtime, engine)`` deserialized from ``data`` (the runtime must outlive the engine), or a
    :class:`TensorRTError` saying that the engine belongs to another TensorRT or GPU."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise TensorRTError(f"{where} cannot be loaded: built by TensorRT {built_by or 'another version'} "
                            f"(this is {trt.__version__}) or for another GPU; rebuild it on this device")
    return runtime, engine


def _keep_elementwise_fp32(trt, network, config) -> None:
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.ELEMENTWISE:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):  # not the comparison's bool
                layer.set_output_type(j, trt.float32)


def _sidecar(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


class TrtStepRunner:
    """A TensorRT engine of a step graph with the :class:`~stoprt.export.runners.StepRunner` interface.

    Args:
        engine_path: an engine written by :func:`build_engine` (its ``.json`` sidecar next to it).
        device: the CUDA device.
        parameters: initial parameters (a state_dict) for an engine whose graph takes them as inputs.

    ``step(x)`` takes a torch tensor (any device; returns a CUDA tensor) or a numpy array (returns one).
    """

    def __init__(self, engine_path: str | os.PathLike, device: str = "cuda",
                 parameters: Mapping[str, Any] | None = None) -> None:
        trt = import_tensorrt()
        import torch
        if not torch.cuda.is_available():
            raise TensorRTError("TensorRT needs a CUDA GPU and torch sees none")
        engine_path = Path(engine_path)
        sidecar = _sidecar(engine_path)
        if not engine_path.is_file() or not sidecar.is_file():
            raise FileNotFoundError(f"no engine with its sidecar at {engine_path} (+ {sidecar.name})")
        meta = json.loads(sidecar.read_text())
        if meta.get("format") != SIDECAR_FORMAT:
            raise TensorRTError(f"{sidecar} is not a stoprt engine description")
        self.signature = sig = StepSignature(**meta["signature"])
        self._trt, self._torch = trt, torch
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime, self.engine = load_engine(trt, self.logger, engine_path.read_bytes(), engine_path,
                                                meta.get("tensorrt"))
        self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = {sig.input_name, sig.output_name, *(n for n, _ in sig.state), *sig.state_outputs,
                    *(n for n, _ in sig.params)}
        if names != expected:
            raise TensorRTError(f"{engine_path}: the engine's tensors do not match its sidecar "
                                f"(differ in {sorted(names ^ expected)[:4]})")
        self._params = {n: torch.zeros(s, device=self.device) for n, s in sig.params}
        self._params_set: set[str] = set()
        self._batch: int | None = None
        self._started = False
        if parameters is not None:
            self.set_parameters(parameters)

    def step(self, x: Any) -> Any:
        torch, sig = self._torch, self.signature
        as_numpy = isinstance(x, np.ndarray)
        t = torch.from_numpy(np.ascontiguousarray(x)) if as_numpy else x
        if tuple(t.shape[1:]) != tuple(sig.input_shape) or t.dim() != len(sig.input_shape) + 1:
            raise ValueError(f"input of shape {tuple(t.shape)} does not fit the engine: expected "
                             f"[B, {', '.join(map(str, sig.input_shape))}]")
        missing = [n for n in self._params if n not in self._params_set]
        if missing:
            raise TensorRTError(f"the engine takes its parameters as inputs and {missing[0]} is not set: "
                                "call set_parameters(state_dict) first")
        if self._started and t.shape[0] != self._batch:
            raise ValueError(f"batch changed within a sample ({self._batch} then {t.shape[0]}); call reset()")
        if not self._started:
            if t.shape[0] != self._batch:
                self._allocate(int(t.shape[0]))
            self._started = True
        self._x.copy_(t)
        ctx = self.context
        ctx.set_tensor_address(sig.input_name, self._x.data_ptr())
        ctx.set_tensor_address(sig.output_name, self._y.data_ptr())
        for (name, _), buf in zip(sig.state, self._state[self._k]):
            ctx.set_tensor_address(name, buf.data_ptr())
        for name, buf in zip(sig.state_outputs, self._state[1 - self._k]):
            ctx.set_tensor_address(name, buf.data_ptr())
        for name, buf in self._params.items():
            ctx.set_tensor_address(name, buf.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise TensorRTError("TensorRT failed to run the step (see its log)")
        self._k ^= 1
        y = self._y.clone()
        return y.cpu().numpy() if as_numpy else y

    def reset(self) -> None:
        if self._batch is not None:
            for buf in self._state[self._k]:
                buf.zero_()
        self._started = False

    def state(self) -> dict[str, np.ndarray]:
        """The state after the last step, as numpy arrays."""
        if self._batch is None:
            return {}
        return {name: buf.cpu().numpy() for (name, _), buf in zip(self.signature.state, self._state[self._k])}

    def set_parameters(self, state_dict: Mapping[str, Any]) -> None:
        """New parameter values for an engine built from a graph with parameters as inputs."""
        sig = self.signature
        if not sig.params_as_inputs:
            raise TensorRTError("this engine has its parameters built in: use refit() (engine built with "
                                "refit=True) or export with params_as_inputs=True")
        shapes = dict((n, tuple(s)) for n, s in sig.params)
        for key, value in state_dict.items():
            if key in sig.buffers:
                continue
            name = sig.weights.get(key)
            if name is None:
                raise ValueError(f"parameter {key!r} is not an input of this engine")
            t = self._torch.as_tensor(value).detach()
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"parameter {key!r} has shape {tuple(t.shape)}; the engine expects {shapes[name]}")
            self._params[name].copy_(t)
            self._params_set.add(name)

    def refit(self, state_dict: Mapping[str, Any]) -> None:
        """Load new weights into a refittable engine (built with ``refit=True``); pass a full
        ``net.state_dict()``: BatchNorm statistics are needed where TensorRT fused them with a weight."""
        trt, sig = self._trt, self.signature
        if not self.engine.refittable:
            raise TensorRTError("this engine was not built with refit=True")
        self._torch.cuda.current_stream(self.device).synchronize()  # no step may run during a refit
        refitter = trt.Refitter(self.engine, self.logger)
        refittable = set(refitter.get_all_weights())
        by_name = {**{v: k for k, v in sig.constants.items()}, **{v: k for k, v in sig.weights.items()}}
        held = []  # TensorRT reads the arrays at refit time: keep them alive until then
        for name in sorted(refittable & set(by_name)):
            key = by_name[name]
            if key not in state_dict:
                continue
            value = state_dict[key]
            array = np.ascontiguousarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value,
                                         dtype=np.float32)
            held.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise TensorRTError(f"TensorRT rejected new weights for {key!r} (shape {array.shape})")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise TensorRTError(f"refit needs weights that were not given: {missing[:5]}; pass the full "
                                "net.state_dict()")
        if not refitter.refit_cuda_engine():
            raise TensorRTError("TensorRT could not refit the engine (see its log)")

    def _allocate(self, batch: int) -> None:
        torch, sig = self._torch, self.signature
        for name, shape in [(sig.input_name, sig.input_shape), *sig.state]:
            if not self.context.set_input_shape(name, (batch, *shape)):
                raise ValueError(f"batch {batch} is outside the engine's optimization profile")
        zeros = lambda shape: torch.zeros((batch, *shape), device=self.device)  # noqa: E731
        self._x = zeros(sig.input_shape)
        self._y = zeros(sig.output_shape)
        self._state = [[zeros(shape) for _, shape in sig.state] for _ in range(2)]
        self._batch, self._k = batch, 0
