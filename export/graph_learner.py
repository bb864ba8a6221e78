"""What every learner of stoprt's learning graphs shares, whichever engine runs the graphs: torch-free.

:class:`GraphLearner` holds the parts that do not depend on the engine: the update schedule of
:class:`~stoprt.runtime.stop.STOP` (``step`` / ``end_sample``, update per sample, per step or every
N labelled steps), the checks of inputs, labels, parameters and checkpoints, the mapping from
state_dict keys to the graphs' names, and :meth:`GraphLearner.from_bundle`, which opens and checks a
learning bundle. A subclass runs the graphs by supplying the hooks named ``_run_step``,
``_run_update``, ``_allocate``, ``_zero_state``, ``_read`` / ``_write``, ``_state_arrays`` and
``_grad_arrays`` (see each): :class:`~.ort_learner.OrtLearner` (ONNX Runtime) and
:class:`~.trt_learner.TrtLearner` (TensorRT engines).

State, traces and gradient accumulators live in two sets of buffers that swap roles every step
(ping-pong), parameters and optimizer state in two sets that swap at every update:
:func:`learn_step_io` and :func:`update_io` say which buffer each graph tensor is bound to for given
set indices.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from ..runtime.learner_stats import LearnerStats
from ..runtime.update_schedule import check_update_schedule, update_due
from .signatures import LearnGraphError, LearnSignature, UpdateSignature

log = logging.getLogger("stoprt")

SCRATCH = 2  # the accumulator set an unlabelled step writes (its gradients are dropped)


def as_numpy(value: Any, dtype) -> np.ndarray:
    """A C-ordered numpy copy of an array, a number or a torch tensor (any device)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.array(value, dtype=dtype, order="C")  # (ascontiguousarray would make a 0-d array 1-d)


