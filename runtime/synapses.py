"""Synaptic layers: :class:`Linear` and :class:`Conv2d`, with STOP's input and bias traces
(:class:`Synapse`). The public namespace of all layers is :mod:`stoprt.runtime.layers`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as SF
from .kinds import INPUT, SYNAPSE, Kept, StepContext, Steps
from .neurons import _PlainState


class Synapse(_PlainState):
    """Mixin for synaptic ops: input and bias traces under STOP, decaying with the target's leak.

    ``PLAIN_KEEPS_INPUT``: whether torch's own op keeps its input whenever any gradient flows through
    it (convolution), or only when the weight learns (linear).
    """

    KIND = SYNAPSE
    STATE = ("w_trace", "b_trace")  # shaped like the input; a scalar
    PLAIN_KEEPS_INPUT = False

    def _init_synapse(self, op: SF.SynapticOp) -> None:
        self._op = op
        self.stop_mode = False
        # The neuron layer this op's output feeds (set by stoprt.runtime.wiring). Stored outside
        # nn.Module's registry so the neuron is not counted as a child of this layer.
        object.__setattr__(self, "post_neuron", None)
        self.reset_state()

    def _forward_stop(self, x: Tensor) -> Tensor:
        if self.post_neuron is None:
            raise RuntimeError(f"{type(self).__name__} is not wired to a neuron layer; create the "
                               "STOP learner over the whole network")
        a = self.post_neuron.leak
        with torch.no_grad():
            if self.weight.requires_grad:
                self.w_trace = SF.input_trace_step(self.w_trace, x, a)
            if self.bias is not None and self.bias.requires_grad:
                self.b_trace = SF.bias_trace_step(self.b_trace, a)
        if not torch.is_grad_enabled():
            return self._op.forward(x, self.weight, self.bias)
        return SF.TracedSynapse.apply(x, self.weight, self.bias, self.w_trace, self.b_trace, self._op)

    def keeps(self, ctx: StepContext) -> list[Kept]:
        """STOP: the input trace (input-shaped) and the scalar bias trace, as state (TracedSynapse saves
        only these and the weight). BPTT: torch's op keeps its input."""
        w, b = ctx.learns(self.weight), ctx.learns(self.bias)
        if ctx.mode == "stop":
            return ([Kept("w_trace", Steps.EVERY, INPUT, state=True)] if w else []) + (
                [Kept("b_trace", Steps.EVERY, 1, state=True)] if b else [])
        if ctx.mode == "bptt" and (w or (ctx.input_grad and self.PLAIN_KEEPS_INPUT)):
            return [Kept(INPUT, Steps.EVERY, INPUT)]
        return []


class Linear(Synapse, nn.Linear):
    """Dense synaptic layer: ``[B, in_features] -> [B, out_features]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_synapse(SF.LinearOp())

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_stop(x) if self.stop_mode else F.linear(x, self.weight, self.bias)


class Conv2d(Synapse, nn.Conv2d):
    """Convolutional synaptic layer: ``[B, C_in, H, W] -> [B, C_out, H', W']``.

    Stride, padding, dilation and groups as in ``torch.nn.Conv2d``; padding must be numeric and the
    padding mode ``"zeros"`` (the transpose used for the spatial error assumes it).
    """

    PLAIN_KEEPS_INPUT = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True) -> None:
        if isinstance(padding, str):
            raise ValueError("stoprt Conv2d takes numeric padding (e.g. padding=1 for a 3x3 'same')")
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias)
        self._init_synapse(SF.Conv2dOp(self.stride, self.padding, self.dilation, self.groups))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_stop(x) if self.stop_mode else self._conv_forward(x, self.weight, self.bias)
