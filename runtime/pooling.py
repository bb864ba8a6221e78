"""Average pooling whose backward keeps no tensor: its input gradient depends on nothing but shapes,
yet ``F.avg_pool2d`` keeps its input. Under STOP, what a step keeps for backward is a per-step cost
on top of the traces, so each such tensor is a sizeable share of the learner's memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kinds import CURRENT_PASS, Kept, StepContext


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
