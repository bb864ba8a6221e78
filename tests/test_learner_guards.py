"""Bad input gets clear errors; updates that would make NaN/Inf are refused."""

import copy
import math

import pytest
import torch

from stoprt.runtime import layers as L, models
from stoprt.runtime.stop import STOP
from stoprt.runtime.wiring import WiringError


def _learner(**kw):
    torch.manual_seed(0)
    net = models.mlp(in_channels=1, size=4, classes=3, hidden=(8,))
    return net, STOP(net, torch.optim.SGD(net.parameters(), lr=kw.pop("lr", 0.1)), **kw)


def test_wrong_input_shape_is_named():
    _, learner = _learner()
    with pytest.raises(ValueError, match=r"does not fit the network: expected \[B, 1, 4, 4\]"):
        learner.step(torch.rand(2, 1, 5, 5), torch.tensor([0, 1]))


def test_nan_input_is_rejected():
    _, learner = _learner()
    x = torch.rand(2, 1, 4, 4)
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        learner.step(x, torch.tensor([0, 1]))


def test_labels_out_of_range():
    _, learner = _learner()
    with pytest.raises(ValueError, match="labels out of range: the network has 3 classes"):
        learner.step(torch.rand(2, 1, 4, 4), torch.tensor([0, 3]))


def test_end_sample_without_steps_is_a_no_op():
    _, learner = _learner()
    assert learner.end_sample() is None and learner.stats.samples == 0


def test_update_that_would_make_inf_is_refused_and_parameters_kept():
    net, learner = _learner(lr=math.inf)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for _ in range(3):
        learner.step(torch.rand(2, 1, 4, 4) * 3, torch.tensor([0, 2]))
    learner.end_sample()
    assert learner.stats.rejected_updates == 1 and learner.stats.updates == 0
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n


