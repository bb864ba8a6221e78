"""How a STOP learner runs its steps under ``compile="static"`` (or ``"fused"``): one
:class:`~.static.Program` per input shape, the guarded update of :mod:`.static_update`, the steps
compiled by ``torch.compile`` under ``"fused"`` (:mod:`.fused`), and (on CUDA) replayed as CUDA graphs
(:mod:`.graphs`).

Host work per step: the shape checks, and, for inputs and labels that live in host memory (always
on a CPU), the same NaN/Inf and label-range checks as the eager learner, with the same errors at the
same step. Inputs already on an accelerator are checked on the device instead (a host check would
synchronise): the first offending step is recorded and the same ``ValueError`` is raised by
:meth:`StaticEngine.end_sample` (after the sample is reset; its updates were refused by the guard
or are discarded with it).

A new batch size gets a new program at a sample boundary; a change within a sample is the eager
learner's error.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor

from .learner import all_finite
from .static import CaptureError, Program, compile_net
from .static_update import DeviceStats, GuardedUpdate
from .update_schedule import update_due

log = logging.getLogger("stoprt")


class StaticEngine:
    """The static step of one :class:`~stoprt.runtime.stop.STOP` learner (see the module doc)."""

    def __init__(self, learner, graphs: bool, fused: bool = False) -> None:
        self.learner = learner
        self.use_graphs = graphs
        self.fused = fused  # turns False (with a warning) if compiling fails
        compile_net(learner.net)  # raises Unsupported now rather than at the first step
        self.update = GuardedUpdate(learner.optimizer, learner.net, learner.keep_last_good,
                                    lambda: learner.grad_sync)
        self.programs: dict[torch.Size, object] = {}
        self.program: Program | None = None
        self.runner = None
        old = learner.stats
        learner.stats = DeviceStats(self.update.counts, self._last_loss)
        for k, v in old.as_dict().items():
            setattr(learner.stats, k, v)
        self._seen = [0, 0, 0, 0]  # counters at the last end_sample (for its warnings)
        self._loss_program: Program | None = None  # holds the last learning step's output and labels
        # Where inputs and labels are checked: None = by where they live (host memory: on the host);
        # True / False force the device / host checks (tests use it to run the device path on a CPU).
        self.device_checks: bool | None = None
        self._on_host = self._check_host = True  # set per sample by _start_sample

    # ---- programs -------------------------------------------------------------------------------
    def _runner(self, x: Tensor):
        key = (x.shape, x.device, x.dtype)
        if key not in self.programs:
            lr = self.learner
            program = Program(lr.net, lr.loss_grad, x, self.update.grads, device_checks=self._on_device(x))
            compiled = self._compiled(program, x) if self.fused else None
            if self.use_graphs:
                self.programs[key] = self._captured(program, x, compiled)
            else:
                self.programs[key] = _DirectSteps(program, self.update) if compiled is None else compiled
        runner = self.programs[key]
        self.program = runner.program
        return runner

    def _captured(self, program: Program, x: Tensor, compiled):
        """The steps as CUDA graphs; compiled steps that cannot be captured leave the unfused ones
        captured (said once). A failure to capture those is the learner's (it runs eager)."""
        from .graphs import CapturedSteps  # noqa: PLC0415  (CUDA only)
        if compiled is not None:
            try:
                return CapturedSteps(program, self.update, x, compiled)
            except CaptureError as err:
                self._unfuse(f"the compiled steps could not be captured as CUDA graphs: {err}")
        return CapturedSteps(program, self.update, x)

    def _compiled(self, program: Program, x: Tensor):
        """The program's steps compiled, or None (unfused from now on, said once) if that fails."""
        from .fused import CompiledSteps, FuseError  # noqa: PLC0415  (imports torch._dynamo: only here)
        try:
            return CompiledSteps(program, self.update, x)
        except FuseError as err:
            self._unfuse(str(err))
            return None

    def _unfuse(self, reason: str) -> None:
        """Run the static step unfused from now on, saying why (once: later programs are not compiled)."""
        self.fused = False
        warnings.warn(f"stoprt: STOP runs the static step unfused: {reason}", RuntimeWarning, stacklevel=8)

    def state(self) -> list[Tensor]:
        """The buffers of the current program (empty before the first step)."""
        return [] if self.program is None else self.program.state()

    # ---- steps ----------------------------------------------------------------------------------
    def step(self, x: Tensor, target: Tensor | None, traced: bool = True) -> Tensor:
        """One step; ``traced=False`` (no target): the program's ``predict``, which leaves the traces."""
        lr = self.learner
        lr._check_shape(x)
        if lr.sample_steps == 0:
            self._start_sample(x)
        # (at batch 1 on a CPU the program's step is ~30 us: each microsecond of host work here shows)
        if self._check_host and not all_finite([x]):
            raise ValueError(f"input at step {lr.sample_steps} of the sample contains NaN or Inf")
        # no_grad, switched directly: the context manager makes two objects per step (~1 us at batch 1)
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if target is None:
                out = self.runner.infer(x) if traced else self.runner.predict(x)
            else:
                if self._on_host:
                    lr._check_target(self.program.last_out, target)
                out = self.runner.learn(x, target)
                lr._steps_since_update += 1
                lr.stats.loss_override = None
                self._loss_program = self.program
                if update_due(lr.update, lr._steps_since_update):
                    self._apply_update()
            lr.sample_steps += 1
            lr.stats.steps += 1
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        return out.clone()

    def _start_sample(self, x: Tensor) -> None:
        """The program for ``x``'s shape, and where this sample's inputs are checked (decided once: a
        sample keeps its shape, device and dtype)."""
        self.runner = self._runner(x)
        self.program.start_sample()
        self.learner.output_sum = self.program.output_sum  # the learner's view of the sample (see Learner)
        self._on_host = not self._on_device(x)
        self._check_host = self.learner.check_inputs and self._on_host

    def _on_device(self, x: Tensor) -> bool:
        return x.device.type != "cpu" if self.device_checks is None else self.device_checks

    def _apply_update(self) -> None:
        lr = self.learner
        if lr._steps_since_update:
            self.runner.update(sync=lr.grad_sync is not None)
            lr._steps_since_update = 0

    def end_sample(self) -> Tensor | None:
        lr = self.learner
        if self.program is None or lr.sample_steps == 0:
            lr._sample_shape = None
            return None
        self._apply_update()  # (GuardedUpdate runs without autograd itself)
        prediction = self.program.output_sum.argmax(1)
        if self._on_host:  # two reads of host memory; on a device one (a synchronisation) per sample
            flags = self.update.counts.tolist() + self.program.bad.tolist()
        else:
            flags = torch.cat([self.update.counts, self.program.bad]).tolist()
        self.reset()
        lr.stats.samples += 1
        self._report(flags)
        return prediction

    def _report(self, flags: list[int]) -> None:
        counts, (bad_input, bad_label) = flags[:4], flags[4:]
        rejected, failed = counts[1] - self._seen[1], counts[3] - self._seen[3]
        self._seen = counts
        if rejected:
            log.warning("stoprt: %d update(s) refused in this sample: a gradient or an updated parameter was "
                        "NaN or Inf; parameters keep their last good values", rejected)
        if bad_input and self.learner.check_inputs:
            raise ValueError(f"input at step {bad_input - 1} of the sample contains NaN or Inf")
        if bad_label and self.learner.check_inputs:
            raise ValueError(f"labels out of range: the network has {self.program.classes} classes "
                             f"(at step {bad_label - 1} of the sample)")
        if failed:
            raise FloatingPointError("an update from finite gradients made a parameter NaN or Inf "
                                     "(keep_last_good=False, so it cannot be undone)")

    def reset(self) -> None:
        """Discard the sample in progress (buffers zeroed in place)."""
        lr = self.learner
        if self.program is not None:
            self.program.reset()
        lr._sample_shape, lr.sample_steps, lr.output_sum = None, 0, None

    def _last_loss(self) -> float:
        p = self._loss_program
        if p is None:
            return float("nan")
        with torch.no_grad():
            return float(self.learner.loss_fn(p.last_out, p.target))


class _DirectSteps:
    """The program's steps called directly (CPU; or a device without graphs)."""

    def __init__(self, program: Program, update: GuardedUpdate) -> None:
        self.program, self._update = program, update
        self.learn, self.infer, self.predict = program.learn, program.infer, program.predict

    def update(self, sync: bool = False) -> None:
        self._update()
