"""The static STOP step (runtime/static.py) equals the eager learner, and is capturable.

Equality: the same network (copied), the same data and dropout draws, run by ``compile="eager"`` and
``compile="static"`` side by side in float64 for 200 steps with updates; every step's output, the
predictions, the counters and the final parameters must agree within 1e-6 relative to each
parameter's scale (observed: ~1e-16, a few rounding steps: sums are ordered differently, e.g. two
LIFs sharing one leak accumulate into its gradient one after the other).
"""

import copy
import math
import warnings

import pytest
import torch
from test_exactness import _freeze_bn, _randomise, conv_residual, mlp as oracle_mlp, oracle_grads, preact_stream
from torch.utils._python_dispatch import TorchDispatchMode

from stoprt.runtime import layers as L, models
from stoprt.runtime.learner import LOSSES
from stoprt.runtime.stop import STOP

KINDS = {"W": ("weight",), "WT": ("weight", "threshold"), "WL": ("weight", "leak"),
         "WTL": ("weight", "threshold", "leak")}
SYNCING = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits (on a loaded machine, 10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _net(name: str, readout: bool) -> L.Sequential:
    small = dict(size=8, classes=3, readout=readout)
    if name == "mlp":
        return models.mlp(in_channels=2, hidden=(12, 8), **small)
    if name == "dvs_gesture":
        return models.dvs_gesture_net(in_channels=2, width=0.125, **small)
    if name == "vgg11":
        return models.vgg11(in_channels=2, width=1 / 32, **small)
    return models.resnet18(in_channels=2, width=1 / 32, **small)


def _optimizer(kind: str, params):
    if kind == "adam":
        return torch.optim.Adam(params, lr=2e-2)
    return torch.optim.SGD(params, lr=0.2, momentum=0.9 if kind == "momentum" else 0.0)


def _pair(name, readout, learn, update, loss, opt, device_update=False):
    torch.manual_seed(0)
    net = _net(name, readout)
    _randomise(net, seed=1)
    twin = copy.deepcopy(net)
    eager = STOP(net, _optimizer(opt, net.parameters()), learn=KINDS[learn], update=update, loss=loss,
                 compile="eager")
    static = STOP(twin, _optimizer(opt, twin.parameters()), learn=KINDS[learn], update=update, loss=loss,
                  compile="static")
    assert eager.mode == "eager" and static.mode == "static"
    static._static.update.host_decisions = not device_update  # the CUDA update's path, on a CPU
    return eager, static


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-6) -> None:
    scale = max(a.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def _run_both(eager, static, samples=20, T=10, batch=2, shape=(2, 8, 8), unlabelled_every=7, tol=1e-6,
              loss_tol=1e-9):
    g = torch.Generator().manual_seed(3)
    step = 0
    for _ in range(samples):
        xs = [1.5 * torch.rand(batch, *shape, generator=g) for _ in range(T)]
        y = torch.randint(0, 3, (batch,), generator=g)
        seed = int(torch.randint(0, 2**31, (), generator=g))
        outs = []
        for learner in (eager, static):
            torch.manual_seed(seed)  # the same dropout masks
            outs.append([learner.step(x, None if (step + t) % unlabelled_every == 0 else y)
                         for t, x in enumerate(xs)])
            outs[-1].append(learner.end_sample())
        step += T
        for t, (a, b) in enumerate(zip(*outs)):
            _close(a.double(), b.double(), f"output at step {t}", tol)
    for k in ("steps", "samples", "updates", "rejected_updates", "clamped_values"):
        assert getattr(eager.stats, k) == getattr(static.stats, k), k
    assert math.isclose(eager.stats.last_loss, static.stats.last_loss, rel_tol=loss_tol)
    assert eager.stats.steps == static.stats.steps == samples * T >= 200
    names = dict(eager.net.named_parameters())
    for n, p in static.net.named_parameters():
        _close(names[n].detach(), p.detach(), n, tol)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("build,shape,loss", [(oracle_mlp, (12,), "ce"), (lambda: conv_residual(True), (2, 8, 8), "mse"),
                                              (preact_stream, (2, 8, 8), "ce")], ids=["mlp", "conv-readout", "preact"])
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_both_modes_equal_the_truncated_graph_oracle(build, shape, loss, mode):
    """test_exactness checks the default (static on a CPU); the eager reference keeps its own check."""
    torch.manual_seed(0)
    net = build()
    _randomise(net, seed=5)
    _freeze_bn(net)
    xs, y = [1.5 * torch.rand(3, *shape) for _ in range(5)], torch.randint(0, 3, (3,))
    params, expected = oracle_grads(net, xs, y, LOSSES[loss], seed=11)
    learner = STOP(net, torch.optim.SGD(params, lr=0.0), update="sample", loss=loss, compile=mode)
    assert learner.mode == mode
    torch.manual_seed(11)
    for x in xs:
        learner.step(x, target=y)
    for p, g_ref in zip(params, expected):
        _close(g_ref, p.grad, "gradient")
    assert sum(bool(g.abs().max() > 0) for g in expected) >= 0.6 * len(expected)


MLP_CASES = [(learn, update, loss) for learn in KINDS for update in ("step", 3, "sample") for loss in ("ce", "mse")]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("learn,update,loss", MLP_CASES)
def test_static_equals_eager_mlp(learn, update, loss):
    eager, static = _pair("mlp", loss == "mse", learn, update, loss, "momentum" if update == 3 else "sgd",
                          device_update=update != "sample")
    _run_both(eager, static)
    assert eager.stats.updates > 0


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name,readout,learn,update,loss,opt,device_update", [
    ("dvs_gesture", False, "WTL", "sample", "ce", "adam", False),
    ("dvs_gesture", True, "WT", "step", "mse", "sgd", False),
    ("vgg11", False, "WTL", 4, "ce", "momentum", True),
    ("vgg11", True, "WL", "sample", "mse", "adam", False),
    ("resnet18", True, "WTL", "step", "ce", "sgd", False),
    ("resnet18", False, "W", 3, "mse", "adam", True),
])
def test_static_equals_eager_conv_nets(name, readout, learn, update, loss, opt, device_update):
    eager, static = _pair(name, readout, learn, update, loss, opt, device_update)
    _run_both(eager, static)


