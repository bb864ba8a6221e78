"""BatchNorm: the layer (:class:`BatchNorm2d`), freezing it, estimating its statistics from data,
folding it into convolutions.

Under STOP, BatchNorm is a fixed affine map per channel (per-step batch statistics would make the
traces inexact): :func:`freeze_batchnorm`. Frozen, its input gradient needs only the scale, yet
``F.batch_norm`` keeps its whole input for backward, so :class:`BatchNorm2d` applies the map itself.
Its running statistics can still come from data: :func:`calibrate_batchnorm` measures them over a
few samples before learning starts. For deployment, :func:`fold_batchnorm` merges each BN into the
convolution before it, which leaves the dynamics unchanged.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import Tensor, nn

from .kinds import AFFINE_PASS, INPUT, STATS, Kept, StepContext, Steps
from .neurons import reset_state, set_stop_mode
from .synapses import Conv2d


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
    :func:`calibrate_batchnorm`; fold into the preceding convolution for
    deployment with :func:`fold_batchnorm`.
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


def freeze_batchnorm(net: nn.Module, frozen: bool = True) -> None:
    """Freeze (or unfreeze) every stoprt BatchNorm2d: running statistics and no affine learning."""
    for m in net.modules():
        if isinstance(m, BatchNorm2d):
            m.frozen = frozen
            for p in m.parameters():
                p.requires_grad_(not frozen)


@torch.no_grad()
def calibrate_batchnorm(net: nn.Module, samples: Iterable[Tensor]) -> int:
    """Set every stoprt BatchNorm2d's running statistics to the average over ``samples``.

    Each sample is ``[T, B, *input_shape]``; all its steps count, run with the plain dynamics.
    Returns the number of steps seen. The BN layers keep their ``frozen`` flag and momentum.
    """
    bns = [m for m in net.modules() if isinstance(m, BatchNorm2d)]
    if not bns:
        return 0
    saved = [(m.momentum, m.frozen) for m in bns]
    stop_layers = [m for m in net.modules() if getattr(m, "stop_mode", False)]
    was_training = net.training
    for m in bns:
        m.reset_running_stats()
        m.momentum, m.frozen = None, False  # momentum None: a cumulative average over all steps
    set_stop_mode(net, False)
    net.train()
    steps = 0
    try:
        for x_seq in samples:
            reset_state(net)
            for x_t in x_seq:
                net(x_t)
                steps += 1
    finally:
        for m, (momentum, frozen) in zip(bns, saved):
            m.momentum, m.frozen = momentum, frozen
        for m in stop_layers:
            m.stop_mode = True
        net.train(was_training)
        reset_state(net)
    if steps == 0:
        raise ValueError("calibrate_batchnorm needs at least one sample with one step")
    return steps


def _fold_pair(conv: Conv2d, bn: nn.BatchNorm2d) -> Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
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
            if isinstance(seq[i], Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = _fold_pair(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return net
