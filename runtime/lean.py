"""BatchNorm2d and AvgPool2d, the layers that sit between the synaptic ops and the neurons of the
networks STOP trains, with ops whose backward keeps less than torch's own.

* Frozen BatchNorm is a fixed per-channel affine map: its input gradient needs only the scale, yet
  ``F.batch_norm`` keeps its whole input for backward.
* Average pooling's input gradient depends on nothing but shapes, yet ``F.avg_pool2d`` keeps its input.

Under STOP, what a step keeps for backward is a per-step cost that sits on top of the traces, so each
such tensor is a sizeable share of the learner's memory (one activation per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kinds import AFFINE_PASS, CURRENT_PASS, INPUT, STATS, Kept, StepContext, Steps


def frozen_affine(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                  eps: float) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm as ``x * scale + shift``: the per-channel ``(scale, shift)``, each ``[C]``.

    Applied as ``torch.addcmul(shift, x, scale)``, backward keeps only the scale (and ``x`` only if
    weight or bias learn).
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


class _AvgPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        ctx.args = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def backward(ctx, grad_y):
        # The kernel reads only the input's sizes: a zero-stride stand-in of that shape is enough.
        stand_in = grad_y.new_empty((), dtype=ctx.x_dtype).expand(ctx.x_shape)
        grad_x = torch.ops.aten.avg_pool2d_backward(grad_y.contiguous(), stand_in, *ctx.args)
        return grad_x, None, None, None, None, None, None


def avg_pool2d(x: Tensor, kernel_size, stride, padding, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> Tensor:
    """``F.avg_pool2d`` of ``x`` ``[B, C, H, W]`` (sizes as lists) whose backward keeps no tensor."""
    if torch.is_grad_enabled() and x.requires_grad and x.dim() == 4:
        return _AvgPool2d.apply(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class AvgPool2d(nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` whose backward keeps no tensor (its gradient depends only on shapes)."""

    KIND = CURRENT_PASS

    def keeps(self, ctx: StepContext) -> list[Kept]:
        return []

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool2d(x, _pair(self.kernel_size), _pair(self.stride), _pair(self.padding), self.ceil_mode,
                          self.count_include_pad, self.divisor_override)


def _tracing() -> bool:
    """Whether torch.export / torch.compile / torch.jit.trace is recording the forward.

    A tracer's tensors (FakeTensor, FunctionalTensor) have no storage, so the eager cache key
    (``data_ptr``) cannot be read; and a cached tensor would be baked into the graph as a constant,
    cut off from the buffers and parameters it was computed from.
    """
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over channels. ``frozen``: always the running statistics, a fixed affine map.

    STOP freezes it (per-step batch statistics would break the exactness of its traces); BPTT does
    too by default, so both train identical models. Estimate the statistics from data with
    :func:`stoprt.runtime.batchnorm.calibrate_batchnorm`; fold into the preceding convolution for
    deployment with :func:`stoprt.runtime.batchnorm.fold_batchnorm`.
    """

    KIND = AFFINE_PASS

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.frozen = False
        self._affine, self._affine_key = None, None

    def forward(self, x: Tensor) -> Tensor:
        if self.frozen:  # a fixed affine map; its backward keeps only the per-channel scale
            scale, shift = self._frozen_affine()
            view = (-1,) + (1,) * (x.dim() - 2)
            return torch.addcmul(shift.view(view), x, scale.view(view))
        return super().forward(x)

    def _frozen_affine(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) of the frozen map, recomputed only when a statistic or parameter changed."""
        args = (self.running_mean, self.running_var, self.weight, self.bias)
        if any(t is not None and t.requires_grad for t in args):  # learning them: a fresh graph each step
            return frozen_affine(*args, self.eps)
        if _tracing():  # the graph must compute the map from its buffers, not hold a cached constant
            return frozen_affine(*args, self.eps)
        # data_ptr catches ``.to()``/``.double()`` (parameters keep their identity and version there)
        key = tuple(None if t is None else (t.data_ptr(), t._version) for t in args) + (self.eps,)
        if key != self._affine_key:
            with torch.no_grad():
                self._affine = frozen_affine(*args, self.eps)
            self._affine_key = key
        return self._affine

    def keeps(self, ctx: StepContext) -> list[Kept]:
        """Batch statistics (BPTT unfrozen): the input and save_mean / save_invstd ``[C]``, every step.
        Frozen: only the per-channel scale, cached across the sample."""
        if ctx.mode == "bptt" and not ctx.freeze_batchnorm and (
                ctx.input_grad or any(ctx.learns(p) for p in self.parameters())):
            return [Kept(INPUT, Steps.EVERY, INPUT), Kept("stats", Steps.EVERY, 2 * self.num_features, elsize=STATS)]
        if ctx.train and ctx.input_grad:
            return [Kept("scale", Steps.ONCE, self.num_features)]
        return []

    def extra_repr(self) -> str:
        return super().extra_repr() + (", frozen" if self.frozen else "")
