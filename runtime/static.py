"""STOP's step as a static program: the network compiled once into ops that own preallocated buffers.

Under STOP every step runs the same dataflow on the same shapes (reference ``static-step.md``), so
the step can run without autograd and without allocating its state anew:

* forward: each op advances its traces and state **in place** (``out=`` the buffer itself);
* backward: the explicit same-step rule, the pure functions of :mod:`~stoprt.runtime.functional`
  (the same ones the eager learner's autograd functions call), accumulating into the parameters'
  ``.grad`` tensors, which are allocated once and zeroed in place;
* no ``.item()``, no Python branch on a tensor value, no data-dependent shape: what the step needs
  to decide stays on the device (see :mod:`~stoprt.runtime.static_update`).

A sample ends by zero-filling the buffers, which keep their addresses (zeros are exactly the eager
learner's "no state yet": every update below reduces to it on the first step). That is what lets
:mod:`~stoprt.runtime.graphs` capture the step as a CUDA graph.

The ops live in :mod:`~stoprt.runtime.static_ops`; layer types are recognised there, in
:func:`~stoprt.runtime.static_ops.compile_net`, and nowhere else in the static step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .static_ops import Unsupported, compile_net, walk  # noqa: F401  (Unsupported: re-exported)


class CaptureError(RuntimeError):
    """Capturing the static step as a CUDA graph failed (the learner runs eager)."""


class Program:
    """The compiled network for one input shape (batch size), with its output buffers.

    ``learn(x, target)``: forward, the loss's explicit gradient, the same-step backward into
    ``.grad``; ``infer(x)``: forward only (the traces still advance, as in the eager learner).
    Both return the step's output, a buffer the next step overwrites. Building it runs one dry
    step on zeros to allocate every buffer, then zeroes them (and the gradients).

    ``device_checks``: record NaN/Inf inputs and out-of-range labels on the device (``bad``: the
    first offending step of the sample, 1-based, or 0) instead of checking them on the host.
    """

    def __init__(self, net: nn.Module, loss_grad, x_like: Tensor, grads: list[Tensor],
                 device_checks: bool = False) -> None:
        self.root = compile_net(net)
        self.root.plan(False)
        self.ops = walk(self.root)
        self.loss_grad, self.grads, self.device_checks = loss_grad, grads, device_checks
        self.output_sum: Tensor | None = None  # summed outputs of the sample (prediction)
        self.last_out: Tensor | None = None    # the last learning step's output (stats.last_loss)
        self.target: Tensor | None = None      # ... and its labels
        self._zeroed: list[Tensor] | None = None  # what reset zeroes
        self.bad = torch.zeros(2, dtype=torch.int64, device=x_like.device)  # [input, labels]
        self.step_no = torch.zeros((), dtype=torch.int64, device=x_like.device)
        # Constants of the device checks (a graph replays them; made once, not per step)
        self._x_zeros = torch.zeros(x_like.numel(), dtype=x_like.dtype, device=x_like.device)
        self._no_bad_label = torch.zeros((), dtype=torch.bool, device=x_like.device)
        with torch.no_grad():
            zero = torch.zeros_like(x_like)
            out = self.root.forward(zero)
            self.classes = out.shape[1]
            self.output_sum, self.last_out = torch.zeros_like(out), torch.zeros_like(out)
            self.target = torch.zeros(out.shape[:1], dtype=torch.int64, device=out.device)
            self.reset()
            if self.root.needs:
                self.learn(zero, self.target)
            self.reset()
            if grads:  # none when the ONNX exporter loads the accumulators itself
                torch._foreach_zero_(grads)

    def _check(self, x: Tensor, target: Tensor | None) -> None:
        self.step_no += 1
        if target is None:
            bad_label = self._no_bad_label
        else:
            bad_label = ((self.target < 0) | (self.target >= self.classes)).any()
            self.target.clamp_(0, self.classes - 1)  # an index out of range would fault the device
        # NaN or Inf in x, in two kernels (isfinite + all + not is six on a GPU): 0 * v is 0 for a
        # finite v and NaN for an infinite or NaN one, so the dot product is NaN exactly then
        zero_dot = torch.dot(x.reshape(-1), self._x_zeros)
        flags = torch.stack([zero_dot != zero_dot, bad_label])
        torch.where((self.bad == 0) & flags, self.step_no, self.bad, out=self.bad)

    def infer(self, x: Tensor) -> Tensor:
        if self.device_checks:
            self._check(x, None)
        out = self.root.forward(x)
        self.output_sum.add_(out)
        return out

    def predict(self, x: Tensor) -> Tensor:
        """:meth:`infer` for a sample that will not learn: the traces are not advanced."""
        if self.device_checks:
            self._check(x, None)
        out = self.root.predict(x)
        self.output_sum.add_(out)
        return out

    def learn(self, x: Tensor, target: Tensor) -> Tensor:
        self.target.copy_(target)
        if self.device_checks:
            self._check(x, target)
        out = self.root.forward(x)
        self.output_sum.add_(out)
        self.last_out.copy_(out)
        if self.root.needs:
            self.root.backward(self.loss_grad(out, self.target))
        return out

    def state(self) -> list[Tensor]:
        """Every buffer that carries over between steps."""
        own = [self.output_sum, self.last_out, self.target, self.bad, self.step_no]
        return [t for op in self.ops for t in op.state()] + own

    def start_sample(self) -> None:
        """Before a sample's first step: frozen BN maps brought up to date (statistics loaded between
        samples apply from the next sample on, as in the eager learner), dropout masks drawn."""
        for op in self.ops:
            op.refresh()
            op.start_sample()

    def reset(self) -> None:
        """Forget the sample: zero every buffer in place (addresses stay; one fused call, not a kernel
        launch per buffer on a GPU, where the reset runs between graph replays)."""
        if self._zeroed is None:  # the buffers exist from the first forward on (the dry run's)
            self._zeroed = [t for op in self.ops for t in op.state()] + [self.output_sum, self.bad, self.step_no]
        buffers = self._zeroed
        if torch.compiler.is_compiling():  # traced by a graph exporter (ONNX has no fused zero)
            for t in buffers:
                t.zero_()
        else:
            torch._foreach_zero_(buffers)