# ---- which buffer each graph tensor is bound to ---------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """A buffer of a learner: ``group`` (``x``, ``target``, ``y``, ``lr``, ``ok``, ``clamped``: one
    each; ``state``, ``grads``: ``index`` in the signature's list, in set ``set``; ``params``,
    ``optimizer``: by ``name``, in set ``set``)."""

    group: str
    set: int = 0
    index: int = 0
    name: str = ""


def learn_step_io(sig: LearnSignature, k: int, g: int | None, p: int = 0,
                  learned: frozenset[str] | None = None) -> tuple[list[tuple[str, Slot]], list[tuple[str, Slot]]]:
    """``(inputs, outputs)`` of the learning step in graph order, each ``(tensor name, buffer)``.

    The step reads state set ``k`` and accumulator set ``g`` and writes sets ``1 - k`` and ``1 - g``;
    ``g`` None (an unlabelled step) reads accumulator set 0 and writes :data:`SCRATCH`. Learned
    parameters are read from set ``p`` (an engine whose update writes new parameters into the other
    set; ONNX Runtime updates in place: ``p`` 0); the others (``learned`` leaves them out) have set 0.
    """
    learned = frozenset(sig.learned) if learned is None else learned
    inputs = [("x", Slot("x")), (sig.target_name, Slot("target"))]
    inputs += [(name, Slot("state", k, i)) for i, (name, _) in enumerate(sig.state)]
    inputs += [(name, Slot("grads", 0 if g is None else g, i)) for i, (name, _) in enumerate(sig.grads)]
    inputs += [(name, Slot("params", p if name in learned else 0, name=name)) for name, _ in sig.params]
    outputs = [(sig.output_name, Slot("y"))]
    outputs += [(name, Slot("state", 1 - k, i)) for i, name in enumerate(sig.state_outputs)]
    outputs += [(name, Slot("grads", SCRATCH if g is None else 1 - g, i)) for i, name in enumerate(sig.grad_outputs)]
    return inputs, outputs


def update_io(sig: LearnSignature, usig: UpdateSignature, g: int, u: int
              ) -> tuple[list[tuple[str, Slot]], list[tuple[str, Slot]]]:
    """``(inputs, outputs)`` of the update graph: it reads the learned parameters and the optimizer
    state of set ``u`` and accumulator set ``g``, and writes parameters and optimizer state into set
    ``1 - u`` (the sets then swap), plus the ``ok`` flag and the count of ``clamped`` values."""
    inputs = [("lr", Slot("lr"))]
    inputs += [(name, Slot("params", u, name=name)) for name, _ in usig.learned]
    inputs += [(name, Slot("grads", g, i)) for i, (name, _) in enumerate(sig.grads)]
    inputs += [(name, Slot("optimizer", u, name=name)) for name, _ in usig.state]
    outputs = [("new_" + name, Slot("params", 1 - u, name=name)) for name, _ in usig.learned]
    outputs += [("new_" + name, Slot("optimizer", 1 - u, name=name)) for name, _ in usig.state]
    outputs += [("ok", Slot("ok")), ("clamped", Slot("clamped"))]
    return inputs, outputs


# ---- the learner ------------------------------------------------------------------------------------
class GraphLearner:
    """The step / end_sample / update schedule of STOP over a learning graph and an update graph.

    A subclass's ``__init__`` reads ``sig`` and ``usig`` from its graphs, calls :meth:`_setup`, makes
    its buffers and loads the starting parameters with :meth:`set_parameters`.
    """

    sig: LearnSignature
    usig: UpdateSignature
    manifest: dict | None = None

    def _setup(self, sig: LearnSignature, usig: UpdateSignature, lr: float, update: str | int,
               where: str) -> None:
        check_update_schedule(update)
        if [n for n, _ in usig.learned] != sig.learned:
            raise LearnGraphError(f"{where}: the update graph updates other parameters than the learning graph learns")
        self.sig, self.usig, self.update, self.lr = sig, usig, update, np.asarray(lr, np.float32)
        self.stats = LearnerStats()
        self.sample_steps, self._since_update = 0, 0
        self._batch: int | None = None
        self.output_sum: np.ndarray | None = None

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, lr: float | None = None, update: str | int | None = None,
                    extract_to: str | os.PathLike | None = None, **options: Any) -> "GraphLearner":
        """The learner of a learning bundle (``stoprt export CKPT --to onnx-learn``), checked: the
        manifest and files against their checksums, the graphs' inputs against the bundle's input
        spec. ``lr``/``update``: default the bundle's; ``options``: the subclass's own (threads,
        provider, strict for ONNX Runtime; device, max_batch, cache_dir for TensorRT)."""
        from .bundle import BundleError, verify_bundle
        root, manifest = verify_bundle(path, extract_to)
        learning = manifest.get("learning")
        if learning is None:
            raise BundleError(f"{path} carries no learning graphs: write it with `stoprt export CHECKPOINT "
                              f"--to onnx-learn {path}`")
        try:
            with np.load(root / learning["params"], allow_pickle=False) as npz:
                params = {key: npz[key] for key in npz.files}
        except Exception as err:  # zip/npy errors; the checksum matched, so it was written so
            raise BundleError(f"{root}: {learning['params']} is not readable: {err}") from err
        learner = cls(root / learning["learn_graph"], root / learning["update_graph"], params,
                      lr=learning["optimizer"]["lr"] if lr is None else lr,
                      update=learning["update"] if update is None else update, **options)
        shape = (manifest.get("input_spec") or {}).get("shape")
        if shape is not None and list(shape) != list(learner.sig.input_shape):
            raise LearnGraphError(f"{root}: {learning['learn_graph']} takes input {learner.sig.input_shape}; "
                                  f"the bundle's input spec says {list(shape)}")
        missing = sorted(set(learner.sig.weights) - set(params) - set(learner.sig.buffers))
        if missing:
            raise BundleError(f"{root}: {learning['params']} lacks parameter(s) {missing[:3]} of the learning graph")
        learner.manifest = manifest
        return learner

    # ---- parameters and checkpoints -------------------------------------------------------------
    def set_parameters(self, state_dict: Mapping[str, Any]) -> None:
        """Load parameter values (a state_dict or part of one; BatchNorm statistics are baked in)."""
        for name, data in self._checked_parameters(state_dict):
            self._write("params", name, data)

    def _checked_parameters(self, state_dict: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
        """``(graph name, float32 array)`` of each parameter in ``state_dict``, its shape checked."""
        shapes = {name: tuple(shape) for name, shape in self.sig.params}
        for key, value in state_dict.items():
            if key in self.sig.buffers:
                continue
            if key not in self.sig.weights:
                raise ValueError(f"parameter {key!r} is not an input of the learning graph")
            name = self.sig.weights[key]
            data = as_numpy(value, np.float32)
            if data.shape != shapes[name]:
                raise ValueError(f"parameter {key!r} has shape {data.shape}; the graph expects {shapes[name]}")
            yield name, data

    def parameters(self) -> dict[str, np.ndarray]:
        """The current parameter values by state_dict key (copies)."""
        return {key: self._read("params", name) for key, name in self.sig.weights.items()}

    def state(self) -> dict[str, np.ndarray]:
        """State and traces after the last step (zeros after a sample's end), by graph input name."""
        return {} if self._batch is None else self._state_arrays()

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients since the last update, by state_dict key (copies)."""
        if self._batch is None:
            return {}
        by_name = self._grad_arrays()
        return {key: by_name["grad." + name[len("param."):]] for key, name in self.sig.weights.items()
                if name in self.sig.learned}

    def state_dict(self) -> dict[str, Any]:
        """What learning has changed, as arrays by graph input name (copies): ``params`` and the
        optimizer's state. Meant for sample boundaries, where state, traces and accumulators are zero."""
        return {"params": {name: self._read("params", name) for name, _ in self.sig.params},
                "optimizer": {name: self._read("optimizer", name) for name, _ in self.usig.state}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (into the buffers the graphs are bound to)."""
        for what, group, mine in (("params", "params", self.sig.params), ("optimizer", "optimizer", self.usig.state)):
            theirs, shapes = state.get(what) or {}, {name: tuple(shape) for name, shape in mine}
            if set(theirs) != set(shapes):
                raise ValueError(f"the checkpoint's {what} ({len(theirs)} arrays) do not fit these graphs' "
                                 f"({len(shapes)}): it was written for another model or optimizer")
            for name, value in theirs.items():
                value = np.asarray(value, np.float32)
                if value.shape != shapes[name]:
                    raise ValueError(f"the checkpoint's {name} has shape {value.shape}; the graph expects "
                                     f"{shapes[name]}")
                self._write(group, name, value)

    @property
    def updates(self) -> int:
        return self.stats.updates

    @property
    def rejected_updates(self) -> int:
        return self.stats.rejected_updates

    @property
    def clamped_values(self) -> int:
        return self.stats.clamped_values

    # ---- steps ------------------------------------------------------------------------------------
    def step(self, x: Any, target: Any = None) -> np.ndarray:
        """One step: ``x`` ``[B, *input_shape]``, ``target`` ``[B]`` class indices (None: an unlabelled
        step, which only predicts: its gradients are dropped); returns the step's output ``[B, K]``."""
        learn = target is not None
        x, target = self._checked_inputs(x, target)
        if self.sample_steps == 0:
            if x.shape[0] != self._batch:
                self._allocate(x.shape[0])
            self.output_sum = np.zeros((x.shape[0], *self.sig.output_shape), np.float32)
        elif x.shape[0] != self._batch:
            raise ValueError(f"batch changed within a sample ({self._batch} then {x.shape[0]})")
        y = self._run_step(x, target, learn)
        self.output_sum += y
        self.sample_steps += 1
        self.stats.steps += 1
        if learn:
            self._since_update += 1
            if update_due(self.update, self._since_update):
                self._apply_update()
        return y

    def _checked_inputs(self, x: Any, target: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """``x`` as float32 and ``target`` as integers (None stays None), checked; a C-ordered float32
        frame is used as it is (the engines copy it in), not copied here."""
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous):
            x = as_numpy(x, np.float32)
        batch = x.shape[0] if x.ndim else 0
        if target is not None and not (isinstance(target, np.ndarray) and target.dtype.kind in "iu"):
            target = as_numpy(target, np.int64)
        if x.shape[1:] != tuple(self.sig.input_shape) or (target is not None and target.shape != (batch,)):
            raise ValueError(f"input {x.shape} / target {None if target is None else target.shape} do not fit the "
                             f"learning graph: expected [B, {', '.join(map(str, self.sig.input_shape))}] and [B]")
        labels = [] if target is None else target.tolist()  # a few labels: Python's min/max beat numpy's
        if labels and (min(labels) < 0 or max(labels) >= self.sig.output_shape[-1]):
            raise ValueError(f"label(s) {sorted(set(labels))} outside the {self.sig.output_shape[-1]} "
                             "classes of the network")
        return x, target

    def end_sample(self) -> np.ndarray | None:
        """Apply pending gradients, forget state and traces; the prediction ``[B]`` (None if no step)."""
        if self.sample_steps == 0:
            return None
        self._apply_update()
        self._zero_state()
        self.sample_steps = 0
        self.stats.samples += 1
        return self.output_sum.argmax(1)

    def _apply_update(self) -> None:
        if not self._since_update:
            return
        self._since_update = 0
        ok, clamped = self._run_update()
        if ok:
            self.stats.updates += 1
            self.stats.clamped_values += clamped
        else:
            self.stats.rejected_updates += 1
            log.warning("stoprt: update refused: a gradient or an updated parameter is NaN or Inf; "
                        "parameters keep their last good values")

    # ---- what a subclass supplies -----------------------------------------------------------------
    def _allocate(self, batch: int) -> None:
        """Buffers for ``batch`` (state and traces zero); sets ``self._batch``."""
        raise NotImplementedError

    def _run_step(self, x: np.ndarray, target: np.ndarray | None, learn: bool) -> np.ndarray:
        """Run the learning step (swapping the buffer sets); the output ``[B, K]`` as a new array.
        ``target`` None (an unlabelled step): the graph reads whatever labels its buffer holds, which
        change only the gradients, and those go to the scratch set."""
        raise NotImplementedError

    def _run_update(self) -> tuple[bool, int]:
        """Run the update graph on the accumulated gradients, zero them; ``(ok, clamped values)``."""
        raise NotImplementedError

    def _zero_state(self) -> None:
        raise NotImplementedError

    def _read(self, group: str, name: str) -> np.ndarray:
        """A copy of parameter (``group`` ``params``) or optimizer state (``optimizer``) ``name``."""
        raise NotImplementedError

    def _write(self, group: str, name: str, value: np.ndarray) -> None:
        raise NotImplementedError

    def _state_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _grad_arrays(self) -> dict[str, np.ndarray]:
        """Copies of the current accumulators, by the learning graph's input name (``grad.<key>``)."""
        raise NotImplementedError
