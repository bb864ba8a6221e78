"""Forward-op forms of the ATen backward kernels the static STOP step calls, for the ONNX exporter.

The static program's backward (through :mod:`stoprt.runtime.functional`) calls
``aten.convolution_backward`` and the pooling backward kernels, which the ONNX exporter cannot
translate and torch does not decompose. Each is the adjoint of a linear op, written here with
forward ops that ONNX has (``static-step.md``, "ONNX learning graph"):

* conv input gradient: the transposed convolution of the output gradient with W, its
  ``output_padding`` sized to give back the whole input;
* conv weight gradient: a convolution of the input (STOP's input trace) with the output gradient,
  batch and channel axes swapped (groups folded into the channel axis);
* average pooling: the output gradient spread evenly over each window (a transposed convolution
  with a constant kernel, one channel at a time).

:func:`lowered` puts them in place of the kernels while ``torch.export`` traces the step (a torch
function mode: the traced graph holds the forward ops from the start, with no second trace to
decompose it). Configurations they do not cover raise
:class:`~stoprt.export.onnx_learn.LearnGraphError` naming the layer setting. ``tests/test_onnx_learn``
checks each against the ATen kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


class LoweringError(ValueError):
    """A backward kernel configuration without a forward-op form here."""


def _transposed(grad_y: Tensor, weight: Tensor, x_size, stride, padding, dilation, groups: int) -> Tensor:
    """The adjoint of a convolution (or of a pool written as one) onto an input of spatial size
    ``x_size``: a transposed convolution whose ``output_padding`` restores the rows and columns the
    forward's floor division left over. Those can lie inside a window (stride 2, padding 1 on an even
    input: the last row is read by the last window), so they must be computed, not padded with zeros."""
    k = weight.shape[-2:]
    extra = [x_size[i] - ((grad_y.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
             for i in range(2)]
    return F.conv_transpose2d(grad_y, weight, None, stride, padding, extra, groups, dilation)


def conv_backward(grad_y, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                  groups, mask):
    """``aten.convolution_backward`` of a plain 2-D convolution: (grad_x, grad_w, None)."""
    if transposed or x.dim() != 4 or mask[2]:
        raise LoweringError("only a plain Conv2d's input and weight gradients are lowered")
    kh, kw = weight.shape[-2:]
    grad_x = grad_w = None
    if mask[0]:
        grad_x = _transposed(grad_y, weight, x.shape[-2:], stride, padding, dilation, groups)
    if mask[1]:
        b, g = x.shape[0], groups
        # [B, G*Ci, H, W] -> [Ci, G*B, H, W]; [B, G*Co, Ho, Wo] -> [G*Co, B, Ho, Wo]
        xs = x.reshape(b, g, x.shape[1] // g, *x.shape[2:]).permute(2, 1, 0, 3, 4).reshape(
            x.shape[1] // g, g * b, *x.shape[2:])
        gs = grad_y.reshape(b, g, grad_y.shape[1] // g, *grad_y.shape[2:]).permute(1, 2, 0, 3, 4).reshape(
            grad_y.shape[1], b, *grad_y.shape[2:])
        gw = F.conv2d(xs, gs, None, dilation, padding, stride, g)  # [Ci, G*Co, >=kh, >=kw]
        grad_w = gw.transpose(0, 1)[..., :kh, :kw]
    return grad_x, grad_w, None


def avg_pool_backward(grad_y, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """``aten.avg_pool2d_backward`` without ceil mode and, with padding, counting the padding."""
    pad = list(padding) if len(padding) == 2 else [padding[0]] * 2
    if ceil_mode or divisor_override is not None or (any(pad) and not count_include_pad):
        raise LoweringError("AvgPool2d with ceil_mode, divisor_override or count_include_pad=False")
    k = list(kernel_size) if len(kernel_size) == 2 else [kernel_size[0]] * 2
    s = (list(stride) if len(stride) == 2 else [stride[0]] * 2) if len(stride) else k
    b, c = grad_y.shape[:2]
    ones = grad_y.new_full((1, 1, *k), 1.0 / (k[0] * k[1]))
    return _transposed(grad_y.reshape(b * c, 1, *grad_y.shape[2:]), ones, x.shape[-2:], s, pad, [1, 1], 1).reshape(x.shape)


def adaptive_avg_pool_backward(grad_y, x):
    """``aten._adaptive_avg_pool2d_backward`` where the output divides the input (equal windows)."""
    (h, w), (oh, ow) = x.shape[-2:], grad_y.shape[-2:]
    if h % oh or w % ow:
        raise LoweringError(f"AdaptiveAvgPool2d from {h}x{w} to {oh}x{ow} (windows of unequal size)")
    k = [h // oh, w // ow]
    return avg_pool_backward(grad_y, x, k, k, [0, 0], False, True, None)


LOWERINGS = {aten.convolution_backward: conv_backward,
             aten.avg_pool2d_backward: avg_pool_backward,
             aten._adaptive_avg_pool2d_backward: adaptive_avg_pool_backward}


class lowered(TorchFunctionMode):
    """Within this context a call of a kernel in :data:`LOWERINGS` (by packet or overload) runs its
    forward-op form instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        form = LOWERINGS.get(getattr(func, "overloadpacket", func))
        return (form or func)(*args, **(kwargs or {}))
