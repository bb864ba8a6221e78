"""STOP learning in ONNX Runtime: the learning-step graph and the update graph, without torch.

:class:`OrtLearner` runs the graphs written by :func:`~stoprt.export.onnx_learn.export_learn_step`
and :func:`~stoprt.export.onnx_update.export_update` with the step / end_sample / update schedule of
:class:`~stoprt.runtime.stop.STOP` (:class:`~.graph_learner.GraphLearner`, shared with the TensorRT
learner: this module supplies how ONNX Runtime runs the graphs). State, traces and gradient accumulators live in two sets of
buffers that swap roles every step (ping-pong, as :class:`~.ort_runner.OrtStepRunner`): each set is
bound once with IO binding, so a step copies ``x`` and ``target`` in and runs. Parameters and the
optimizer's state swap the same way at each update: the update graph (bound once too) reads one set
and writes the other, so an update copies nothing between Python and ONNX Runtime either.

Buffers are numpy arrays that the OrtValues wrap (host memory). The CPU execution provider is the
default; ``provider="cuda"`` or ``"tensorrt"`` asks for that provider (ONNX Runtime then copies the
bound host buffers in and out), and an ONNX Runtime build without it falls back to CPU with a warning,
or raises :class:`ProviderUnavailable` with ``strict=True``.

Torch-free: this module and what it imports need numpy and onnxruntime only (the edge install).
:meth:`OrtLearner.state_dict` / :meth:`OrtLearner.load_state_dict` carry what a checkpoint needs
(parameters and optimizer state, as arrays) for :class:`~stoprt.runtime.stream.session.StreamSession`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np

from ..runtime.update_schedule import check_update_schedule
from .graph_learner import GraphLearner, Slot, learn_step_io, update_io
from .ort_runner import _import_ort
from .signatures import LearnGraphError, LearnSignature, UpdateSignature

log = logging.getLogger("stoprt")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class ProviderUnavailable(ValueError):
    """The requested execution provider is not in this ONNX Runtime build (with ``strict``)."""


def choose_providers(ort, provider: str, strict: bool = False) -> list[str]:
    """ONNX Runtime's provider list for ``provider`` (a key of :data:`PROVIDERS`), CPU last as the
    fallback for unsupported ops. A build without it: a warning and CPU alone, or
    :class:`ProviderUnavailable` when ``strict``."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown execution provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    wanted, available = PROVIDERS[provider], ort.get_available_providers()
    if wanted in available:
        return list(dict.fromkeys([wanted, PROVIDERS["cpu"]]))
    message = (f"this ONNX Runtime ({ort.__version__}) has no {wanted} (it has {', '.join(available)})")
    if strict:
        raise ProviderUnavailable(message + "; install a build with it, or drop --strict to run on the CPU")
    log.warning("stoprt: warning: %s; running on the CPU execution provider", message)
    return [PROVIDERS["cpu"]]


