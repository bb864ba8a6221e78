"""BatchNorm utilities: estimate frozen statistics from data, fold BN into convolutions.

Under STOP, BatchNorm is a fixed affine map per channel (per-step batch statistics would make the
traces inexact). Its running statistics can still come from data: :func:`calibrate_batchnorm`
measures them over a few samples before learning starts. For deployment, :func:`fold_batchnorm`
merges each BN into the convolution before it, which leaves the dynamics unchanged.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import Tensor, nn

from . import layers as L


@torch.no_grad()
def calibrate_batchnorm(net: nn.Module, samples: Iterable[Tensor]) -> int:
    """Set every stoprt BatchNorm2d's running statistics to the average over ``samples``.

    Each sample is ``[T, B, *input_shape]``; all its steps count, run with the plain dynamics.
    Returns the number of steps seen. The BN layers keep their ``frozen`` flag and momentum.
    """
    bns = [m for m in net.modules() if isinstance(m, L.BatchNorm2d)]
    if not bns:
        return 0
    saved = [(m.momentum, m.frozen) for m in bns]
    stop_layers = [m for m in net.modules() if getattr(m, "stop_mode", False)]
    was_training = net.training
    for m in bns:
        m.reset_running_stats()
        m.momentum, m.frozen = None, False  # momentum None: a cumulative average over all steps
    L.set_stop_mode(net, False)
    net.train()
    steps = 0
    try:
        for x_seq in samples:
            L.reset_state(net)
            for x_t in x_seq:
                net(x_t)
                steps += 1
    finally:
        for m, (momentum, frozen) in zip(bns, saved):
            m.momentum, m.frozen = momentum, frozen
        for m in stop_layers:
            m.stop_mode = True
        net.train(was_training)
        L.reset_state(net)
    if steps == 0:
        raise ValueError("calibrate_batchnorm needs at least one sample with one step")
    return steps


def _fold_pair(conv: L.Conv2d, bn: nn.BatchNorm2d) -> L.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = L.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return folded.to(conv.weight.device, conv.weight.dtype)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` where each Conv2d directly followed by a BatchNorm2d absorbs it.

    The BN is replaced by ``Identity`` (parameter names of other layers stay the same). Uses the
    running statistics: the result equals the original with BN frozen.
    """
    net = copy.deepcopy(net)
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], L.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = _fold_pair(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return net
