"""The training methods compared, behind one interface: a sample in, a prediction out.

=================  ==============================================================================
method             what runs
=================  ==============================================================================
stop-w ... -wtl    stoprt ``STOP`` (weights; + thresholds; + leaks; all three), update per sample
bptt               stoprt ``BPTT`` (weights, thresholds, leaks)
snntorch-bptt      snnTorch: ``nn`` layers + ``snn.Leaky``, one step at a time, backward at the end
sj-bptt            SpikingJelly multi-step: ``layer.*`` + ``LIFNode(step_mode="m")``, all T at once
sj-ottt            SpikingJelly OTTT: ``OTTTSequential`` + ``OTTTLIFNode``, ``ottt_online_training``
                   with ``online=False`` (gradients of every step, one update per sample, as STOP)
=================  ==============================================================================

All of them: per-step cross-entropy on the output spikes summed over the sample, the prediction is
the class with the most output spikes, Adam over the parameters each learns (the peers: weights and
biases; their leaks and thresholds are fixed, as in their default neurons), frozen BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stoprt.runtime.bptt import BPTT
from stoprt.runtime.stop import STOP
from stoprt.runtime.train import LEARN_CODES

import peer_nets

LABELS = {"stop-w": "stoprt STOP-W", "stop-wt": "stoprt STOP-WT", "stop-wl": "stoprt STOP-WL",
          "stop-wtl": "stoprt STOP-WTL", "bptt": "stoprt BPTT", "snntorch-bptt": "snnTorch BPTT",
          "sj-bptt": "SpikingJelly BPTT", "sj-ottt": "SpikingJelly OTTT"}
METHODS = tuple(LABELS)
# The peer library each method needs (stoprt's own need none beyond stoprt).
LIBRARY = {"snntorch-bptt": "snntorch", "sj-bptt": "spikingjelly", "sj-ottt": "spikingjelly"}
ONLINE = ("stop-w", "stop-wt", "stop-wl", "stop-wtl", "sj-ottt")  # one step's graph at a time


class Method:
    """One network and its learning rule.

    Attributes:
        name: a key of :data:`LABELS`.
        net: the module a step (or, for SpikingJelly multi-step, a whole sample) runs through; a
            forward pre-hook on it marks where each online step's graph begins.
    """

    name: str
    net: nn.Module

    def train_sample(self, xs: Tensor, y: Tensor) -> Tensor:
        """Learn from one batch of samples ``xs`` ``[T, B, C, H, W]`` with labels ``y`` ``[B]``;
        returns the training prediction ``[B]``."""
        raise NotImplementedError

    def predict(self, xs: Tensor) -> Tensor:
        """Predictions ``[B]`` for ``xs`` ``[T, B, C, H, W]`` without learning."""
        raise NotImplementedError


class StoprtMethod(Method):
    """stoprt's STOP (a variant) or BPTT learner over the reference network itself."""

    def __init__(self, name: str, ref: nn.Module, lr: float) -> None:
        self.name, self.net = name, ref
        opt = torch.optim.Adam(ref.parameters(), lr=lr)
        if name == "bptt":
            self.learner = BPTT(ref, opt)
        else:
            # eager: the memory probe counts what autograd saves (the static step saves nothing)
            self.learner = STOP(ref, opt, learn=LEARN_CODES[name.split("-")[1]], update="sample",
                                compile="eager")

    def train_sample(self, xs: Tensor, y: Tensor) -> Tensor:
        for x in xs:
            self.learner.step(x, y)
        return self.learner.end_sample()

    def predict(self, xs: Tensor) -> Tensor:
        return self.learner.predict(xs)


