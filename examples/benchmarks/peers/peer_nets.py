"""One network, built in every library the benchmark compares: stoprt, snnTorch and SpikingJelly.

The stoprt network is the reference: :func:`reference` builds it from :mod:`stoprt.runtime.models`
(seeded) and :func:`convert` rebuilds it layer by layer in a peer library with the same weights,
BatchNorm statistics, leak and threshold, so every method starts from identical parameters.

Neuron mapping (leak ``a``, threshold ``th``, one step)::

    stoprt LIF (soft reset)      U[t] = a (U[t-1] - th s[t-1]) + I[t]
    SpikingJelly LIFNode         H[t] = (1 - 1/tau) v[t-1] + X[t], v = H - th S  (decay_input=False,
                                 v_reset=None): the same with tau = 1 / (1 - a)
    snnTorch Leaky (subtract)    U[t] = beta U[t-1] + I[t] - th S[t-1]: stoprt's "soft_nodecay", beta = a

Every library's own neuron is used as it is; the differences that remain are snnTorch's reset (the
threshold is subtracted after the decay) and SpikingJelly firing at ``H >= th`` where stoprt and
snnTorch fire at ``U > th``. The surrogate derivative is the arctan one in all three, with the same
curve ``1 / (1 + (pi x)^2)`` (stoprt ``"atan"`` alpha 1, snnTorch ``atan(2)``, SpikingJelly ``ATan(2)``).

BatchNorm is frozen everywhere (running statistics, no affine learning), as stoprt's learners keep
it: per-step batch statistics would break STOP's exact traces and OTTT's trace replay alike.
Peer libraries are imported lazily, so this module loads where they are absent.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stoprt.runtime import layers as L, models

LIBS = ("snntorch", "sj_multi", "sj_single", "sj_ottt")
SURROGATE = ("atan", 1.0)  # stoprt's name and alpha for the curve 1 / (1 + (pi x)^2)


def reference(model: str, size: int, classes: int, width: float, seed: int) -> L.Sequential:
    """The stoprt network every library starts from: ``model`` of :data:`stoprt.runtime.models.MODELS`
    for 2-channel event frames ``[B, 2, size, size]``, LIF head, arctan surrogate, seeded init."""
    torch.manual_seed(seed)
    net = models.build_model(model, in_channels=2, size=size, classes=classes, width=width)
    for n in L.neurons(net):
        n.surrogate, n.alpha = SURROGATE
    return net


class SampleDropout(nn.Module):
    """Dropout with one mask per sample (as stoprt's and SpikingJelly's), for the snnTorch network,
    where ``nn.Dropout`` would draw a new mask at every step. :func:`reset_snntorch` clears it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.mask = p, None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None or self.mask.shape != x.shape:
            self.mask = torch.bernoulli(torch.full_like(x, 1.0 - self.p)) / (1.0 - self.p)
        return x * self.mask


def _copy(dst: nn.Module, src: nn.Module) -> nn.Module:
    dst.load_state_dict(src.state_dict())
    return dst


def _frozen_bn(bn_cls, src: L.BatchNorm2d) -> nn.Module:
    bn = _copy(bn_cls(src.num_features, src.eps), src).eval()
    for p in bn.parameters():
        p.requires_grad_(False)
    return bn


def _neuron(lib: str, src: L.LIF) -> nn.Module:
    a = src.leak.item()
    th = float(src.threshold.detach().flatten()[0])  # all equal at init: the peers take one value
    if lib == "snntorch":
        import snntorch as snn
        from snntorch import surrogate
        return snn.Leaky(beta=a, threshold=th, spike_grad=surrogate.atan(2.0), init_hidden=True,
                         reset_mechanism="subtract")
    from spikingjelly.activation_based import neuron, surrogate
    kwargs = dict(tau=1.0 / (1.0 - a), decay_input=False, v_threshold=th, v_reset=None,
                  surrogate_function=surrogate.ATan(alpha=2.0))
    if lib == "sj_ottt":
        return neuron.OTTTLIFNode(**kwargs)
    return neuron.LIFNode(detach_reset=True, step_mode="m" if lib == "sj_multi" else "s", **kwargs)


def convert(ref: L.Sequential, lib: str) -> nn.Module:
    """``ref`` (a flat stoprt Sequential: conv/linear, BN, LIF, pools, flatten, dropout) rebuilt in
    ``lib``: ``"snntorch"`` (nn layers + ``snn.Leaky``), ``"sj_multi"`` / ``"sj_single"`` (SpikingJelly
    ``layer.*`` + ``LIFNode`` in multi- / single-step mode) or ``"sj_ottt"`` (``OTTTSequential`` of nn
    layers + ``OTTTLIFNode``, SpikingJelly's OTTT network). Same weights and BN statistics as ``ref``.
    """
    if lib not in LIBS:
        raise ValueError(f"unknown library {lib!r}; choose one of {LIBS}")
    if any(isinstance(n, L.LeakyReadout) for n in L.neurons(ref)):
        raise ValueError("the peers have no leaky readout: build the reference with a LIF head")
    sj_layers = lib in ("sj_multi", "sj_single")
    if lib == "snntorch":
        layer = None
    else:
        from spikingjelly.activation_based import layer
    nnmod = layer if sj_layers else nn  # SpikingJelly's step-mode wrappers, or plain torch layers
    out: list[nn.Module] = []
    for m in ref:
        if isinstance(m, L.Conv2d):
            out.append(_copy(nnmod.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                          m.dilation, m.groups, bias=m.bias is not None), m))
        elif isinstance(m, L.Linear):
            out.append(_copy(nnmod.Linear(m.in_features, m.out_features, bias=m.bias is not None), m))
        elif isinstance(m, L.BatchNorm2d):
            out.append(_frozen_bn(nnmod.BatchNorm2d, m))
        elif isinstance(m, L.LIF):
            out.append(_neuron(lib, m))
        elif isinstance(m, L.Dropout):
            # SpikingJelly's Dropout keeps its mask until reset; OTTTSequential applies it to spikes
            # and traces alike.
            out.append(SampleDropout(m.p) if lib == "snntorch" else layer.Dropout(m.p))
        elif isinstance(m, nn.AvgPool2d):
            out.append(nnmod.AvgPool2d(m.kernel_size, m.stride))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            out.append(nnmod.AdaptiveAvgPool2d(m.output_size))
        elif isinstance(m, nn.Flatten):
            out.append(nnmod.Flatten(m.start_dim, m.end_dim))
        else:
            raise ValueError(f"cannot rebuild {type(m).__name__} in {lib}: the benchmark networks are flat "
                             "conv/linear-BN-LIF stacks")
    if lib == "sj_ottt":
        return layer.OTTTSequential(*out)
    net = nn.Sequential(*out)
    if sj_layers:
        from spikingjelly.activation_based import functional
        functional.set_step_mode(net, "m" if lib == "sj_multi" else "s")
    return net


def set_training(net: nn.Module, training: bool) -> nn.Module:
    """Train or eval mode for a converted network, BatchNorm always in eval mode (frozen)."""
    net.train(training)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return net


def reset(net: nn.Module, lib: str) -> None:
    """Forget the sample in a converted network (membranes, OTTT traces, dropout masks)."""
    if lib == "snntorch":
        import snntorch as snn
        for m in net.modules():
            if isinstance(m, snn.Leaky):
                m.reset_mem()
            elif isinstance(m, SampleDropout):
                m.mask = None
    else:
        from spikingjelly.activation_based import functional
        functional.reset_net(net)
