"""Analytic memory model of a stoprt network: training (STOP, BPTT) and streaming inference.

A dry run at batch 1 walks the network's layers in execution order and records every tensor that flows
between them (shape, producer; :mod:`stoprt.devices.cost.dataflow`). Each layer declares next to its code
what it keeps in a step, for each mode (``keeps`` on the stoprt layers, ``kinds.TORCH_LAYERS`` for
torch's own; read through :func:`stoprt.runtime.kinds.step_keeps`): tensors saved for backward and the
state it holds, with their size and the steps at which they exist. In short:

* STOP keeps one step's graph: the synaptic ops and neurons keep only state and traces (input-shaped
  input traces, u, s, threshold and leak traces); frozen BatchNorm its per-channel scale; max pooling
  its input and indices; dropout one mask per sample;
* BPTT keeps every step's graph: what torch's kernels and the plain dynamics
  (``functional.lif_step`` / ``readout_step``) save, at every step;
* inference keeps the last step's state.

The loss (not a layer) is the planner's own rule: cross-entropy keeps its log-softmax ``[B, K]``, the
target and a scalar per step; MSE the output and the one-hot target.

Storages are counted once however many ops save them (the spikes a LIF keeps as state are the tensor
the next pooling layer saves). The sum is what ``saved_tensors_hooks`` sees plus the layers' state
tensors, so it is checked against that exact measurement in the tests.

A full estimate adds parameters, buffers, optimizer state (SGD: none, SGD with momentum: one copy,
Adam: two copies of the learned parameters), gradients, a transient working set (the largest layer's
backward temporaries) and a fixed process overhead. That overhead was measured here for CPU; for
CUDA the allocator view excludes the context, and a Jetson's budget is
:attr:`stoprt.devices.boards.BoardProfile.usable_mib`, which already sets the OS and the CUDA
context plus torch aside (see :mod:`stoprt.devices.boards`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import nn

from ...runtime import layers as L
from ...runtime.kinds import INPUT, OUTPUT, STATS, StepContext, Steps
from .dataflow import trace_network

MIB = 2**20
MODES = ("stop", "bptt", "infer")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Optimizer state tensors per learned parameter.
OPTIMIZER_COPIES = {"sgd": 0, "sgd-momentum": 1, "adam": 2}
LEARN_KINDS = ("weight", "threshold", "leak")

# RSS of a CPU process after importing torch and stoprt and a warm-up training sample, less the
# network's parameters and optimizer state: 306-324 MiB measured for mlp ... vgg11 with torch 2.13 (CPU
# wheel), Python 3.11, x86-64, glibc (``stoprt profile`` reports ``rss_baseline_mib`` and
# ``persistent_mib`` on any machine; examples/benchmarks/planner_bench.py prints the difference).
CPU_RUNTIME_OVERHEAD_MIB = 320.0
# The CUDA caching allocator rounds every block up to 512 bytes. ``max_memory_reserved`` exceeds the
# allocated peak by fragmentation; 10% is an assumption to be checked with examples/device/gpu_profile.sh.
CUDA_BLOCK = 512
CUDA_RESERVED_SLACK = 0.10

EVERY, PREV, FROM1, LAST, ONCE, STEP0 = (Steps.EVERY, Steps.PREV, Steps.FROM1, Steps.LAST, Steps.ONCE,
                                          Steps.STEP0)


def _steps_alive(flags: Steps, T: int, window_all: bool) -> int:
    """How many copies of a per-step tensor are alive at the end of the last step's forward (the peak):
    those of all kept steps (BPTT) or only the last step's."""
    if not flags or T < 1:
        return 0
    if flags & ONCE:
        return 1
    if flags & STEP0:  # made by step 0 only (the zero initial state broadcast against the threshold)
        return int(window_all)
    if not window_all or T == 1:
        return int(bool(flags & (EVERY | LAST)) or (bool(flags & FROM1) and T >= 2))
    if flags & EVERY:
        return T
    # PREV: steps 0..T-2 (saved by the next step); FROM1: steps 1..T-1; LAST: step T-1.
    return int(bool(flags & PREV)) + (T - 2) * bool(flags & (PREV | FROM1)) + int(bool(flags & (FROM1 | LAST)))


