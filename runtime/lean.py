"""Two ops whose backward keeps less than torch's own, for layers that sit between every synaptic op
and its neurons in the networks STOP trains.

* Frozen BatchNorm is a fixed per-channel affine map: its input gradient needs only the scale, yet
  ``F.batch_norm`` keeps its whole input for backward.
* Average pooling's input gradient depends on nothing but shapes, yet ``F.avg_pool2d`` keeps its input.

Under STOP, what a step keeps for backward is a per-step cost that sits on top of the traces, so each
such tensor is a sizeable share of the learner's memory (one activation per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