def test_static_equals_eager_in_float32_on_the_demo_mlp():
    torch.manual_seed(0)
    net = models.mlp(in_channels=2, size=16, classes=10)
    twin = copy.deepcopy(net)
    eager = STOP(net, torch.optim.Adam(net.parameters(), lr=1e-3), compile="eager")
    static = STOP(twin, torch.optim.Adam(twin.parameters(), lr=1e-3), compile="static")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = torch.rand(10, 1, 2, 16, 16, generator=g) * 2, torch.randint(0, 10, (1,), generator=g)
        for x_t in x:
            assert torch.equal(eager.step(x_t, y), static.step(x_t, y))
        assert torch.equal(eager.end_sample(), static.end_sample())
    for (n, a), b in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


# ---- capturability -----------------------------------------------------------------------------

class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _static(update="sample", **kw):
    torch.manual_seed(0)
    net = models.dvs_gesture_net(in_channels=2, size=8, classes=3, width=0.125)
    return net, STOP(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), update=update, **kw)


@pytest.mark.usefixtures("float64")
def test_frozen_batchnorm_statistics_loaded_between_samples_reach_the_static_step():
    """The program copies the frozen BN map at each sample's start only when the layer recomputed it:
    statistics loaded in place (a checkpoint, a fleet merge) between samples must still be used."""
    eager, static = _pair("dvs_gesture", False, "WTL", "sample", "ce", "sgd")
    g = torch.Generator().manual_seed(5)
    x, y = 1.5 * torch.rand(2, 2, 8, 8, generator=g), torch.tensor([0, 2])
    for round_ in range(3):
        for learner in (eager, static):
            torch.manual_seed(round_)
            outs = [learner.step(x, y) for _ in range(4)]
            learner.end_sample()
            learner.outs = outs
        for a, b in zip(eager.outs, static.outs):
            _close(a, b, f"output in round {round_}")
        stats = {k: v.clone() for k, v in eager.net.state_dict().items() if "running" in k}
        for k in stats:
            stats[k].uniform_(0.5, 1.5, generator=g)
        for learner in (eager, static):
            learner.net.load_state_dict(stats, strict=False)  # in place: the buffers keep their addresses
    assert len(stats) == 6


