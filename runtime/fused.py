"""The static STOP step compiled by ``torch.compile``: ``STOP(compile="fused")``.

A static program's steps (:mod:`stoprt.runtime.static`) are plain tensor code on fixed buffers, with
no Python branch on a tensor value, so TorchDynamo captures each step whole (``fullgraph=True``)
and Inductor fuses the elementwise chains of the neuron and trace updates, the surrogate gradient
and the accumulations into a few kernels: C++ loops on a CPU, Triton kernels on a GPU, where
:mod:`stoprt.runtime.graphs` then captures the compiled steps as CUDA graphs. At streaming batch
sizes a GPU step costs a few microseconds per kernel, so fewer kernels is what makes it faster.

The price is compiling: at the first step of each (model, batch size), seconds to tens of seconds
(Inductor caches what it built on disk, so a later process of the same model is quicker). That is
why ``compile="auto"`` does not choose it: a stream's first step must come at once.

Each step copies its input and labels into tensors of its own first: the compiled code is
specialised to them (shape, strides, dtype), so whatever layout a caller's views have, the step is
never compiled again. Dynamo keeps its compiled graphs per function (``Program.learn``, ...) for the
whole process, shared by every program of the same structure; past ``torch._dynamo.config.
recompile_limit`` (8) different ones in a process, compiling fails and the learner runs unfused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .static import Program
from .static_update import GuardedUpdate


class FuseError(RuntimeError):
    """Compiling the static step failed (the learner runs the static step unfused)."""


class CompiledSteps:
    """A program's ``learn`` / ``infer`` / ``predict`` compiled, with the program's update.

    ``learn_on`` / ``infer_on`` / ``predict_on``: the compiled functions themselves, called on
    ``x`` and ``target`` (what :class:`~stoprt.runtime.graphs.CapturedSteps` captures). Compiling
    happens here, on zeros, so that a failure is a :class:`FuseError` now, not at a stream's step;
    the buffers and gradients are zeroed again afterwards.
    """

    def __init__(self, program: Program, update: GuardedUpdate, x_like: Tensor) -> None:
        if x_like.dtype == torch.float64:
            # Dynamo (torch 2.13) drops the in-place updates of 0-dim float64 CPU tensors, as if they were
            # Python floats: the bias traces would stay zero. float64 is for exactness checks anyway
            raise FuseError("float64 is not fused: torch.compile drops in-place updates of 0-dim float64 "
                            "tensors (the bias traces)")
        self.program, self._update = program, update
        self.x = torch.zeros_like(x_like)
        self.target = torch.zeros_like(program.target)
        try:
            # Layouts stay as the program made them: with Inductor's layout optimisation (channels-last
            # convolutions) the compiled resnet18 step crashed the process on a CPU (torch 2.13, in a
            # strided 1x1 shortcut's convolution_backward); the buffers are fixed anyway
            self.learn_on, self.infer_on, self.predict_on = (
                torch.compile(step, fullgraph=True, dynamic=False, options={"layout_optimization": False})
                for step in (program.learn, program.infer, program.predict))
            with torch.no_grad():  # as the learner calls them (grad mode is part of what is compiled)
                self.learn_on(self.x, self.target)
                self.infer_on(self.x)
                self.predict_on(self.x)
        except Exception as err:  # noqa: BLE001  (no compiler, no Triton, a recompile limit: run unfused)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise FuseError(f"torch.compile failed: {type(err).__name__}: {first}") from err
        finally:  # what the runs on zeros left (also when one failed: the program runs on unfused)
            program.reset()
            if update.grads:
                torch._foreach_zero_(update.grads)

    def learn(self, x: Tensor, target: Tensor) -> Tensor:
        self.x.copy_(x)
        self.target.copy_(target)
        return self.learn_on(self.x, self.target)

    def infer(self, x: Tensor) -> Tensor:
        self.x.copy_(x)
        return self.infer_on(self.x)

    def predict(self, x: Tensor) -> Tensor:
        self.x.copy_(x)
        return self.predict_on(self.x)

    def update(self, sync: bool = False) -> None:
        self._update()
