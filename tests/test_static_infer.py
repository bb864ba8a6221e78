"""``STOP.infer``: a step of a sample that will not learn. Its outputs and predictions are those of
``step(x)``; under the static step it leaves the traces alone; a learning step after it in the same
sample is refused in both modes."""

import copy

import pytest
import torch

from stoprt.runtime import models
from stoprt.runtime.stop import STOP


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


NETS = {
    "mlp-readout": lambda: models.mlp(in_channels=2, size=8, classes=3, hidden=(12,), readout=True),
    "dvs_gesture": lambda: models.dvs_gesture_net(in_channels=2, size=8, classes=3, width=0.125),
    "resnet18": lambda: models.resnet18(in_channels=2, size=8, classes=3, width=1 / 32),
}


def _learner(net, mode):
    return STOP(net, torch.optim.SGD(net.parameters(), lr=0.1), update="sample", compile=mode)


@pytest.mark.parametrize("name", list(NETS))
def test_infer_gives_the_outputs_of_step_and_leaves_the_traces(name):
    torch.manual_seed(0)
    net = NETS[name]().eval()  # no dropout draws: the three learners see the same network
    learners = {k: _learner(copy.deepcopy(net), m) for k, m in
                (("traced", "static"), ("infer", "static"), ("eager", "eager"))}
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 2])
    for sample in range(3):
        xs = [1.5 * torch.rand(2, 2, 8, 8, generator=g) for _ in range(6)]
        for x in xs[:2]:  # a labelled sample first: the traces and parameters move
            for lr in learners.values():
                lr.step(x, y)
        for lr in learners.values():
            lr.end_sample()
        outs = {k: [lr.step(x) if k == "traced" else lr.infer(x) for x in xs] for k, lr in learners.items()}
        for a, b, c in zip(outs["traced"], outs["infer"], outs["eager"]):
            assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)
        preds = {k: lr.end_sample() for k, lr in learners.items()}
        assert torch.equal(preds["traced"], preds["infer"]) and torch.equal(preds["infer"], preds["eager"])
    assert all(lr.stats.updates == 3 for lr in learners.values())


def test_infer_leaves_the_trace_buffers_untouched():
    torch.manual_seed(0)
    lr = _learner(NETS["mlp-readout"](), "static")
    lr.step(torch.rand(2, 2, 8, 8), torch.tensor([0, 1]))
    traces = [lr.net[1].w_trace, lr.net[2].th_trace, lr.net[2].a_trace, lr.net[4].a_trace]
    before = [t.clone() for t in traces]
    for _ in range(3):
        lr.infer(torch.rand(2, 2, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, traces))
    lr.step(torch.rand(2, 2, 8, 8))  # a traced step of the same sample moves them (the check can fail)
    assert not all(torch.equal(a, b) for a, b in zip(before, traces))


@pytest.mark.parametrize("mode", ["static", "eager"])
def test_learning_after_infer_in_the_same_sample_is_refused(mode):
    torch.manual_seed(0)
    lr = _learner(NETS["mlp-readout"](), mode)
    x, y = torch.rand(2, 2, 8, 8), torch.tensor([0, 1])
    lr.infer(x)
    with pytest.raises(ValueError, match="infer"):
        lr.step(x, y)
    lr.end_sample()
    lr.step(x, y)  # a new sample learns
    lr.end_sample()
    assert lr.stats.updates == 1
