"""STOP learning in ONNX Runtime: the learning-step graph and the update graph, without torch.

:class:`OrtLearner` runs the graphs written by :func:`~stoprt.export.onnx_learn.export_learn_step`
and :func:`~stoprt.export.onnx_update.export_update` with the step / end_sample / update schedule of
:class:`~stoprt.runtime.stop.STOP`. State, traces and gradient accumulators live in two sets of
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

from ..runtime.learner_stats import LearnerStats
from .graph_learner import GraphLearner
from .graph_learner import as_numpy as _as_numpy
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
        if update not in ("sample", "step") and not (isinstance(update, int) and update >= 1):
            raise ValueError(f"update must be 'sample', 'step' or an int >= 1, got {update!r}")
        ort = _import_ort()
        self._ort, self.update = ort, update
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
        if [n for n, _ in self.usig.learned] != self.sig.learned:
            raise LearnGraphError(f"{update_graph} updates other parameters than {learn_graph} learns")
        sig = self.sig
        expected = ["x", "target", *[n for n, _ in sig.state], *[n for n, _ in sig.grads], *[n for n, _ in sig.params]]
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
        self._input_shape, self._classes = tuple(sig.input_shape), sig.output_shape[-1]
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
        self.stats = LearnerStats()
        self.sample_steps, self._since_update = 0, 0
        self._batch: int | None = None
        self.output_sum: np.ndarray | None = None

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

    def set_parameters(self, state_dict: Mapping[str, Any]) -> None:
        """Load parameter values (a state_dict or part of one; BatchNorm statistics are baked in)."""
        for key, value in state_dict.items():
            if key in self.sig.buffers:
                continue
            if key not in self.sig.weights:
                raise ValueError(f"parameter {key!r} is not an input of the learning graph")
            target = self.params[self.sig.weights[key]]
            data = _as_numpy(value, np.float32)
            if data.shape != target.shape:
                raise ValueError(f"parameter {key!r} has shape {data.shape}; the graph expects {target.shape}")
            np.copyto(target, data)  # in place: the bound OrtValues wrap these arrays

    def parameters(self) -> dict[str, np.ndarray]:
        """The current parameter values by state_dict key (copies)."""
        return {key: self.params[name].copy() for key, name in self.sig.weights.items()}

    def state(self) -> dict[str, np.ndarray]:
        """State and traces after the last step (zeros after a sample's end), by graph input name."""
        if self._batch is None:
            return {}
        return {name: buf.copy() for (name, _), buf in zip(self.sig.state, self._state[self._k])}

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients since the last update, by state_dict key (copies)."""
        if self._batch is None:
            return {}
        by_name = {name: g.copy() for (name, _), g in zip(self.sig.grads, self._grads[self._g])}
        return {key: by_name["grad." + name[len("param."):]] for key, name in self.sig.weights.items()
                if name in self.sig.learned}

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What learning has changed, as arrays by graph input name (copies): ``params`` and the
        optimizer's state. Meant for sample boundaries, where state, traces and accumulators are zero."""
        return {"params": {n: a.copy() for n, a in self.params.items()},
                "optimizer": {n: a.copy() for n, a in self.optimizer_state.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values in place (the bound buffers keep their memory)."""
        for what, mine in (("params", self.params), ("optimizer", self.optimizer_state)):
            theirs = state.get(what) or {}
            if set(theirs) != set(mine):
                raise ValueError(f"the checkpoint's {what} ({len(theirs)} arrays) do not fit these graphs' "
                                 f"({len(mine)}): it was written for another model or optimizer")
            for name, value in theirs.items():
                value = np.asarray(value)
                if value.shape != mine[name].shape:
                    raise ValueError(f"the checkpoint's {name} has shape {value.shape}; the graph expects "
                                     f"{mine[name].shape}")
                np.copyto(mine[name], value)

    # ---- steps --------------------------------------------------------------------------------
    def step(self, x: Any, target: Any = None) -> np.ndarray:
        """One step: ``x`` ``[B, *input_shape]``, ``target`` ``[B]`` class indices (None: an unlabelled
        step, which only predicts: its gradients are dropped); returns the step's output ``[B, K]``."""
        learn = target is not None
        if not isinstance(x, np.ndarray):
            x = _as_numpy(x, np.float32)
        if learn and not isinstance(target, np.ndarray):
            target = _as_numpy(target, np.int64)
        batch = x.shape[0] if x.ndim else 0
        if x.shape[1:] != self._input_shape or (learn and target.shape != (batch,)):
            raise ValueError(f"input {x.shape} / target {None if target is None else target.shape} do not fit the "
                             f"learning graph: expected [B, {', '.join(map(str, self._input_shape))}] and [B]")
        if self.sample_steps == 0:
            if batch != self._batch:
                self._allocate(batch)
            self.output_sum = np.zeros((batch, *self.sig.output_shape), np.float32)
        elif batch != self._batch:
            raise ValueError(f"batch changed within a sample ({self._batch} then {batch})")
        if learn:
            self._set_target(target)
        np.copyto(self._x, x)
        self.learn_session.run_with_iobinding(self._binding(self._k, self._g if learn else None, self._p))
        self._k ^= 1
        self.output_sum += self._y
        self.sample_steps += 1
        self.stats.steps += 1
        if learn:
            self._g ^= 1
            self._since_update += 1
            if self.update == "step" or (isinstance(self.update, int) and self._since_update >= self.update):
                self._apply_update()
        return self._y.copy()

    def end_sample(self) -> np.ndarray | None:
        """Apply pending gradients, forget state and traces; the prediction ``[B]`` (None if no step)."""
        if self.sample_steps == 0:
            return None
        self._apply_update()
        for buf in self._state[self._k]:
            buf.fill(0.0)
        self.sample_steps = 0
        self.stats.samples += 1
        return self.output_sum.argmax(1)

    # ---- internals ----------------------------------------------------------------------------
    def _set_target(self, target: np.ndarray) -> None:
        """Copy the labels into the bound target buffer, checked against the network's classes (an
        unlabelled step reads the buffer too, so it never keeps a bad label)."""
        t = self._target
        np.copyto(t, target, casting="unsafe")  # as np.array(target, np.int64) would convert
        labels = t.tolist()  # a few labels: Python's min/max beat numpy's reductions per step
        if min(labels) < 0 or max(labels) >= self._classes:
            t.fill(0)
            raise ValueError(f"label(s) {sorted(set(np.asarray(target).tolist()))} outside the {self._classes} "
                             "classes of the network")

    def _apply_update(self) -> None:
        """One run of the update graph: reads the accumulators and parameter/optimizer set ``_p``,
        writes set ``1 - _p`` (the kept values where an update is refused), then the sets swap."""
        if not self._since_update:
            return
        self._since_update = 0
        self.update_session.run_with_iobinding(self._update_binding(self._g, self._p))
        self._p ^= 1
        for g in self._grads[self._g]:
            g.fill(0.0)
        if self._ok:
            self.stats.updates += 1
            self.stats.clamped_values += int(self._clamped)
        else:
            self.stats.rejected_updates += 1
            log.warning("stoprt: update refused: a gradient or an updated parameter is NaN or Inf; "
                        "parameters keep their last good values")

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
        set ``p``, and writes state set ``1 - k`` and accumulator set ``1 - g`` (``g`` None: reads set
        0, writes the scratch set). Made once each, on first use."""
        key = (k, g, p)
        if key in self._bindings:
            return self._bindings[key]
        sig, value = self.sig, self._value
        io = self.learn_session.io_binding()
        io.bind_ortvalue_input("x", value(self._x))
        io.bind_ortvalue_input("target", value(self._target))
        for (name, _), buf in zip(sig.state, self._state[k]):
            io.bind_ortvalue_input(name, value(buf))
        for (name, _), buf in zip(sig.grads, self._grads[0 if g is None else g]):
            io.bind_ortvalue_input(name, value(buf))
        for name, buf in self._params[p].items():
            io.bind_ortvalue_input(name, value(buf))
        io.bind_ortvalue_output(sig.output_name, value(self._y))
        for name, buf in zip(sig.state_outputs, self._state[1 - k]):
            io.bind_ortvalue_output(name, value(buf))
        for name, buf in zip(sig.grad_outputs, self._grads[2 if g is None else 1 - g]):
            io.bind_ortvalue_output(name, value(buf))
        self._bindings[key] = io
        return io

    def _update_binding(self, g: int, p: int):
        """The update graph's binding that reads accumulator set ``g`` and parameter/optimizer set
        ``p`` and writes parameter/optimizer set ``1 - p``. Made once each, on first use."""
        key = (g, p)
        if key in self._update_bindings:
            return self._update_bindings[key]
        value, learned = self._value, [n for n, _ in self.usig.learned]
        io = self.update_session.io_binding()
        io.bind_ortvalue_input("lr", value(self._lr))
        for name in learned:
            io.bind_ortvalue_input(name, value(self._params[p][name]))
        for (name, _), buf in zip(self.sig.grads, self._grads[g]):
            io.bind_ortvalue_input(name, value(buf))
        for name, buf in self._optimizer[p].items():
            io.bind_ortvalue_input(name, value(buf))
        # outputs in graph order: new parameters, new optimizer state, ok, clamped
        written = [*(self._params[1 - p][n] for n in learned), *self._optimizer[1 - p].values(),
                   self._ok, self._clamped]
        for out, buf in zip(self.update_session.get_outputs(), written, strict=True):
            io.bind_ortvalue_output(out.name, value(buf))
        self._update_bindings[key] = io
        return io
