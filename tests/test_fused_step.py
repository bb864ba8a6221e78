"""The fused step (``compile="fused"``, runtime/fused.py): the static program compiled by torch.compile
computes what the static step computes, is compiled once per (model, batch size), and falls back to the
unfused static step when compiling fails.

Equality is checked step by step against the static step (itself equal to the eager learner in
float64, test_static_step.py), in float32: the fused step refuses float64 (see runtime/fused.py).
After every step and every sample's end, every tensor the step reads or writes (buffers, parameters,
gradients, optimizer state) must agree within 1e-5 of its scale, and the fused learner's are then
set to the static learner's, so that rounding (Inductor's fused loops round differently from torch's
ops) never compounds over the 200 steps while a wrong or dropped update still fails at once.
"""

import copy
import warnings

import pytest
import torch
from test_exactness import _randomise
from test_static_step import KINDS, _net, _optimizer

from stoprt.runtime import models
from stoprt.runtime.stop import STOP

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (Inductor's own)


@pytest.fixture(autouse=True)
def one_thread_and_room_to_compile():
    """One thread (tiny tensors); and room for every configuration's graphs: Dynamo keeps them per
    function for the whole process, eight by default (the fallback test lowers it on purpose)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch.set_num_threads(previous)


def _tensors(learner) -> list[torch.Tensor]:
    """What a step reads or writes, in an order two learners of copied networks share."""
    params = list(learner.net.parameters())
    state = [learner.optimizer.state[p] for p in params]
    return (learner._static.state() + params + [p.grad for p in params if p.grad is not None]
            + [s[k] for s in state for k in sorted(s) if isinstance(s[k], torch.Tensor)])


def _agree_then_align(static, fused, what: str) -> None:
    ours, theirs = _tensors(static), _tensors(fused)
    assert len(ours) == len(theirs) > 0
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(ours, theirs)):
            scale = a.abs().max().item() if a.numel() else 0.0
            err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            assert err <= 1e-5 * scale + 1e-7, f"{what}, tensor {i} {tuple(a.shape)}: error {err:.3e} vs scale {scale:.3e}"
            b.copy_(a)


@pytest.mark.parametrize("name,readout,learn,update,loss,opt", [
    ("mlp", False, "W", "step", "ce", "adam"),
    ("mlp", True, "WTL", 3, "mse", "momentum"),
    ("dvs_gesture", True, "WTL", "sample", "mse", "momentum"),
    ("vgg11", False, "WL", 3, "ce", "adam"),
    ("resnet18", True, "WT", "sample", "ce", "sgd"),
])
def test_fused_equals_the_static_step_at_every_step(name, readout, learn, update, loss, opt):
    torch.manual_seed(0)
    net = _net(name, readout)
    _randomise(net, seed=1)
    twin = copy.deepcopy(net)
    static, fused = (STOP(n, _optimizer(opt, n.parameters()), learn=KINDS[learn], update=update, loss=loss,
                          compile=mode) for n, mode in ((net, "static"), (twin, "fused")))
    g = torch.Generator().manual_seed(3)
    for sample in range(20):
        y = torch.randint(0, 3, (2,), generator=g)
        seed = int(torch.randint(0, 2**31, (), generator=g))
        for t in range(10):
            x = 1.5 * torch.rand(2, 2, 8, 8, generator=g)
            target = None if (sample + t) % 7 == 0 else y
            outs = []
            for learner in (static, fused):
                torch.manual_seed(seed + t)  # the same dropout masks
                outs.append(learner.step(x, target))
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
            _agree_then_align(static, fused, f"sample {sample} step {t}")
        assert torch.equal(static.end_sample(), fused.end_sample())
        _agree_then_align(static, fused, f"end of sample {sample}")
    assert fused.mode == "fused"  # compiled, not fallen back
    for k in ("steps", "samples", "updates", "rejected_updates", "clamped_values"):
        assert getattr(static.stats, k) == getattr(fused.stats, k), k
    assert static.stats.steps == 200 and static.stats.updates >= 20


def test_float64_is_not_fused_and_says_why():
    torch.manual_seed(0)
    net = models.mlp(in_channels=2, size=8, classes=3, hidden=(16,)).double()
    learner = STOP(net, torch.optim.SGD(net.parameters(), lr=0.1), compile="fused")
    with pytest.warns(RuntimeWarning, match="float64 is not fused: torch.compile drops in-place updates"):
        learner.step(torch.rand(2, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 1]))
    assert learner.mode == "static"


def _demo(update="sample"):
    torch.manual_seed(0)
    net = models.mlp(in_channels=2, size=8, classes=3, hidden=(16,))
    return net, STOP(net, torch.optim.Adam(net.parameters(), lr=1e-2), update=update, compile="fused")


def test_compiled_once_across_steps_samples_updates_and_input_layouts():
    """After the first step, nothing the stream does recompiles the step (``fail_on_recompile`` raises
    if a guard fails): labelled and unlabelled steps, infer(), updates, sample ends, and inputs that
    are views of other layouts (the step copies them into its own tensors)."""
    net, learner = _demo(update=2)
    x, y = torch.rand(2, 2, 8, 8) * 2, torch.tensor([0, 2])
    learner.step(x, y)
    engine = learner._static
    tracked = engine.state() + [p.grad for p in net.parameters()]
    before = [t.data_ptr() for t in tracked]
    strided = (torch.rand(8, 8, 2, 2) * 2).permute(3, 2, 0, 1)  # [2, 2, 8, 8], not contiguous
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(3):
            for t in range(5):
                learner.step(strided if t % 2 else x, None if t == 3 else y)
            learner.end_sample()
        for _ in range(3):
            learner.infer(x)
        learner.end_sample()
    assert [t.data_ptr() for t in tracked] == before
    assert learner.stats.updates >= 6 and learner.mode == "fused"


def test_failed_compile_falls_back_to_the_static_step_with_one_warning():
    """A real compile failure: with Dynamo's recompile limit at one, a second batch size cannot be
    compiled. The learner says why once, runs the static step unfused, and learns as it would."""
    net, learner = _demo()
    learner.step(torch.rand(2, 2, 8, 8), torch.tensor([0, 1]))
    learner.end_sample()
    twin = copy.deepcopy(net)
    static = STOP(twin, torch.optim.Adam(twin.parameters(), lr=1e-2), compile="static")
    # (a copy: on a CPU load_state_dict keeps the very tensors it is given, Adam's step counts too)
    static.optimizer.load_state_dict(copy.deepcopy(learner.optimizer.state_dict()))
    x, y = torch.rand(3, 2, 8, 8) * 2, torch.tensor([0, 1, 2])
    with torch._dynamo.config.patch(recompile_limit=1), \
            pytest.warns(RuntimeWarning, match="runs the static step unfused: torch.compile failed") as caught:
        out = learner.step(x, y)
    assert len([w for w in caught if w.category is RuntimeWarning]) == 1 and learner.mode == "static"
    torch.testing.assert_close(out, static.step(x, y), rtol=1e-6, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            torch.testing.assert_close(learner.step(x, y), static.step(x, y), rtol=1e-6, atol=1e-7)
        assert torch.equal(learner.end_sample(), static.end_sample())
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_callable_loss_is_refused_by_the_fused_step_with_the_reason():
    net = models.mlp(in_channels=1, size=4, classes=3)
    with pytest.warns(RuntimeWarning, match="a callable loss"):
        learner = STOP(net, torch.optim.SGD(net.parameters(), lr=0.1), loss=lambda o, y: o.sum(), compile="fused")
    assert learner.mode == "eager"


def test_unknown_compile_mode_names_the_choices():
    net = models.mlp(in_channels=1, size=4, classes=3)
    with pytest.raises(ValueError, match="'auto', 'static', 'fused', 'eager'"):
        STOP(net, torch.optim.SGD(net.parameters(), lr=0.1), compile="inductor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_graphs_equal_eager():
    torch.manual_seed(0)
    net = models.dvs_gesture_net(in_channels=2, size=8, classes=3, width=0.125).cuda().eval()  # no dropout
    twin = copy.deepcopy(net)
    fused = STOP(net, torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True), update="step",
                 compile="fused")
    eager = STOP(twin, torch.optim.Adam(twin.parameters(), lr=1e-3, capturable=True), compile="eager",
                 update="step")
    assert fused.mode == "fused_graphs"
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(5):
        y = torch.randint(0, 3, (2,), device="cuda", generator=g)
        for t in range(10):
            x = torch.rand(2, 2, 8, 8, device="cuda", generator=g) * 2
            a, b = fused.step(x, None if t == 4 else y), eager.step(x, None if t == 4 else y)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(fused.end_sample(), eager.end_sample())
    assert fused.mode == "fused_graphs" and fused.stats.updates == eager.stats.updates
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_steps_that_cannot_be_captured_leave_the_unfused_ones_tried_then_eager():
    """Here capture fails for want of CUDA (as test_static_step's capture fallback): the compiled
    steps first, said once, then the unfused ones, which is the learner's fallback to eager; it then
    learns as the eager learner does."""
    torch.manual_seed(0)
    net = models.mlp(in_channels=2, size=8, classes=3, hidden=(16,))
    twin = copy.deepcopy(net)
    fused = STOP(net, torch.optim.SGD(net.parameters(), lr=0.1), compile="fused")
    eager = STOP(twin, torch.optim.SGD(twin.parameters(), lr=0.1), compile="eager")
    fused._static.use_graphs = True  # what a CUDA learner does
    x, y = torch.rand(2, 2, 8, 8) * 2, torch.tensor([0, 2])
    with pytest.warns(RuntimeWarning) as caught:
        out = fused.step(x, y)
    said = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(said) == 2 and "compiled steps could not be captured" in said[0]
    assert "CUDA graph capture failed" in said[1] and fused.mode == "eager"
    assert torch.equal(out, eager.step(x, y))
    assert torch.equal(fused.end_sample(), eager.end_sample())
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)
