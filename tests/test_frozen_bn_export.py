"""A network whose BatchNorm a learner has frozen exports (issue 10, defect 3).

Frozen BatchNorm caches its affine map in eager mode; the exporter's tracer has tensors without storage,
so the cache must step aside while tracing (and the graph must compute the map from the buffers).
"""

import numpy as np
import pytest
import torch

from stoprt.export.bundle import load_bundle, write_bundle
from stoprt.export.hybrid import HybridSTOP
from stoprt.export.onnx_step import export_step
from stoprt.export.ort_runner import OrtStepRunner
from stoprt.export.runners import TorchStepRunner
from stoprt.runtime import layers as L
from stoprt.runtime.bptt import BPTT
from stoprt.runtime.stop import STOP


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bn_net() -> L.Sequential:
    """The issue's network, with statistics and affine values far from the identity map."""
    torch.manual_seed(0)
    net = L.Sequential(L.Conv2d(2, 4, 3, padding=1), L.BatchNorm2d(4), L.LIF(), L.Flatten(), L.Linear(256, 3),
                       L.LIF(), input_shape=(2, 8, 8))
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.0, 0.5]))
        bn.weight.copy_(torch.tensor([2.0, 0.5, 1.5, 1.0]))
        bn.bias.copy_(torch.tensor([0.5, 0.0, -0.25, 0.125]))
    return net


def _assert_same_steps(runner, net, steps: int = 8) -> None:
    torch.manual_seed(1)
    reference = TorchStepRunner(net)
    for _ in range(steps):
        x = torch.randint(0, 3, (2, 2, 8, 8)).float()
        np.testing.assert_allclose(np.asarray(runner.step(x)), reference.step(x).numpy(), atol=1e-5)
        np.testing.assert_array_equal(runner.state()["state.2.s"], reference.net[2].s.numpy())


def test_export_step_after_stop_froze_batchnorm_reads_the_parameters(tmp_path):
    net = _bn_net()
    STOP(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert net[1].frozen
    net.eval()
    with torch.no_grad():
        net(torch.ones(1, 2, 8, 8))  # fills the eager cache first, as a learner's steps do
    L.reset_state(net)
    export_step(net, tmp_path / "x.onnx", params_as_inputs=True)
    runner = OrtStepRunner(tmp_path / "x.onnx")
    runner.set_parameters(net.state_dict())
    _assert_same_steps(runner, net)
    # The graph computes the BN map from its inputs, not from a constant cached at trace time.
    with torch.no_grad():
        net[1].weight.mul_(-1.0)
        net[1].bias.add_(0.5)
    runner.reset()
    runner.set_parameters(net.state_dict())
    _assert_same_steps(runner, net)


def test_write_bundle_of_a_frozen_batchnorm_net(tmp_path):
    net = _bn_net()
    BPTT(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert net[1].frozen
    net.eval()
    write_bundle(tmp_path / "b", net, {"shape": [2, 8, 8]})
    _assert_same_steps(OrtStepRunner(load_bundle(tmp_path / "b").onnx_path), net)


def test_hybrid_stop_with_a_batchnorm_backbone(tmp_path):
    net = _bn_net()
    L.freeze_batchnorm(net)
    hybrid = HybridSTOP(net, 3, lambda p: torch.optim.SGD(p, lr=0.1), workdir=tmp_path)
    reference = TorchStepRunner(L.Sequential(*list(net)[:3], input_shape=(2, 8, 8)))
    torch.manual_seed(2)
    for _ in range(5):
        x = torch.randint(0, 3, (2, 2, 8, 8)).float()
        hybrid.step(x, torch.tensor([0, 2]))
        np.testing.assert_allclose(hybrid.runner.state()["state.2.s"], reference.step(x).numpy())
    hybrid.end_sample()
    assert hybrid.stats.updates == 1


def test_eager_cache_is_kept_and_follows_changes():
    bn = L.BatchNorm2d(3)
    L.freeze_batchnorm(bn)
    first = bn._frozen_affine()
    assert bn._frozen_affine() is first  # the eager fast path: no recomputation
    with torch.no_grad():
        bn.running_var.fill_(4.0)
    scale, _ = bn._frozen_affine()
    torch.testing.assert_close(scale, torch.full((3,), 0.5), atol=1e-5, rtol=0)
    bn.double()  # parameters keep their identity and version here; the key must still change
    assert bn._frozen_affine()[0].dtype == torch.float64