def test_auto_is_static_on_cpu_and_eager_stays_available():
    assert _static()[1].mode == "static"
    assert _static(compile="eager")[1].mode == "eager"


def test_buffers_keep_their_addresses_across_steps_and_samples():
    net, learner = _static(update=2)
    x, y = torch.rand(2, 2, 8, 8) * 2, torch.tensor([0, 2])
    learner.step(x, y)
    engine = learner._static
    tracked = engine.state() + [p.grad for p in net.parameters() if p.requires_grad]
    tracked += [t for s in learner.optimizer.state.values() for t in s.values()]
    before = [t.data_ptr() for t in tracked]
    assert len(before) > 20
    for _ in range(3):
        for _ in range(5):
            learner.step(x, y)
        learner.end_sample()
    assert [t.data_ptr() for t in tracked] == before
    assert [t.data_ptr() for t in engine.state()] == before[:len(engine.state())]
    assert learner.stats.updates > 5


def _ops_of(fn):
    with _Ops() as ops:
        fn()
    return ops.names


@pytest.mark.parametrize("update", ["step", "sample"])
def test_a_step_and_an_update_make_no_host_sync(update):
    _, learner = _static(update=update, check_inputs=False)
    learner._static.update.host_decisions = False  # as on CUDA (a CPU reads its flags on the host)
    x, y = torch.rand(2, 2, 8, 8) * 2, torch.tensor([0, 2])
    learner.step(x, y)  # the program is built (a dry run) at the first step of a batch size
    names = _ops_of(lambda: [learner.step(x, y), learner.step(x), learner.step(x, y)])
    if update == "sample":
        names += _ops_of(learner._static._apply_update)
    assert "aten::addmm" in names or "aten::mm" in names  # the inspection sees the step's ops
    assert any("non_finite_check" in n for n in names)  # ... and the update's
    assert not SYNCING & set(names), SYNCING & set(names)