class OrtLearner(GraphLearner):
    """STOP on ONNX Runtime (see the module doc).

    Args:
        learn_graph, update_graph: the two ONNX files.
        parameters: the network's state_dict (its parameters' starting values).
        lr: the learning rate (an input of the update graph; SGD or Adam, as the graph was exported).
        update: ``"sample"`` (at :meth:`end_sample`), ``"step"`` or every N labelled steps, as STOP.
        threads: intra-op threads (1: a small step gains nothing from more).
        provider, strict: the execution provider asked for (see :func:`choose_providers`).
    """

    def __init__(self, learn_graph: str | os.PathLike, update_graph: str | os.PathLike,
                 parameters: Mapping[str, Any], lr: float, update: str | int = "sample", threads: int = 1,
                 provider: str = "cpu", strict: bool = False) -> None:
        check_update_schedule(update)  # before the sessions are made
        ort = _import_ort()
        self._ort = ort
        self._lr = np.array(lr, np.float32)  # bound into the update graph: set through ``lr``
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = choose_providers(ort, provider, strict)
        self.learn_session = ort.InferenceSession(str(learn_graph), options, providers=providers)
        self.update_session = ort.InferenceSession(str(update_graph), options, providers=providers)
        self.sig = LearnSignature.from_metadata(self.learn_session.get_modelmeta().custom_metadata_map,
                                                str(learn_graph))
        self.usig = UpdateSignature.from_metadata(self.update_session.get_modelmeta().custom_metadata_map,
                                                  str(update_graph))
        self._setup(self.sig, self.usig, lr, update, str(learn_graph))
        sig = self.sig
        expected = [name for name, _ in learn_step_io(sig, 0, 0)[0]]
        got = [i.name for i in self.learn_session.get_inputs()]
        if got != expected:
            raise LearnGraphError(f"{learn_graph}: the graph's inputs do not match its stoprt metadata")
        # [shape without batch, has a batch axis] of each input (a bias trace is a scalar)
        shapes = [(sig.input_shape, True), ([], True), *[(s or [], s is not None) for _, s in sig.state],
                  *[(s, False) for _, s in sig.grads + sig.params]]
        for info, (want, batched) in zip(self.learn_session.get_inputs(), shapes):
            dims = list(info.shape[1:] if batched and info.shape else info.shape)
            if len(dims) != len(want) or any(isinstance(d, int) and d != w for d, w in zip(dims, want)):
                raise LearnGraphError(f"{learn_graph}: input {info.name} has shape {info.shape}, its stoprt "
                                      f"metadata says {want} (without batch): the graph was altered")
        # Two sets of parameters and of optimizer state (SGD momentum; Adam's moments and step count,
        # zeros as torch starts): an update reads set ``_p`` and writes set ``1 - _p``. Parameters the
        # update does not write (frozen) are one array shared by both sets.
        learned = set(sig.learned)
        first = {n: np.zeros(s, np.float32) for n, s in sig.params}
        self._params = [first, {n: np.zeros(s, np.float32) if n in learned else first[n] for n, s in sig.params}]
        self._optimizer = [{n: np.zeros(s, np.float32) for n, s in self.usig.state} for _ in range(2)]
        self._p = 0
        self.set_parameters(parameters)
        self._ok, self._clamped = np.zeros((), np.bool_), np.zeros((), np.float32)  # the update's verdict

    # ---- parameters ---------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        """The current parameter buffers by graph input name (the bound arrays: write in place)."""
        return self._params[self._p]

    @property
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The current optimizer state buffers by graph input name (the bound arrays)."""
        return self._optimizer[self._p]

    @property
    def lr(self) -> np.ndarray:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        np.copyto(self._lr, np.float32(value))  # in place: the update graph's bound input

    # ---- GraphLearner's hooks: numpy buffers that the OrtValues wrap, written in place ---------
    def _read(self, group: str, name: str) -> np.ndarray:
        return (self.params if group == "params" else self.optimizer_state)[name].copy()

    def _write(self, group: str, name: str, value: np.ndarray) -> None:
        np.copyto((self.params if group == "params" else self.optimizer_state)[name], value)

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {name: buf.copy() for (name, _), buf in zip(self.sig.state, self._state[self._k])}

    def _grad_arrays(self) -> dict[str, np.ndarray]:
        return {name: g.copy() for (name, _), g in zip(self.sig.grads, self._grads[self._g])}

    def _run_step(self, x: np.ndarray, target: np.ndarray | None, learn: bool) -> np.ndarray:
        if learn:
            np.copyto(self._target, target)
        np.copyto(self._x, x)
        self.learn_session.run_with_iobinding(self._binding(self._k, self._g if learn else None, self._p))
        self._k ^= 1
        if learn:
            self._g ^= 1
        return self._y.copy()

    def _run_update(self) -> tuple[bool, int]:
        """One run of the update graph: reads the accumulators and parameter/optimizer set ``_p``,
        writes set ``1 - _p`` (the kept values where an update is refused), then the sets swap."""
        self.update_session.run_with_iobinding(self._update_binding(self._g, self._p))
        self._p ^= 1
        for g in self._grads[self._g]:
            g.fill(0.0)
        return bool(self._ok), int(self._clamped)

    def _zero_state(self) -> None:
        for buf in self._state[self._k]:
            buf.fill(0.0)

    def _allocate(self, batch: int) -> None:
        """Two sets of state and of accumulator buffers (and a scratch set for unlabelled steps' gradients)."""
        sig = self.sig
        self._batch, self._k, self._g = batch, 0, 0
        self._x = np.zeros((batch, *sig.input_shape), np.float32)
        self._target = np.zeros(batch, np.int64)
        self._y = np.zeros((batch, *sig.output_shape), np.float32)
        shapes = [() if s is None else (batch, *s) for _, s in sig.state]
        self._state = [[np.zeros(s, np.float32) for s in shapes] for _ in range(2)]
        self._grads = [[np.zeros(s, np.float32) for _, s in sig.grads] for _ in range(3)]  # [2]: scratch
        self._values: list = []  # the OrtValues wrap the arrays' memory (no copy); kept alive here
        self._bindings: dict = {}
        self._update_bindings: dict = {}

    def _value(self, array: np.ndarray):
        """An OrtValue over ``array``'s memory, kept alive as long as the bindings that use it."""
        self._values.append(self._ort.OrtValue.ortvalue_from_numpy(array))
        return self._values[-1]

    def _binding(self, k: int, g: int | None, p: int):
        """The learning step's binding that reads state set ``k``, accumulator set ``g`` and parameter
        set ``p`` (see :func:`~.graph_learner.learn_step_io`). Made once each, on first use."""
        key = (k, g, p)
        if key not in self._bindings:
            self._bindings[key] = self._bind(self.learn_session, learn_step_io(self.sig, k, g, p))
        return self._bindings[key]

    def _update_binding(self, g: int, p: int):
        """The update graph's binding that reads accumulator set ``g`` and parameter/optimizer set
        ``p`` and writes parameter/optimizer set ``1 - p`` (see :func:`~.graph_learner.update_io`)."""
        key = (g, p)
        if key not in self._update_bindings:
            self._update_bindings[key] = self._bind(self.update_session, update_io(self.sig, self.usig, g, p))
        return self._update_bindings[key]

    def _bind(self, session, io: tuple[list, list]):
        binding = session.io_binding()
        inputs, outputs = io
        for name, slot in inputs:
            binding.bind_ortvalue_input(name, self._value(self._array(slot)))
        for name, slot in outputs:
            binding.bind_ortvalue_output(name, self._value(self._array(slot)))
        return binding

    def _array(self, slot: Slot) -> np.ndarray:
        """The buffer a plan's slot names (frozen parameters: one array in both sets)."""
        group = slot.group
        if group == "state":
            return self._state[slot.set][slot.index]
        if group == "grads":
            return self._grads[slot.set][slot.index]
        if group == "params":
            return self._params[slot.set][slot.name]
        if group == "optimizer":
            return self._optimizer[slot.set][slot.name]
        return {"x": self._x, "target": self._target, "y": self._y, "lr": self._lr, "ok": self._ok,
                "clamped": self._clamped}[group]
