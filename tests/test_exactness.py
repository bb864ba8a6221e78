"""STOP's gradients equal the truncated-graph oracle (reference section 6).

The oracle needs no trace code: for each loss term E[t] it reruns steps 0..t with the layers' plain
(BPTT) dynamics, where the reset spike is already detached, and additionally detaches every synaptic
layer's input at steps before t (forward pre-hooks), then sums the autograd gradients of E[t].
"""

import pytest
import torch

from stoprt.runtime import layers as L
from stoprt.runtime.learner import LOSSES
from stoprt.runtime.stop import STOP



pytestmark = pytest.mark.usefixtures("float64")  # see conftest.py


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """Give thresholds, leaks and frozen BN statistics non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, L.LIF):
                m.threshold.copy_(0.6 + 0.6 * torch.rand(m.threshold.shape, generator=g))
            if isinstance(m, L.Neuron):
                m.leak.fill_(0.3 + 0.6 * torch.rand((), generator=g).item())
            if isinstance(m, L.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
            if isinstance(m, (L.Linear, L.Conv2d)):
                m.weight.mul_(2.5)


def mlp(reset: str = "soft") -> L.Sequential:
    return L.Sequential(L.Linear(12, 16), L.LIF(threshold="neuron", reset=reset), L.Dropout(0.3),
                        L.Linear(16, 10), L.LIF(threshold="channel", reset=reset),
                        L.Linear(10, 4), L.LIF(threshold="layer", reset=reset), input_shape=(12,))


def conv_residual(readout: bool) -> L.Sequential:
    block = L.Residual(
        L.Sequential(L.Conv2d(4, 6, 3, padding=1), L.BatchNorm2d(6), L.LIF(threshold="neuron"),
                     L.Conv2d(6, 6, 3, padding=1, groups=2), L.BatchNorm2d(6)),
        L.Sequential(L.Conv2d(4, 6, 1), L.BatchNorm2d(6)))
    head = [L.LeakyReadout()] if readout else [L.LIF(threshold="channel")]
    return L.Sequential(L.Conv2d(2, 4, 3, padding=1), L.BatchNorm2d(4), L.LIF(threshold="channel"),
                        L.AvgPool2d(2), block, L.LIF(threshold="channel"),
                        L.Conv2d(6, 4, 3, stride=2, padding=1, bias=False), L.LIF(),
                        L.Flatten(), L.Linear(4 * 2 * 2, 3), *head, input_shape=(2, 8, 8))


def preact_stream() -> L.Sequential:
    """A pre-activation block: the stem's current reaches two LIFs that share one leak."""
    first = L.LIF(threshold="channel")
    return L.Sequential(L.Conv2d(2, 4, 3, padding=1),
                        L.Residual(L.Sequential(L.BatchNorm2d(4), first, L.Conv2d(4, 4, 3, padding=1),
                                                L.BatchNorm2d(4), L.LIF(threshold="neuron"),
                                                L.Conv2d(4, 4, 3, padding=1))),
                        L.BatchNorm2d(4), L.LIF(threshold="channel", share_leak_with=first),
                        L.MaxPool2d(2), L.Flatten(), L.Linear(4 * 4 * 4, 3), L.LeakyReadout(),
                        input_shape=(2, 8, 8))


def _freeze_bn(net):
    for m in net.modules():
        if isinstance(m, L.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def oracle_grads(net, xs, y, loss_fn, seed):
    params = [p for p in net.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    current = {"t": 0, "target": 0}

    def detach_old_inputs(module, args):
        return (args[0].detach(),) if current["t"] < current["target"] else None

    hooks = [m.register_forward_pre_hook(detach_old_inputs)
             for m in net.modules() if isinstance(m, (L.Linear, L.Conv2d))]
    try:
        for t in range(len(xs)):
            L.reset_state(net)
            torch.manual_seed(seed)  # the same dropout mask as the learner's sample
            current["target"] = t
            for k in range(t + 1):
                current["t"] = k
                out = net(xs[k])
            grads = torch.autograd.grad(loss_fn(out, y), params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g
    finally:
        for h in hooks:
            h.remove()
        L.reset_state(net)
    return params, total


def stop_grads(net, xs, y, learn, loss, seed):
    params = [p for p in net.parameters() if p.requires_grad]
    learner = STOP(net, torch.optim.SGD(params, lr=0.0), learn=learn, update="sample", loss=loss)
    torch.manual_seed(seed)
    for x in xs:
        learner.step(x, target=y)
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    return params, grads


@pytest.mark.parametrize("T", [1, 2, 5, 8])
@pytest.mark.parametrize("build,shape,loss", [
    (mlp, (12,), "ce"),
    (lambda: mlp(reset="soft_nodecay"), (12,), "ce"),
    (lambda: conv_residual(readout=False), (2, 8, 8), "ce"),
    (lambda: conv_residual(readout=True), (2, 8, 8), "mse"),
    (preact_stream, (2, 8, 8), "ce"),
], ids=["mlp", "mlp-soft-nodecay", "conv-residual", "conv-residual-readout", "preact-stream"])
def test_stop_equals_truncated_graph_oracle(build, shape, loss, T):
    torch.manual_seed(0)
    net = build()
    _randomise(net, seed=T)
    _freeze_bn(net)
    batch = 3
    xs = [1.5 * torch.rand(batch, *shape) for _ in range(T)]
    y = torch.randint(0, 3, (batch,))
    params_o, expected = oracle_grads(net, xs, y, LOSSES[loss], seed=11)
    params_s, got = stop_grads(net, xs, y, ("weight", "threshold", "leak"), loss, seed=11)
    names = {id(p): n for n, p in net.named_parameters()}
    nonzero = 0
    for p, g_ref, g in zip(params_o, expected, got):
        scale = g_ref.abs().max().item()
        nonzero += scale > 0
        assert g is not None or scale == 0, f"STOP gave no gradient for {names[id(p)]}"
        if g is None:
            continue
        err = (g - g_ref).abs().max().item()
        assert err <= 1e-5 * max(scale, 1e-12), f"{names[id(p)]}: max error {err:.3e} vs scale {scale:.3e}"
    # The comparison must not be vacuous: most parameters receive gradient.
    assert nonzero >= 0.6 * len(params_o)


def test_learning_a_subset_leaves_the_rest_without_gradient():
    torch.manual_seed(1)
    net = conv_residual(readout=False)
    _randomise(net, seed=1)
    _freeze_bn(net)
    xs = [1.5 * torch.rand(2, 2, 8, 8) for _ in range(3)]
    y = torch.tensor([0, 2])
    _, got = stop_grads(net, xs, y, ("weight", "leak"), "ce", seed=0)
    for n, p in net.named_parameters():
        if n.endswith("threshold"):
            assert p.grad is None and not p.requires_grad
        if n.endswith("leak"):
            assert p.requires_grad