def test_the_eager_step_does_sync_so_the_inspection_can_fail():
    _, learner = _static(compile="eager", check_inputs=False)
    names = _ops_of(lambda: learner.step(torch.rand(2, 2, 8, 8), torch.tensor([0, 2])))
    assert SYNCING & set(names)  # stats.last_loss = float(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_without_sync_and_equal_eager():
    torch.manual_seed(0)
    net = models.dvs_gesture_net(in_channels=2, size=8, classes=3, width=0.125).cuda().eval()  # no dropout
    twin = copy.deepcopy(net)
    graphs = STOP(net, torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True), update="step")
    eager = STOP(twin, torch.optim.Adam(twin.parameters(), lr=1e-3, capturable=True), compile="eager",
                 update="step")
    assert graphs.mode == "graphs"
    x, y = torch.rand(2, 2, 8, 8, device="cuda") * 2, torch.tensor([0, 2], device="cuda")
    outs = [graphs.step(x, y)]
    assert graphs.graph_pool_bytes() >= 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            outs += [graphs.step(x, y), graphs.step(x)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graphs.end_sample()
    ref = [eager.step(x, y)]
    for _ in range(5):
        ref += [eager.step(x, y), eager.step(x)]
    eager.end_sample()
    for a, b in zip(ref, outs):
        torch.testing.assert_close(a, b)
    for a, b in zip(twin.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert graphs.stats.updates == eager.stats.updates == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_non_capturable_adam_replays_the_steps_and_updates_uncaptured():
    """Adam without capturable=True keeps its step count on the host: the steps still replay as graphs,
    the update runs uncaptured, and the learner learns as the eager one does."""
    torch.manual_seed(0)
    net = models.mlp(in_channels=1, size=4, classes=3).cuda()
    twin = copy.deepcopy(net)
    graphs = STOP(net, torch.optim.Adam(net.parameters(), lr=1e-3), update=3)
    eager = STOP(twin, torch.optim.Adam(twin.parameters(), lr=1e-3), compile="eager", update=3)
    x, y = torch.rand(2, 1, 4, 4, device="cuda") * 3, torch.tensor([0, 1], device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for learner in (graphs, eager):
            for _ in range(7):
                learner.step(x, y)
            learner.end_sample()
    assert graphs.mode == "graphs" and graphs.stats.updates == eager.stats.updates == 3
    for a, b in zip(twin.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- bad input: the same errors and refusals as eager ------------------------------------------

def _mlp_pair(opt="adam", device_update=False, **kw):
    torch.manual_seed(0)
    net = models.mlp(in_channels=1, size=4, classes=3, hidden=(8,))
    twin = copy.deepcopy(net)
    make = (lambda p: torch.optim.Adam(p, lr=1e-2)) if opt == "adam" else (lambda p: torch.optim.SGD(p, lr=0.1))
    eager = STOP(net, make(net.parameters()), compile="eager", **kw)
    static = STOP(twin, make(twin.parameters()), compile="static", **kw)
    static._static.update.host_decisions = not device_update
    return eager, static


def test_batch_change_within_a_sample_is_the_eager_error_and_between_samples_replans():
    for learner in _mlp_pair():
        learner.step(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"input shape changed within a sample: \(2, 1, 4, 4\) then "
                                             r"\(3, 1, 4, 4\); call end_sample\(\) between samples"):
            learner.step(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]))
        learner.end_sample()
    eager, static = _mlp_pair()
    for batch in (2, 3, 1, 2):
        x, y = torch.rand(batch, 1, 4, 4) * 3, torch.randint(0, 3, (batch,))
        for _ in range(4):
            assert torch.equal(eager.step(x, y), static.step(x, y))
        assert torch.equal(eager.end_sample(), static.end_sample())
    assert len(static._static.programs) == 3  # one program per batch size, reused
    for a, b in zip(eager.net.parameters(), static.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_nan_input_raises_at_the_step(mode):
    learner = _mlp_pair()[mode == "static"]
    learner.step(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
    x = torch.rand(2, 1, 4, 4)
    x[1, 0, 2, 2] = math.inf
    with pytest.raises(ValueError, match="input at step 1 of the sample contains NaN or Inf"):
        learner.step(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels out of range: the network has 3 classes"):
        learner.step(torch.rand(2, 1, 4, 4), torch.tensor([0, 5]))


def test_inputs_on_a_device_are_checked_there_and_reported_at_end_sample():
    _, learner = _mlp_pair()
    learner._static.device_checks = True  # as for CUDA tensors: no host read inside the step
    x = torch.rand(2, 1, 4, 4)
    learner.step(x, torch.tensor([0, 1]))
    learner.step(x * math.nan, torch.tensor([0, 1]))  # recorded, not raised
    learner.step(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="input at step 1 of the sample contains NaN or Inf"):
        learner.end_sample()
    assert learner.stats.rejected_updates == 1  # the NaN reached the gradients: the guard refused it
    assert all(torch.isfinite(p).all() for p in learner.net.parameters())
    learner.step(x, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="labels out of range: the network has 3 classes"):
        learner.end_sample()
    for bad in (math.inf, -math.inf):
        x_bad = x.clone()
        x_bad[1, 0, 2, 3] = bad
        learner.step(x, torch.tensor([0, 1]))
        learner.step(x_bad)  # a step without a target is checked too
        with pytest.raises(ValueError, match="input at step 1 of the sample contains NaN or Inf"):
            learner.end_sample()
    big = torch.full_like(x, 3e38)  # finite, though its sum is not: no false alarm
    learner.step(big, torch.tensor([0, 1]))
    learner.end_sample()
    learner.step(x, torch.tensor([0, 1]))  # the learner goes on after the error
    assert learner.end_sample() is not None and learner.stats.updates >= 1


@pytest.mark.parametrize("device_update", [False, True], ids=["host-decisions", "device-decisions"])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_non_finite_update_is_refused_counted_and_the_last_good_kept(opt, device_update, caplog):
    """Finite inputs whose traces overflow: non-finite gradients. Both learners refuse the update,
    keep parameters *and* optimizer state, and then learn on alike."""
    eager, static = _mlp_pair(opt, device_update)
    good = torch.rand(2, 1, 4, 4) * 3
    huge = torch.full((2, 1, 4, 4), 3e38)
    y = torch.tensor([0, 2])
    for learner in (eager, static):
        for x in (good, huge, good):
            for _ in range(6):
                learner.step(x, y)
            learner.end_sample()
    assert "refused" in caplog.text
    for learner in (eager, static):
        assert learner.stats.rejected_updates == 1 and learner.stats.updates == 2
    for a, b in zip(eager.net.parameters(), static.net.parameters()):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device_update", [False, True], ids=["host-decisions", "device-decisions"])
def test_update_to_inf_from_finite_gradients_is_refused(device_update):
    eager, static = _mlp_pair("sgd", device_update)
    for learner in (eager, static):
        learner.optimizer.param_groups[0]["lr"] = math.inf
        before = [p.detach().clone() for p in learner.net.parameters()]
        for _ in range(3):
            learner.step(torch.rand(2, 1, 4, 4) * 3, torch.tensor([0, 2]))
        learner.end_sample()
        assert learner.stats.rejected_updates == 1 and learner.stats.updates == 0
        assert all(torch.equal(a, b) for a, b in zip(before, learner.net.parameters()))


@pytest.mark.parametrize("device_update", [False, True], ids=["host-decisions", "device-decisions"])
def test_without_the_parameter_copy_a_bad_update_raises_at_end_sample(device_update):
    _, static = _mlp_pair("sgd", device_update, keep_last_good=False)
    static.optimizer.param_groups[0]["lr"] = math.inf
    static.step(torch.rand(2, 1, 4, 4) * 3, torch.tensor([0, 2]))
    with pytest.raises(FloatingPointError, match="cannot be undone"):
        static.end_sample()


@pytest.mark.parametrize("opt,reason", [("sgd", "CUDA graph capture failed: "),
                                        ("adam", "CUDA graph capture failed: ")])
def test_failed_capture_falls_back_to_eager_with_one_warning(opt, reason):
    """Here capture fails for want of CUDA: the learner says why
    once, runs that step and all later ones eagerly, and learns exactly as the eager learner."""
    eager, static = _mlp_pair(opt)
    static._static.use_graphs = True  # what a CUDA learner does
    x, y = torch.rand(2, 1, 4, 4) * 3, torch.tensor([0, 2])
    with pytest.warns(RuntimeWarning, match=reason) as caught:
        out = static.step(x, y)
    assert len(caught) == 1 and static.mode == "eager"
    assert torch.equal(out, eager.step(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert torch.equal(static.step(x, y), eager.step(x, y))
        assert torch.equal(static.end_sample(), eager.end_sample())
    for a, b in zip(eager.net.parameters(), static.net.parameters()):
        assert torch.equal(a, b)
    assert static.stats.updates == eager.stats.updates == 1


def test_callable_loss_runs_eager():
    net = models.mlp(in_channels=1, size=4, classes=3)
    assert STOP(net, torch.optim.SGD(net.parameters(), lr=0.1), loss=lambda o, y: o.sum()).mode == "eager"
    with pytest.warns(RuntimeWarning, match="a callable loss"):
        STOP(net, torch.optim.SGD(net.parameters(), lr=0.1), loss=lambda o, y: o.sum(), compile="static")
