"""Analytic memory model of a stoprt network: training (STOP, BPTT) and streaming inference.

A dry run at batch 1 walks the network's layers in execution order and records every tensor that flows
between them (shape, producer, which value is a view of which). Per layer type, rules then say what
each mode keeps, derived from what our layers and torch's kernels save for backward:

==================  =========================================  ============================================
layer               STOP (one step's graph + state)            BPTT (every step's graph kept)
==================  =========================================  ============================================
Linear / Conv2d     state: input-shaped w_trace, scalar        its input (conv: always; linear: when the
                    b_trace (TracedSynapse saves only these)    weight learns)
BatchNorm2d         frozen: its input (eval batch_norm)         same; unfrozen: input + mean/invstd [C]
LIF (soft reset)    state: u, s, th_trace, a_trace;            s[t-1] (for th*s), a(U - th s) (for the
                    saved: u - th (spike's surrogate)           leak), u - th; state u, s of the last step
LIF soft_nodecay    as soft                                    U[t-1] instead of a(U - th s)
LIF hard            (STOP refuses it)                          U[t-1] and (1 - s[t-1])
LeakyReadout        state: u, a_trace                          U[t-1] (for the leak); state u
Avg/AdaptivePool    its input (a pool to 1x1 is a mean: none)   its input (to 1x1: none)
MaxPool2d           its input + int64 indices                  its input + int64 indices
Dropout             one mask per sample (state, saved)         the same mask
Flatten, Identity   nothing (views)                            nothing
loss (CE)           log-softmax [B, K], target, a scalar       the same, every step
==================  =========================================  ============================================

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

from ..runtime import layers as L
from .dataflow import LayerCall, global_mean, trace_network

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

STATS = "stats"  # element size of BatchNorm's saved statistics: float32, or the dtype if wider

# Flags saying at which steps a tensor is alive at the end of the last step's forward (the peak).
EVERY, PREV, FROM1, LAST, ONCE, STEP0 = 1, 2, 4, 8, 16, 32


def _steps_alive(flags: int, T: int, window_all: bool) -> int:
    """How many copies of a per-step tensor are alive: all kept steps (BPTT) or only the last one."""
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
        self.calls, self.shapes = trace_network(net, self.input_shape)
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
            elif isinstance(m, L._Neuron):
                kinds = {"leak": "leak", "threshold": "threshold"}
            else:
                kinds = {n: "weight" for n in own}
            for name, p in own.items():
                kind = kinds.get(name)
                if p.requires_grad and kind and (mode == "bptt" or kind in learn):
                    out.add(id(p))
        return out

    # ---- the per-layer rules --------------------------------------------------------------
    def _ledger(self, mode: str, learn: tuple[str, ...], freeze_batchnorm: bool, loss: str) -> dict:
        """key -> [numel per sample, fixed numel, element size (None: the dtype's), saved flags,
        state flags]; cached per configuration, so a plan is arithmetic on it."""
        cache_key = (mode, learn, freeze_batchnorm, loss)
        if cache_key in self._ledgers:
            return self._ledgers[cache_key]
        learned = self.learned(mode, learn, freeze_batchnorm)
        items: dict = {}
        shapes, alias = self.shapes, {}
        rg = {0: False}

        def val(v: int) -> int:
            return alias.get(v, v)

        def n(v: int) -> int:
            return math.prod(shapes[v])

        def add(key, numel: int, flags: int, state: bool = False, fixed: int = 0, elsize: int | str | None = None):
            item = items.setdefault(key, [numel, fixed, elsize, 0, 0])
            item[4 if state else 3] |= flags

        def learns(p) -> bool:
            return p is not None and id(p) in learned

        train = mode != "infer"
        for i, c in enumerate(self.calls):
            m, vin, vout = c.module, val(c.inp), c.out
            rin = rg[vin]
            if c.kind == "view":
                continue
            if c.kind == "add":
                rg[vout] = rin or any(learns(p) for p in m.parameters())
            elif c.kind == "synapse":
                w, b = learns(m.weight), learns(m.bias)
                rg[vout] = rin or w or b
                if mode == "stop":
                    if w:
                        add(("w_trace", i), n(vin), EVERY, state=True)
                    if b:
                        add(("b_trace", i), 0, EVERY, state=True, fixed=1)
                elif mode == "bptt" and (w or (rin and isinstance(m, L.Conv2d))):
                    add(("v", vin), n(vin), EVERY)
            elif c.kind == "bn":
                trains = mode == "bptt" and not freeze_batchnorm
                rg[vout] = rin or any(learns(p) for p in m.parameters())
                if train and rg[vout] and trains:
                    add(("v", vin), n(vin), EVERY)
                    # save_mean and save_invstd, one value per channel (float32 or wider)
                    add(("bn_stats", i), 0, EVERY, fixed=2 * m.num_features, elsize=STATS)
                elif train and rin:  # frozen: x * scale + shift keeps only the (cached) per-channel scale
                    add(("bn_scale", i), 0, ONCE, fixed=m.num_features)
            elif c.kind in ("lif", "readout"):
                th = learns(getattr(m, "threshold", None))
                lk = learns(m.leak)
                u = ("u", i) if c.kind == "lif" else ("v", vout)
                rg[vout] = train and (rin or th or lk)
                if not train:
                    add(u, n(vout), LAST, state=True)
                    add(("v", vout), n(vout), LAST, state=True)
                elif mode == "stop":  # backward keeps U[t] (the state) and the traces, nothing else
                    add(u, n(vout), EVERY, state=True)
                    add(("v", vout), n(vout), EVERY, state=True)
                    if th:
                        add(("th_trace", i), n(vout), FROM1, state=True)
                    if lk:
                        add(("a_trace", i), n(vout), FROM1, state=True)
                else:
                    self._bptt_neuron(add, c, i, u, n(vout), th, lk, rg[vout])
            elif c.kind in ("pool", "maxpool"):
                rg[vout] = rin
                if train and rin and not global_mean(m) and not isinstance(m, L.AvgPool2d):
                    add(("v", vin), n(vin), EVERY)
                    if c.kind == "maxpool":
                        add(("indices", i), n(vout), EVERY, elsize=8)
            elif c.kind == "dropout":
                if not train or m.p == 0.0:
                    alias[vout] = vin
                    continue
                rg[vout] = rin
                add(("mask", i), n(vin), ONCE, state=True)
        if train:
            out, classes = val(self.calls[-1].out), n(val(self.calls[-1].out))
            if loss == "ce":  # log-softmax output each step; the step's target; nll's total weight
                add(("log_softmax",), classes, EVERY)
                add(("target",), 1, ONCE, elsize=8)
                add(("nll_weight",), 0, EVERY, fixed=1)
            else:  # mse: the output and the float one-hot target
                add(("v", out), classes, EVERY)
                add(("one_hot",), classes, EVERY)
        self._ledgers[cache_key] = items
        return items

    @staticmethod
    def _bptt_neuron(add, c: LayerCall, i: int, u, numel: int, th: bool, lk: bool, rg_x: bool) -> None:
        """What the plain dynamics (functional.lif_step / readout_step) save at every step."""
        add(u, numel, LAST, state=True)
        add(("v", c.out), numel, LAST, state=True)
        reset = getattr(c.module, "reset", None)
        if reset is None:  # readout: leak * U[t-1]
            if lk:
                add(u, numel, PREV)
            return
        # Step 0 starts from scalar zeros: the saved tensors are scalars or threshold-shaped there.
        if th and reset in ("soft", "soft_nodecay"):
            add(("v", c.out), numel, PREV)  # th * s[t-1] keeps s[t-1]
            add(("s0", i), 0, STEP0, fixed=1)
        if reset == "soft" and lk:
            add(("carried", i), numel, FROM1)  # leak * (U - th s) keeps U - th s
            add(("carried0", i), 0, STEP0, fixed=c.module.threshold.numel())
        if reset in ("soft_nodecay", "hard") and lk:
            add(u, numel, PREV)  # leak * U[t-1] keeps U[t-1]
            add(("u0", i), 0, STEP0, fixed=1)
        if reset == "hard":
            add(("keep", i), numel, FROM1)  # (a U) * (1 - s) keeps 1 - s
            if lk:
                add(("keep0", i), 0, STEP0, fixed=1)
        if rg_x:
            add(("x", i), numel, EVERY)

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
            b = nbytes(numel * batch + fixed, elsize)
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
