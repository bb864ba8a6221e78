"""The BPTT learner's gradients equal plain autograd through an independently written network."""

import pytest
import torch

from stoprt.runtime import layers as L
from stoprt.runtime.bptt import BPTT



pytestmark = pytest.mark.usefixtures("float64")  # see conftest.py


def _spike(x):
    # Heaviside forward, exp(-|x|) backward, written without stoprt: d/dx sign(x)(1 - e^-|x|) = e^-|x|.
    smooth = torch.sign(x) * (1 - torch.exp(-x.abs()))
    return (x > 0).to(x.dtype) + smooth - smooth.detach()


def _reference_loss(net, xs, y):
    lin1, lif1, lin2, lif2 = net[0], net[1], net[2], net[3]
    u1 = s1 = u2 = s2 = 0.0
    total = 0.0
    for x in xs:
        u1 = lif1.leak * (u1 - lif1.threshold * (s1.detach() if torch.is_tensor(s1) else s1)) + x @ lin1.weight.T + lin1.bias
        s1 = _spike(u1 - lif1.threshold)
        u2 = lif2.leak * (u2 - lif2.threshold * (s2.detach() if torch.is_tensor(s2) else s2)) + s1 @ lin2.weight.T + lin2.bias
        s2 = _spike(u2 - lif2.threshold)
        total = total + torch.nn.functional.cross_entropy(s2, y)
    return total


def test_bptt_gradients_equal_autograd_through_time():
    torch.manual_seed(0)
    net = L.Sequential(L.Linear(6, 8), L.LIF(threshold="neuron", shape=8, leak=0.7),
                       L.Linear(8, 3), L.LIF(threshold="channel", shape=3, leak=0.6))
    with torch.no_grad():
        for m in net:
            if isinstance(m, L.Linear):
                m.weight.mul_(3)
    xs = [torch.rand(4, 6) * 2 for _ in range(7)]
    y = torch.tensor([0, 1, 2, 1])
    params = list(net.parameters())
    expected = torch.autograd.grad(_reference_loss(net, xs, y), params)
    learner = BPTT(net, torch.optim.SGD(params, lr=0.0))
    for x in xs:
        learner.step(x, y)
    # end_sample would zero the gradients after the update: backpropagate by hand to compare.
    learner._loss_sum.backward()
    for (name, p), g in zip(net.named_parameters(), expected):
        assert g.abs().max() > 0, f"reference gradient of {name} is zero: the test would be vacuous"
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12, msg=name)


def test_bptt_update_changes_parameters_and_resets_state():
    torch.manual_seed(0)
    net = L.Sequential(L.Linear(6, 5), L.LIF(threshold="channel", shape=5))
    learner = BPTT(net, torch.optim.SGD(net.parameters(), lr=0.5))
    before = net[0].weight.detach().clone()
    for _ in range(4):
        learner.step(torch.rand(3, 6) * 3, torch.tensor([0, 1, 4]))
    prediction = learner.end_sample()
    assert prediction.shape == (3,)
    assert not torch.equal(before, net[0].weight)
    assert net[1].u is None and learner.stats.updates == 1