@dataclass
class MemoryPlan:
    """Predicted memory of one configuration, in bytes; ``total`` is what the budget must hold."""

    mode: str
    batch: int
    T: int
    dtype: str
    device: str
    parameters: int
    buffers: int
    optimizer_state: int
    gradients: int
    state: int          # state and traces the layers hold (u, s, traces, masks)
    activations: int    # saved for backward, beyond what is state
    transient: int      # working set of the largest layer's step (forward temporaries, backward grads)
    update_transient: int  # during the optimizer update: the learner's rollback copy, optimizer temporaries
    overhead: int       # process / runtime overhead outside the tensors
    notes: list[str] = field(default_factory=list)

    @property
    def saved_and_state(self) -> int:
        """Distinct storages saved for backward plus the state tensors (the exact hook view)."""
        return self.state + self.activations

    @property
    def persistent(self) -> int:
        """What exists before a sample starts: parameters, buffers, optimizer state."""
        return self.parameters + self.buffers + self.optimizer_state

    @property
    def sample_peak(self) -> int:
        """The peak a sample adds on top of the persistent part (the RSS / allocator delta): gradients
        plus the larger of a step's working set and the update's (after the graph is freed)."""
        return self.gradients + max(self.saved_and_state + self.transient, self.state + self.update_transient)

    @property
    def total(self) -> int:
        return self.overhead + self.persistent + self.sample_peak

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("saved_and_state", "persistent", "sample_peak", "total"):
            out[name] = getattr(self, name)
        out["mib"] = {k: v / MIB for k, v in out.items() if isinstance(v, int) and k not in ("batch", "T")}
        return out


