"""Frozen BatchNorm: calibration from data and folding into the convolution."""

import torch

from stoprt.runtime import layers as L, models
from stoprt.runtime.batchnorm import calibrate_batchnorm, fold_batchnorm
from stoprt.runtime.stop import STOP


def _run(net, xs):
    L.reset_state(net)
    out = []
    with torch.no_grad():
        for x in xs:
            out.append(net(x))
            lifs = [m for m in net.modules() if isinstance(m, L.LIF)]
    return torch.stack(out), torch.cat([m.u.flatten() for m in lifs])


def test_calibration_sets_per_channel_statistics_of_the_currents():
    torch.manual_seed(0)
    net = models.dvs_gesture_net(in_channels=2, size=16, classes=4, width=0.25)
    bn = net[1]
    samples = [torch.rand(5, 8, 2, 16, 16) * 2 for _ in range(3)]
    steps = calibrate_batchnorm(net, samples)
    assert steps == 15
    conv_out = torch.cat([net[0](x) for s in samples for x in s])
    torch.testing.assert_close(bn.running_mean, conv_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, conv_out.var((0, 2, 3)), rtol=1e-3, atol=1e-5)
    assert bn.momentum == 0.1 and net[2].u is None


def test_fold_batchnorm_keeps_the_dynamics():
    torch.manual_seed(0)
    net = models.vgg11(in_channels=2, size=16, classes=5, width=0.125)
    calibrate_batchnorm(net, [torch.rand(3, 4, 2, 16, 16) * 2])
    L.freeze_batchnorm(net)
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    xs = [torch.rand(2, 2, 16, 16) * 2 for _ in range(6)]
    out_a, u_a = _run(net, xs)
    out_b, u_b = _run(folded, xs)
    torch.testing.assert_close(u_a, u_b, rtol=1e-4, atol=1e-5)
    assert (out_a == out_b).float().mean() > 0.999
    # The folded network is still one STOP can train.
    STOP(folded, torch.optim.SGD(folded.parameters(), lr=0.01)).step(xs[0], torch.tensor([0, 1]))


def test_both_learners_freeze_batchnorm():
    from stoprt.runtime.bptt import BPTT
    for make in (lambda n: STOP(n, torch.optim.SGD(n.parameters(), lr=0.1)),
                 lambda n: BPTT(n, torch.optim.SGD(n.parameters(), lr=0.1))):
        net = models.dvs_gesture_net(in_channels=2, size=16, classes=4, width=0.25)
        make(net)
        bns = [m for m in net.modules() if isinstance(m, L.BatchNorm2d)]
        assert all(m.frozen and not m.weight.requires_grad for m in bns)
