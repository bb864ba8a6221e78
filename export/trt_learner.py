"""STOP learning in TensorRT: engines of a learning bundle's learning-step graph and update graph.

:class:`TrtLearner` runs the graphs that ``stoprt export CKPT --to onnx-learn`` writes (the ones
:class:`~.ort_learner.OrtLearner` runs in ONNX Runtime) as two TensorRT engines, with the same
``step`` / ``end_sample`` / update schedule (:class:`~.graph_learner.GraphLearner`, shared with
OrtLearner). TensorRT 10 or newer (JetPack 6.1+) and a CUDA GPU; TensorRT is imported when a learner
is made, never at import.

Engines are built by :func:`~.tensorrt.serialize_engine`, the builder of the inference engines
(FP32 without TF32: learning compares potentials with thresholds and must match float32 STOP; one
optimization profile for the batch, 1 to ``max_batch``), and cached on disk as ``<graph>.<key>.engine`` next to the bundle (or in
``cache_dir``), written atomically. The key (:func:`engine_cache_key`) covers what makes an engine
unusable elsewhere: the graph's sha256, the TensorRT version, the GPU's name and the build options.
A cached engine that does not load is built again.

Device memory is torch CUDA tensors, as in :class:`~.tensorrt.TrtStepRunner`; each engine runs with
``execute_async_v3`` on torch's current stream, so copies and zeroing are ordered with it. Nothing
but the step's input and output crosses to the host on a step: state and traces (two sets),
gradient accumulators (two sets and a scratch set for unlabelled steps), the parameters and the
optimizer state (two sets each, swapped at every update: the update engine writes into the set it
does not read) stay on the GPU. Which buffer each engine tensor is bound to for given set indices is
:func:`~.graph_learner.learn_step_io` / :func:`~.graph_learner.update_io`; the addresses of each
combination are looked up once and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..runtime.atomic import write_bytes
from .graph_learner import GraphLearner, Slot, learn_step_io, update_io
from .signatures import LearnSignature, UpdateSignature, read_graph_signature
from .tensorrt import TensorRTError, load_engine, require_tensorrt, serialize_engine

log = logging.getLogger("stoprt")

# TensorRT DataType name -> torch dtype name, for the tensors that are not float32 (target, ok)
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
                "INT8": "int8", "UINT8": "uint8"}


def engine_cache_key(graph_sha256: str, tensorrt_version: str, gpu_name: str, *, max_batch: int,
                     workspace_mib: int) -> str:
    """16 hex digits naming a cached engine: an engine runs only on the TensorRT version and GPU model
    it was built with, for the graph and options it was built from."""
    text = json.dumps({"graph": graph_sha256, "tensorrt": str(tensorrt_version), "gpu": gpu_name,
                       "max_batch": int(max_batch), "workspace_mib": int(workspace_mib)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def engine_cache_path(cache_dir: str | os.PathLike, graph: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"{Path(graph).stem}.{key}.engine"


def torch_dtype_name(trt_dtype: Any) -> str:
    """The torch dtype (name) of buffers for a TensorRT ``DataType``."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in TORCH_DTYPES:
        raise TensorRTError(f"an engine tensor has TensorRT type {name}, which stoprt does not bind")
    return TORCH_DTYPES[name]


def engine_io_problem(inputs: list[str], outputs: list[str], engine_io: Mapping[str, bool]) -> str | None:
    """What is wrong with an engine's tensors (``name -> is an input``) against the graph's expected
    inputs and outputs, or None. An input may be missing: TensorRT drops inputs the graph never reads."""
    expected = {**{n: True for n in inputs}, **{n: False for n in outputs}}
    differ = sorted((set(engine_io) - set(expected)) | (set(outputs) - set(engine_io)))
    if differ:
        return f"its tensors differ from the graph's stoprt metadata in {differ[:4]}"
    swapped = sorted(n for n, is_input in engine_io.items() if expected[n] != is_input)
    if swapped:
        return f"{swapped[:4]} are inputs in one and outputs in the other"
    return None


