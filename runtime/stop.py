"""STOP: online learning of weights, thresholds and leaks with forward traces (Gao et al. 2024).

How one step works (the whole rule; the traces live in the layers, see ``functional.py``):

1. forward the step once: each synaptic op advances its input trace ``w_tr = a w_tr + x`` (``a`` the
   leak of the neuron layer it feeds), each LIF its threshold and leak traces, and all state is
   detached, so the step's graph reaches back to no earlier step;
2. ``E[t].backward()``: autograd carries the same-step spatial errors down through the layers; where
   a gradient reaches a parameter, the autograd functions use the trace instead of the input or the
   history: ``dW += delta (x) w_tr``, ``db += delta b_tr``, ``dth += delta (th_tr - 1)``,
   ``da += sum(delta a_tr)``;
3. on the update schedule, the optimizer applies ``.grad`` and thresholds and leaks are clamped into
   their ranges.

Memory: previous-step state, the traces and one step's graph, whatever the length of the sample.

That is the eager learner (``compile="eager"``), the reference. ``compile="static"`` (and ``"auto"``,
the default) runs the same rule as a static program without autograd: :mod:`stoprt.runtime.static`;
``compile="fused"`` compiles that program's steps with ``torch.compile``: :mod:`stoprt.runtime.fused`.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import Tensor, nn

from . import layers as L
from .learner import Learner, LearnerStats, LossFn
from .static import CaptureError, Unsupported
from .static_engine import StaticEngine
from .update_schedule import check_update_schedule, update_due
from .wiring import wire

KINDS = ("weight", "threshold", "leak")
COMPILE_MODES = ("auto", "static", "fused", "eager")


class STOP(Learner):
    """The STOP learner.

    Args:
        net: network of stoprt layers (see :mod:`stoprt.runtime.wiring` for what is supported).
        optimizer: ``torch.optim`` optimizer over (some of) ``net``'s parameters; those it does not
            hold stay frozen.
        learn: which kinds to learn, any subset of ``("weight", "threshold", "leak")`` (STOP-W, -WT,
            -WL, -WTL). ``"weight"`` covers synaptic weights and biases. BatchNorm is frozen.
        update: ``"sample"`` (apply at :meth:`end_sample`), ``"step"`` (every step, fully online) or
            an int k (every k steps, and at the end of a sample for the rest).
        loss: see :class:`~stoprt.runtime.learner.Learner`.
        compile: how steps run. ``"eager"``: autograd through the layers' STOP functions (the
            reference). ``"static"``: the network compiled into a static program with preallocated
            state, traces and gradients and no host synchronisation inside a step
            (:mod:`stoprt.runtime.static`); on CUDA its learning step, update and inference step are
            captured as CUDA graphs and replayed. ``"auto"`` (default): static (with graphs on CUDA);
            on CPUs too, where it measured faster than eager (1 thread, batch 1, demo MLP, STOP-WTL
            with Adam: learn step ~0.55x eager's time, inference step 0.7-0.9x; ``torch.compile`` of
            the inference step was no faster than the plain Python ops there, after a 20 s
            compile). ``"fused"``: the static program's steps compiled by ``torch.compile``
            (Inductor fuses the neuron and trace updates into few kernels; still CUDA graphs on
            CUDA), at the price of compiling at the first step of each batch size, seconds to
            tens of seconds (:mod:`stoprt.runtime.fused`); the static step unfused, with one
            warning, if compiling fails. Eager where the static step cannot run, with one
            warning saying why, except for a callable loss under ``"auto"`` (the static step knows
            only the gradients of ``"ce"`` and ``"mse"``), which silently stays eager.

    Use::

        for x_t in sample:            # x_t: [B, *input_shape]
            out = learner.step(x_t, target=y)
        prediction = learner.end_sample()
    """

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer,
                 learn: Iterable[str] = KINDS, update: str | int = "sample",
                 loss: str | LossFn = "ce", check_inputs: bool = True, keep_last_good: bool = True,
                 compile: str = "auto") -> None:
        learn = tuple(learn)
        unknown = set(learn) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds to learn {sorted(unknown)}; choose from {KINDS}")
        check_update_schedule(update)
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        super().__init__(net, optimizer, loss, check_inputs, keep_last_good)
        self.learn, self.update = learn, update
        for m in net.modules():
            if isinstance(m, L.Synapse) and "weight" not in learn:
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.requires_grad_(False)
            # Thresholds and leaks follow the layer's own learn flags (so an earlier learner that
            # switched them off does not leave them frozen), the kinds asked for and the optimizer.
            if isinstance(m, L.LIF):
                m.threshold.requires_grad_("threshold" in learn and m.learn_threshold
                                           and id(m.threshold) in self._held)
            if isinstance(m, L.Neuron):
                m.leak.requires_grad_("leak" in learn and m.learn_leak and id(m.leak) in self._held)
        L.freeze_batchnorm(net)
        self.wiring = wire(net)
        L.set_stop_mode(net, True)
        L.reset_state(net)
        self._steps_since_update = 0
        self._untraced = False  # an infer() step ran in this sample: it cannot learn
        self.compile = compile
        self._static: StaticEngine | None = None
        if compile != "eager":
            self._start_static(compile)

    @property
    def mode(self) -> str:
        """How steps run now: ``"eager"``, ``"static"``, ``"graphs"`` (static, replayed as CUDA graphs),
        ``"fused"`` (static, compiled) or ``"fused_graphs"`` (compiled and replayed as CUDA graphs)."""
        engine = self._static
        if engine is None:
            return "eager"
        if engine.fused:
            return "fused_graphs" if engine.use_graphs else "fused"
        return "graphs" if engine.use_graphs else "static"

    def _start_static(self, compile: str) -> None:
        if self.loss_grad is None:
            reason = "a callable loss has no explicit gradient in the static step"
            if compile in ("static", "fused"):
                self._fall_back(reason)
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        device = params[0].device if params else torch.device("cpu")
        try:
            self._static = StaticEngine(self, graphs=device.type == "cuda", fused=compile == "fused")
        except Unsupported as err:
            self._fall_back(str(err))

    def _fall_back(self, reason: str) -> None:
        """Run eagerly from now on (at a sample boundary), saying why once."""
        warnings.warn(f"stoprt: STOP runs eager instead of static: {reason}", RuntimeWarning, stacklevel=3)
        if self._static is not None:
            self._static.reset()
            self.stats = LearnerStats(**self.stats.as_dict())
            self._static = None
            L.reset_state(self.net)  # the layers pointed at the program's buffers

    def step(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """Run one time step ``x`` ``[B, *input_shape]``; learn from ``target`` ``[B]`` if given.

        Returns the step's output (spikes or readout potential), detached. Without a target the
        traces still advance, so a later labelled step of the same sample learns correctly.
        """
        if target is not None and self._untraced:
            raise ValueError("this sample ran infer() steps, which do not advance the traces, so it cannot "
                             "learn; call end_sample() first, or use step(x) for the unlabelled steps")
        return self._step(x, target, traced=True)

    def infer(self, x: Tensor) -> Tensor:
        """A step of a sample that will not learn (streaming inference): the network's state advances,
        its traces do not, which makes it cheaper than ``step(x)`` (about a plain forward). Returns
        the same output as ``step(x)``. A ``step(x, target)`` later in the same sample is refused
        (ValueError). Eager learners advance the traces anyway (their layers do it), with the same
        refusal."""
        self._untraced = True
        return self._step(x, None, traced=False)

    def _step(self, x: Tensor, target: Tensor | None, traced: bool) -> Tensor:
        if self._static is not None:
            try:
                return self._static.step(x, target, traced)
            except CaptureError as err:  # only at a sample's first step: nothing to carry over
                self._fall_back(f"CUDA graph capture failed: {err}")
        with torch.set_grad_enabled(target is not None):
            out = self._forward(x)
            if target is not None:
                self._loss(out, target).backward()
                self._steps_since_update += 1
        if update_due(self.update, self._steps_since_update):
            self._update()
        return out.detach()

    def end_sample(self) -> Tensor | None:
        """End the sample: apply pending gradients, reset state and traces.

        Returns the sample's prediction ``[B]`` (argmax of the summed outputs) or None if no step ran.
        """
        self._untraced = False
        if self._static is not None:
            return self._static.end_sample()
        self._update()
        return self._finish_sample()

    def _update(self) -> None:
        if self._steps_since_update:
            self._apply_update()
            self._steps_since_update = 0

    @torch.no_grad()
    def predict(self, x_seq: Tensor) -> Tensor:
        self._untraced = False
        if self._static is not None:
            self._static.reset()  # as in eager: a sample in progress is discarded
        return super().predict(x_seq)

    def graph_pool_bytes(self) -> int | None:
        """Device memory the CUDA graphs' private pool took when captured; None without graphs."""
        if self._static is None or not self._static.use_graphs:
            return None
        return sum(r.pool_bytes for r in self._static.programs.values())

    def __repr__(self) -> str:
        return (f"STOP(learn={self.learn}, update={self.update!r}, layers={len(self.wiring)} synaptic, "
                f"mode={self.mode!r})")