class MemoryPlanner:
    """Memory model of ``net`` for any mode, batch, T and dtype (one dry run, then arithmetic).

    Args:
        net: a network of stoprt layers (e.g. from :func:`stoprt.runtime.models.build_model`).
        input_shape: one step's input without batch; default ``net.input_shape``.
    """

    def __init__(self, net: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        input_shape = input_shape or getattr(net, "input_shape", None)
        if input_shape is None:
            raise ValueError("the planner needs the input shape: build the network with "
                             "Sequential(..., input_shape=...) or pass input_shape")
        self.net, self.input_shape = net, tuple(input_shape)
        self.calls, self.shapes = trace_network(net, self.input_shape)  # shapes: [*shape] per value, no batch
        self.params = list(net.parameters())  # distinct: a shared leak counts once
        self._ledgers: dict[tuple, dict] = {}

    # ---- which parameters learn -----------------------------------------------------------
    def learned(self, mode: str, learn: tuple[str, ...] = LEARN_KINDS, freeze_batchnorm: bool = True) -> set[int]:
        """ids of the parameters that get gradients in ``mode`` (as STOP / BPTT set requires_grad)."""
        if mode == "infer":
            return set()
        out = set()
        for m in self.net.modules():
            own = dict(m.named_parameters(recurse=False))
            if isinstance(m, L.BatchNorm2d):
                kinds = {n: None if (mode == "stop" or freeze_batchnorm) else "bn" for n in own}
            elif L.layer_kind(m, strict=False) == L.NEURON:
                kinds = {"leak": "leak", "threshold": "threshold"}
            else:
                kinds = {n: "weight" for n in own}
            for name, p in own.items():
                kind = kinds.get(name)
                if p.requires_grad and kind and (mode == "bptt" or kind in learn):
                    out.add(id(p))
        return out

    # ---- what the layers keep ---------------------------------------------------------------
    def _ledger(self, mode: str, learn: tuple[str, ...], freeze_batchnorm: bool, loss: str) -> dict:
        """storage key -> [numel per sample, fixed numel, element size (None: the dtype's), saved steps,
        state steps], from the layers' declarations; cached per configuration, so a plan is arithmetic."""
        cache_key = (mode, learn, freeze_batchnorm, loss)
        if cache_key in self._ledgers:
            return self._ledgers[cache_key]
        learned = self.learned(mode, learn, freeze_batchnorm)
        items: dict = {}
        alias: dict[int, int] = {}  # value -> the value it is a view of
        grad = {0: False}  # value -> whether it requires grad (the network input does not)

        def val(v: int) -> int:
            return alias.get(v, v)

        def numel(v: int) -> int:  # per sample: shapes exclude the batch
            return math.prod(self.shapes[v])

        def learns(p) -> bool:
            return p is not None and id(p) in learned

        def add(key, per_sample: int, steps: Steps, state: bool = False, fixed: int = 0, elsize=None) -> None:
            item = items.setdefault(key, [per_sample, fixed, elsize, Steps(0), Steps(0)])
            item[4 if state else 3] |= steps

        for i, c in enumerate(self.calls):
            vin = val(c.inp)
            ctx = StepContext(mode, grad[vin], learns, freeze_batchnorm)
            kept = L.step_keeps(c.module, ctx)
            if kept is None:  # a view: its output is its input's storage
                alias[c.out] = vin
                continue
            grad[c.out] = ctx.train and (ctx.input_grad or any(learns(p) for p in c.module.parameters()))
            for k in kept:
                key = ("v", vin) if k.name == INPUT else ("v", c.out) if k.name == OUTPUT else (k.name, i)
                sized = {INPUT: vin, OUTPUT: c.out}.get(k.size)
                add(key, 0 if sized is None else numel(sized), k.steps, k.state,
                    0 if sized is not None else k.size, k.elsize)
        if mode != "infer":
            classes = numel(val(self.calls[-1].out))
            if loss == "ce":  # log-softmax output each step; the step's target; nll's total weight
                add(("log_softmax",), classes, EVERY)
                add(("target",), 1, ONCE, elsize=8)
                add(("nll_weight",), 0, EVERY, fixed=1)
            else:  # mse: the output and the float one-hot target
                add(("v", val(self.calls[-1].out)), classes, EVERY)
                add(("one_hot",), classes, EVERY)
        self._ledgers[cache_key] = items
        return items

    # ---- the estimate ---------------------------------------------------------------------
    def plan(self, mode: str = "stop", batch: int = 1, T: int = 10, dtype: str = "float32",
             optimizer: str = "adam", learn: tuple[str, ...] = LEARN_KINDS, freeze_batchnorm: bool = True,
             loss: str = "ce", device: str = "cpu") -> MemoryPlan:
        """Predicted memory of one training sample (or an inference stream) of ``T`` steps."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
        if optimizer not in OPTIMIZER_COPIES:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZER_COPIES)}")
        if batch < 1 or T < 1:
            raise ValueError(f"batch and T must be at least 1, got batch={batch}, T={T}")
        unknown = set(learn) - set(LEARN_KINDS)
        if unknown:
            raise ValueError(f"unknown kinds to learn {sorted(unknown)}; choose from {LEARN_KINDS}")
        size = DTYPE_BYTES[dtype]
        cuda = device.startswith("cuda")

        def nbytes(numel: int, elsize: int | None = None) -> int:
            elsize = size if elsize is None else max(size, 4) if elsize == STATS else elsize
            b = numel * elsize
            return -(-b // CUDA_BLOCK) * CUDA_BLOCK if cuda and b else b

        learned = self.learned(mode, tuple(learn), freeze_batchnorm)
        ledger = self._ledger(mode, tuple(sorted(learn)), freeze_batchnorm, loss)
        state = activations = 0
        for numel, fixed, elsize, saved_flags, state_flags in ledger.values():
            b = nbytes(numel * batch + fixed, elsize)  # [B, *shape] per sample, plus a fixed count
            held_state = _steps_alive(state_flags, T, False)
            state += b * held_state
            activations += b * (_steps_alive(saved_flags | state_flags, T, mode == "bptt") - held_state)
        learned_params = [p for p in self.params if id(p) in learned]
        learned_bytes = sum(nbytes(p.numel()) for p in learned_params)
        opt = OPTIMIZER_COPIES[optimizer] * learned_bytes
        if optimizer == "adam":
            opt += len(learned_params) * nbytes(1, 4)  # each parameter's step counter
        buffers = sum(nbytes(b.numel(), None if b.is_floating_point() else b.element_size())
                      for b in self.net.buffers())
        notes = []
        if mode == "stop":
            notes.append("STOP: memory does not depend on T (one step's graph, fixed-size traces)")
        return MemoryPlan(
            mode=mode, batch=batch, T=T, dtype=dtype, device=device,
            parameters=sum(nbytes(p.numel()) for p in self.params), buffers=buffers, optimizer_state=opt,
            gradients=learned_bytes, state=state, activations=activations,
            transient=self._transient(mode, batch, nbytes),
            update_transient=self._update_transient(learned_params, optimizer, cuda, nbytes),
            overhead=0 if cuda else int(CPU_RUNTIME_OVERHEAD_MIB * MIB), notes=notes)

    def _transient(self, mode: str, batch: int, nbytes) -> int:
        """Working set of one step beyond what is kept: the step's input frame, and for the largest
        layer its input and output plus three output-sized temporaries (forward: the leak term, the
        membrane, the spike; backward: output gradient, surrogate derivative, membrane gradient).
        Training adds the largest weight gradient before it reaches ``.grad``: one copy under STOP
        (one backward per step adds it in place), two under BPTT (autograd sums the T steps'
        contributions out of place in the accumulation buffer)."""
        frame = nbytes(math.prod(self.input_shape) * batch)
        # per call: its input [B, *in] and three output-sized temporaries besides the output [B, *out]
        widest = max(nbytes((math.prod(self.shapes[c.inp]) + 3 * math.prod(self.shapes[c.out])) * batch)
                     for c in self.calls)
        if mode == "infer":
            return frame + widest
        weight = max((nbytes(p.numel()) for p in self.params), default=0)
        return frame + widest + (2 if mode == "bptt" else 1) * weight

    @staticmethod
    def _update_transient(learned: list, optimizer: str, cuda: bool, nbytes) -> int:
        """Temporaries of :meth:`Learner._apply_update`: a copy of every learned parameter (kept to roll
        back an update that makes NaN/Inf; the finiteness checks are a sum per tensor) and the
        optimizer's own: Adam's ``sqrt(v) / c`` makes two parameter-sized temporaries at a time in
        torch's per-tensor CPU loop and one per parameter at once in the foreach (CUDA) path; SGD
        updates in place."""
        if not learned:
            return 0
        largest = max(p.numel() for p in learned)
        copy_all = sum(nbytes(p.numel()) for p in learned)
        if optimizer != "adam":
            temps = 0
        else:
            temps = copy_all if cuda else 2 * nbytes(largest)
        return copy_all + temps