def test_nan_gradient_is_refused():
    torch.manual_seed(0)
    net = models.mlp(in_channels=1, size=4, classes=3, hidden=(8,))
    learner = STOP(net, torch.optim.SGD(net.parameters(), lr=0.1),
                   loss=lambda out, y: out.sum() * math.nan)
    learner.step(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
    learner.end_sample()
    assert learner.stats.rejected_updates == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_threshold_and_leak_are_clamped_into_range():
    torch.manual_seed(0)
    net = L.Sequential(L.Linear(4, 3), L.LIF(threshold="channel", shape=3, threshold_floor=0.1))
    learner = STOP(net, torch.optim.SGD(net.parameters(), lr=1e4))
    for _ in range(3):
        learner.step(torch.rand(5, 4) * 4, torch.tensor([0, 1, 2, 0, 1]))
    learner.end_sample()
    lif = net[1]
    assert (lif.threshold >= 0.1).all()
    assert 0.01 - 1e-6 <= lif.leak.item() <= 0.99 + 1e-6  # float32 bounds
    assert learner.stats.clamped_values > 0


def test_unsupported_structures_are_named():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 3), L.LIF())
    with pytest.raises(WiringError, match="plain torch layer"):
        STOP(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    maxpool_on_current = L.Sequential(L.Conv2d(1, 2, 3, padding=1), L.MaxPool2d(2), L.LIF())
    with pytest.raises(WiringError, match="max pooling"):
        STOP(maxpool_on_current, torch.optim.SGD(maxpool_on_current.parameters(), lr=0.1))
    no_neuron_head = L.Sequential(L.Linear(4, 3), L.LIF(), L.Linear(3, 2))
    with pytest.raises(WiringError, match="without a neuron layer"):
        STOP(no_neuron_head, torch.optim.SGD(no_neuron_head.parameters(), lr=0.1))
    stream = L.Sequential(L.Linear(4, 4), L.Residual(L.Sequential(L.LIF(), L.Linear(4, 4))), L.LIF())
    with pytest.raises(WiringError, match="different leaks"):
        STOP(stream, torch.optim.SGD(stream.parameters(), lr=0.1))


def test_unknown_options():
    net = models.mlp(in_channels=1, size=4, classes=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown kinds"):
        STOP(net, opt, learn=("weights",))
    with pytest.raises(ValueError, match="update must be"):
        STOP(net, opt, update=0)
    with pytest.raises(ValueError, match="unknown loss"):
        STOP(net, opt, loss="hinge")


def test_optimizer_subset_freezes_the_rest():
    torch.manual_seed(0)
    net = models.mlp(in_channels=1, size=4, classes=3, hidden=(8,))
    head = net[3]
    thresholds_and_leaks = [p for n, p in net.named_parameters() if n.endswith(("threshold", "leak"))]
    learner = STOP(net, torch.optim.SGD(list(head.parameters()) + thresholds_and_leaks, lr=0.5))
    frozen = net[1].weight.detach().clone()
    head_before = head.weight.detach().clone()
    for _ in range(4):
        learner.step(torch.rand(3, 1, 4, 4) * 3, torch.tensor([0, 1, 2]))
    learner.end_sample()
    assert torch.equal(frozen, net[1].weight) and not torch.equal(head_before, head.weight)
    assert net[1].w_trace is None  # frozen layers keep no trace


@pytest.mark.parametrize("make", ["bptt", "stop"])
def test_an_optimizer_over_another_network_is_refused(make):
    """An optimizer built before copy.deepcopy(net) holds none of the copy's parameters: without the
    check every parameter was frozen and the learner learned nothing, silently."""
    from stoprt.runtime.bptt import BPTT

    torch.manual_seed(0)
    net = models.mlp(in_channels=1, size=4, classes=3, hidden=(8,))
    copy_of_net = copy.deepcopy(net)
    cls = STOP if make == "stop" else BPTT
    with pytest.raises(ValueError, match=r"holds 8 tensor\(s\) and none of them are parameters of the network"):
        cls(copy_of_net, torch.optim.SGD(net.parameters(), lr=0.1))
    stray = torch.zeros(5, requires_grad=True)
    with pytest.raises(ValueError, match=r"and 8 of them .* shapes \(5,\)\); build it from this network"):
        cls(copy_of_net, torch.optim.SGD([*copy_of_net.parameters(), stray], lr=0.1))
    assert all(p.requires_grad for p in copy_of_net.parameters())  # refused before freezing anything


def test_a_shared_leak_has_one_range_and_is_clamped_and_counted_once():
    first = L.LIF("neuron", shape=4, leak=0.5, leak_range=(0.2, 0.8))
    with pytest.raises(ValueError, match=r"leak_range \(0.01, 0.99\) differs from \(0.2, 0.8\).*one range"):
        L.LIF("neuron", shape=4, leak_range=(0.01, 0.99), share_leak_with=first)
    second = L.LIF("neuron", shape=4, share_leak_with=first)
    assert second.leak is first.leak and second.leak_range == (0.2, 0.8)
    from stoprt.runtime.static_update import NeuronClamps

    with torch.no_grad():
        first.leak.fill_(0.9)
        first.threshold.fill_(-1.0)
        second.threshold[:2] = -1.0
    clamped = NeuronClamps([first, second], torch.device("cpu"))()
    assert int(clamped) == 1 + 4 + 2  # the shared leak once, as constrain_ counts
    assert float(first.leak.detach()) == pytest.approx(0.8) and bool((second.threshold >= second.threshold_floor).all())


def test_a_later_learner_can_learn_what_an_earlier_one_froze():
    torch.manual_seed(0)
    net = models.mlp(in_channels=1, size=4, classes=3, hidden=(8,))
    STOP(net, torch.optim.SGD(net.parameters(), lr=0.1), learn=("weight",))
    assert not net[2].threshold.requires_grad and not net[2].leak.requires_grad
    STOP(net, torch.optim.SGD(net.parameters(), lr=0.1), learn=("weight", "threshold", "leak"))
    assert net[2].threshold.requires_grad and net[2].leak.requires_grad
    frozen = L.LIF(shape=3, learn_threshold=False, learn_leak=False)
    small = L.Sequential(L.Linear(4, 3), frozen)
    STOP(small, torch.optim.SGD(small.parameters(), lr=0.1))
    assert not frozen.threshold.requires_grad and not frozen.leak.requires_grad


def test_without_the_parameter_copy_a_bad_update_raises():
    _, learner = _learner(lr=math.inf, keep_last_good=False)
    learner.step(torch.rand(2, 1, 4, 4) * 3, torch.tensor([0, 2]))
    with pytest.raises(FloatingPointError, match="cannot be undone"):
        learner.end_sample()