class _PeerMethod(Method):
    lib: str

    def __init__(self, name: str, ref: nn.Module, lr: float) -> None:
        self.name = name
        self.net = peer_nets.convert(ref, self.lib)
        self.opt = torch.optim.Adam([p for p in self.net.parameters() if p.requires_grad], lr=lr)

    def _update(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def predict(self, xs: Tensor) -> Tensor:
        peer_nets.set_training(self.net, False)
        peer_nets.reset(self.net, self.lib)
        total = sum(self.net(x) for x in xs)
        peer_nets.reset(self.net, self.lib)
        return total.argmax(1)


class SnnTorchBPTT(_PeerMethod):
    """snnTorch's usual loop: step the network T times, sum the losses, one backward."""

    lib = "snntorch"

    def train_sample(self, xs: Tensor, y: Tensor) -> Tensor:
        peer_nets.set_training(self.net, True)
        peer_nets.reset(self.net, self.lib)
        loss, total = 0.0, 0.0
        for x in xs:
            out = self.net(x)
            loss = loss + F.cross_entropy(out, y)
            total = total + out.detach()
        loss.backward()
        self._update()
        peer_nets.reset(self.net, self.lib)
        return total.argmax(1)


class SpikingJellyBPTT(_PeerMethod):
    """SpikingJelly multi-step mode: the whole ``[T, B, ...]`` sample through each layer at once."""

    lib = "sj_multi"

    def train_sample(self, xs: Tensor, y: Tensor) -> Tensor:
        peer_nets.set_training(self.net, True)
        peer_nets.reset(self.net, self.lib)
        out = self.net(xs)                                   # [T, B, K]
        T, B = out.shape[:2]
        # sum over steps of the batch-mean cross-entropy, as every other method
        F.cross_entropy(out.flatten(0, 1), y.repeat(T), reduction="sum").div(B).backward()
        self._update()
        peer_nets.reset(self.net, self.lib)
        return out.detach().sum(0).argmax(1)

    @torch.no_grad()
    def predict(self, xs: Tensor) -> Tensor:
        peer_nets.set_training(self.net, False)
        peer_nets.reset(self.net, self.lib)
        out = self.net(xs)
        peer_nets.reset(self.net, self.lib)
        return out.sum(0).argmax(1)


class SpikingJellyOTTT(_PeerMethod):
    """SpikingJelly's own OTTT loop (``ottt_online_training``): backward at every step, the layers
    after a spiking layer run twice per step (on the spikes for the value, on the presynaptic traces
    for the gradient)."""

    lib = "sj_ottt"

    def __init__(self, name: str, ref: nn.Module, lr: float) -> None:
        super().__init__(name, ref, lr)
        from spikingjelly.activation_based.learning.online_learning import ottt_online_training
        self._train = ottt_online_training

    def train_sample(self, xs: Tensor, y: Tensor) -> Tensor:
        peer_nets.set_training(self.net, True)
        peer_nets.reset(self.net, self.lib)
        T, B = xs.shape[:2]
        _, outs = self._train(self.net, self.opt, xs.transpose(0, 1), y[:, None].expand(B, T),
                              F.cross_entropy, online=False)          # outs [B, T, K]
        self.opt.zero_grad(set_to_none=True)
        peer_nets.reset(self.net, self.lib)
        return outs.sum(1).argmax(1)


_CLASSES = {"snntorch-bptt": SnnTorchBPTT, "sj-bptt": SpikingJellyBPTT, "sj-ottt": SpikingJellyOTTT}


def make(name: str, ref: nn.Module, lr: float = 1e-3) -> Method:
    """The method ``name`` (see :data:`LABELS`) over the reference network ``ref``. stoprt's methods
    train ``ref`` itself; a peer trains its own copy of it."""
    if name not in LABELS:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    cls = _CLASSES.get(name, StoprtMethod)
    return cls(name, ref, lr)


def available(name: str) -> str | None:
    """None when ``name`` can run in this interpreter, else why not."""
    lib = LIBRARY.get(name)
    if lib is None:
        return None
    try:
        if lib == "snntorch":
            import snntorch  # noqa: F401
        else:
            from spikingjelly.activation_based import layer, neuron  # noqa: F401
            if name == "sj-ottt":
                from spikingjelly.activation_based.learning import online_learning  # noqa: F401
    except ImportError as err:
        return f"{lib} cannot be imported here ({err})"
    return None