class TrtLearner(GraphLearner):
    """STOP in TensorRT engines (see the module doc); the API of :class:`~.graph_learner.GraphLearner`.

    Args:
        learn_graph, update_graph: the two ONNX files of a learning bundle.
        parameters: the network's state_dict (its parameters' starting values).
        lr: the learning rate; update: ``"sample"``, ``"step"`` or every N labelled steps, as STOP.
        device: the CUDA device.
        max_batch: the largest batch the learning engine takes (its optimization profile is 1 to this,
            tuned for 1: a stream).
        workspace_mib: the builder's workspace limit (small on a 4 GB board).
        cache_dir: where engines are kept (default: the learning graph's folder, the bundle).
    """

    def __init__(self, learn_graph: str | os.PathLike, update_graph: str | os.PathLike,
                 parameters: Mapping[str, Any], lr: float, update: str | int = "sample", *,
                 device: str = "cuda", max_batch: int = 16, workspace_mib: int = 1024,
                 cache_dir: str | os.PathLike | None = None) -> None:
        learn_graph, update_graph = Path(learn_graph), Path(update_graph)
        sig = read_graph_signature(learn_graph, LearnSignature)
        usig = read_graph_signature(update_graph, UpdateSignature)
        self._setup(sig, usig, lr, update, str(learn_graph))
        trt = require_tensorrt()
        import torch
        if not torch.cuda.is_available():
            raise TensorRTError("TensorRT needs a CUDA GPU and torch sees none")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._trt, self._torch, self.device = trt, torch, torch.device(device)
        if self.device.index is not None:  # TensorRT builds and runs on the current CUDA device
            torch.cuda.set_device(self.device)
        self.max_batch, self.workspace_mib = int(max_batch), int(workspace_mib)
        self.logger = trt.Logger(trt.Logger.WARNING)
        cache = Path(cache_dir) if cache_dir is not None else learn_graph.parent
        self._learned = frozenset(sig.learned)
        self._io_names: dict[str, set[str]] = {}  # "learn" / "update" -> the engine's tensors
        self.learn_runtime, self.learn_engine = self._engine("learn", learn_graph, cache, *learn_step_io(sig, 0, 0))
        self.update_runtime, self.update_engine = self._engine("update", update_graph, cache,
                                                               *update_io(sig, usig, 0, 0))
        self.learn_context = self.learn_engine.create_execution_context()
        self.update_context = self.update_engine.create_execution_context()
        self._buffers: dict[Slot, Any] = {}
        self._addresses: dict[tuple, list[tuple[str, int]]] = {}
        self._k = self._g = self._u = 0
        zeros = self._zeros
        self._buffers[Slot("lr")] = zeros(())
        self._buffers[Slot("ok")] = zeros((), self._dtype(self.update_engine, "ok"))
        self._buffers[Slot("clamped")] = zeros((), self._dtype(self.update_engine, "clamped"))
        for s in range(3):
            for i, (_, shape) in enumerate(sig.grads):
                self._buffers[Slot("grads", s, i)] = zeros(shape)
        for name, shape in sig.params:
            for s in (0, 1) if name in self._learned else (0,):
                self._buffers[Slot("params", s, name=name)] = zeros(shape)
        for name, shape in usig.state:
            for s in (0, 1):
                self._buffers[Slot("optimizer", s, name=name)] = zeros(shape)
        self._set_shapes("update", update_io(sig, usig, 0, 0)[0])
        self.set_parameters(parameters)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                    **options: Any) -> "TrtLearner":
        """:meth:`GraphLearner.from_bundle`, with the engines cached next to the bundle by default: in
        a bundle folder, or beside a ``.tar`` bundle (whose files are unpacked elsewhere)."""
        path = Path(path)
        if cache_dir is None:
            cache_dir = path if path.is_dir() else path.parent
        return super().from_bundle(path, cache_dir=cache_dir, **options)

    # ---- engines ----------------------------------------------------------------------------------
    def _engine(self, which: str, graph: Path, cache: Path, inputs: list, outputs: list):
        """``(runtime, engine)`` of ``graph``: the cached engine, else one built now and cached."""
        from .bundle import _sha256
        trt = self._trt
        key = engine_cache_key(_sha256(graph), trt.__version__, self._torch.cuda.get_device_name(self.device),
                               max_batch=self.max_batch, workspace_mib=self.workspace_mib)
        path = engine_cache_path(cache, graph, key)
        loaded = None
        if path.is_file():
            try:
                loaded = load_engine(trt, self.logger, path.read_bytes(), path)
            except TensorRTError as err:
                log.warning("stoprt: warning: %s; building it again", err)
        if loaded is None:
            data = serialize_engine(graph, max_batch=self.max_batch, opt_batch=1, workspace_mib=self.workspace_mib,
                                    tf32=False)
            cache.mkdir(parents=True, exist_ok=True)
            write_bytes(path, data)
            loaded = load_engine(trt, self.logger, data, path)
        engine = loaded[1]
        engine_io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            engine_io[name] = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        problem = engine_io_problem([n for n, _ in inputs], [n for n, _ in outputs], engine_io)
        if problem:
            raise TensorRTError(f"the engine of {graph} ({path.name}) does not fit the graph: {problem}")
        self._io_names[which] = set(engine_io)
        return loaded

    def _dtype(self, engine, name: str):
        return getattr(self._torch, torch_dtype_name(engine.get_tensor_dtype(name)))

    def _zeros(self, shape, dtype=None):
        return self._torch.zeros(tuple(shape), dtype=dtype or self._torch.float32, device=self.device)

    def _set_shapes(self, which: str, inputs: list[tuple[str, Slot]]) -> None:
        context = self.learn_context if which == "learn" else self.update_context
        for name, slot in inputs:
            if name not in self._io_names[which]:
                continue
            if not context.set_input_shape(name, tuple(self._buffers[slot].shape)):
                raise ValueError(f"{name} of shape {tuple(self._buffers[slot].shape)} is outside the engine's "
                                 f"optimization profile (batch 1 to {self.max_batch}: see max_batch)")

    def _execute(self, key: tuple, io) -> None:
        """Run the engine ``key[0]`` (``learn`` / ``update``) with the tensors of ``io()`` (``(inputs,
        outputs)``) at their buffers; the addresses for ``key`` (the buffer sets) are kept."""
        context = self.learn_context if key[0] == "learn" else self.update_context
        addresses = self._addresses.get(key)
        if addresses is None:
            inputs, outputs = io()
            names = self._io_names[key[0]]
            addresses = [(name, self._buffers[slot].data_ptr()) for name, slot in inputs + outputs if name in names]
            self._addresses[key] = addresses
        for name, address in addresses:
            context.set_tensor_address(name, address)
        if not context.execute_async_v3(self._torch.cuda.current_stream(self.device).cuda_stream):
            raise TensorRTError("TensorRT failed to run the learning engines (see its log)")

    # ---- GraphLearner's hooks --------------------------------------------------------------------
    def _allocate(self, batch: int) -> None:
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} is larger than this learner's max_batch {self.max_batch}")
        sig, zeros = self.sig, self._zeros
        self._buffers[Slot("x")] = zeros((batch, *sig.input_shape))
        self._buffers[Slot("target")] = zeros((batch,), self._dtype(self.learn_engine, sig.target_name))
        self._buffers[Slot("y")] = zeros((batch, *sig.output_shape))
        for s in (0, 1):
            for i, (_, shape) in enumerate(sig.state):
                self._buffers[Slot("state", s, i)] = zeros(() if shape is None else (batch, *shape))
        self._addresses = {k: v for k, v in self._addresses.items() if k[0] != "learn"}  # new batch buffers
        self._batch, self._k = batch, 0
        self._set_shapes("learn", learn_step_io(sig, 0, 0, 0, self._learned)[0])

    def _run_step(self, x: np.ndarray, target: np.ndarray | None, learn: bool) -> np.ndarray:
        torch = self._torch
        self._buffers[Slot("x")].copy_(torch.from_numpy(x))
        if learn:
            self._buffers[Slot("target")].copy_(torch.from_numpy(target))
        k, g, u = self._k, self._g if learn else None, self._u
        self._execute(("learn", k, g, u),
                      lambda: learn_step_io(self.sig, k, g, u, self._learned))
        self._k ^= 1
        if learn:
            self._g ^= 1
        return self._buffers[Slot("y")].cpu().numpy()  # a new host array; waits for the step

    def _run_update(self) -> tuple[bool, int]:
        g, u = self._g, self._u
        self._buffers[Slot("lr")].fill_(float(self.lr))  # ``lr`` may have been changed since the last update
        self._execute(("update", g, u), lambda: update_io(self.sig, self.usig, g, u))
        for i in range(len(self.sig.grads)):
            self._buffers[Slot("grads", g, i)].zero_()
        self._u ^= 1
        return bool(self._buffers[Slot("ok")].item()), int(round(float(self._buffers[Slot("clamped")].item())))

    def _zero_state(self) -> None:
        for i in range(len(self.sig.state)):
            self._buffers[Slot("state", self._k, i)].zero_()

    def _slot(self, group: str, name: str) -> Slot:
        if group == "params" and name not in self._learned:
            return Slot("params", 0, name=name)
        return Slot(group, self._u, name=name)

    def _read(self, group: str, name: str) -> np.ndarray:
        return self._buffers[self._slot(group, name)].cpu().numpy()

    def _write(self, group: str, name: str, value: np.ndarray) -> None:
        self._buffers[self._slot(group, name)].copy_(self._torch.as_tensor(value))

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {name: self._buffers[Slot("state", self._k, i)].cpu().numpy() for i, (name, _) in enumerate(self.sig.state)}

    def _grad_arrays(self) -> dict[str, np.ndarray]:
        return {name: self._buffers[Slot("grads", self._g, i)].cpu().numpy() for i, (name, _) in enumerate(self.sig.grads)}
