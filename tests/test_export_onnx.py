"""ONNX step export, the ONNX Runtime runner (and TensorRT where installed), and the hybrid deploy.

Parity: the exported step graph, streamed 200 steps through ONNX Runtime with the state ping-ponged
between buffers, against the torch runtime. The networks use dyadic parameters (multiples of
powers of two) and integer inputs, so every sum is exact in float32 whatever order an engine adds
in: spikes must then be identical and membranes equal, and a single flipped spike would show.
Generic float weights are checked step by step from the same state (teacher forcing), where only
the summation order differs.
"""

import copy

import numpy as np
import onnx
import pytest
import torch

from stoprt.export.hybrid import HybridSTOP, split_network
from stoprt.export.onnx_step import StepGraphError, export_step, read_signature
from stoprt.export.ort_runner import OrtStepRunner
from stoprt.export.runners import TorchStepRunner
from stoprt.runtime import layers as L, models

MODELS = {"mlp": dict(in_channels=2, size=16, classes=10),
          "vgg11": dict(in_channels=2, size=32, classes=10, width=0.25)}


def dyadic_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Lively parameters that are exact in float32 sums: weights k/2^n, BN with sqrt(var + eps) in
    {0.5, 1, 2}, thresholds and leaks on a 1/8 grid."""
    g = torch.Generator().manual_seed(seed)

    def pick(t, values):
        t.copy_(torch.tensor(values, dtype=t.dtype)[torch.randint(len(values), t.shape, generator=g)])

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (L.Conv2d, L.Linear)):
                scale = 2.0 ** -int(np.ceil(np.log2(np.sqrt(m.weight[0].numel()))))
                m.weight.copy_(torch.randint(-8, 9, m.weight.shape, generator=g) * (scale / 4))
                if m.bias is not None:
                    m.bias.copy_(torch.randint(-4, 5, m.bias.shape, generator=g) / 16)
            if isinstance(m, L.BatchNorm2d):
                m.eps = 2.0 ** -8
                pick(m.running_var, [1 - 2 ** -8, 4 - 2 ** -8, 0.25 - 2 ** -8])
                m.running_mean.copy_(torch.randint(-4, 5, m.running_mean.shape, generator=g) / 32)
                pick(m.weight, [0.5, 1.0, 1.5, 2.0])
                pick(m.bias, [0.0, 0.125, 0.25])
            if isinstance(m, L.LIF):
                pick(m.threshold, [0.5, 0.75, 1.0, 1.25])
            if isinstance(m, L.Neuron):
                pick(m.leak, [0.5, 0.625, 0.75, 0.875])
    return net


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, two OpenMP threads stall each other (~40x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (net, {params_as_inputs: path}) for the demo network and VGG-11."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        net = dyadic_(models.build_model(name, **kwargs))
        paths = {}
        for flavour in (False, True):
            paths[flavour] = root / f"{name}-{flavour}.onnx"
            export_step(net, paths[flavour], params_as_inputs=flavour)
        out[name] = (net, paths)
    return out


@pytest.mark.parametrize("params_as_inputs", [False, True], ids=["initializers", "params-as-inputs"])
@pytest.mark.parametrize("name", list(MODELS))
def test_streamed_parity_200_steps(exported, name, params_as_inputs):
    net, paths = exported[name]
    runner = OrtStepRunner(paths[params_as_inputs], parameters=net.state_dict() if params_as_inputs else None)
    reference = TorchStepRunner(net)
    for batch in (1, 3):  # one dynamic-batch file for both
        runner.reset()
        reference.reset()
        g = torch.Generator().manual_seed(batch)
        rates: dict[str, list[float]] = {}
        for t in range(200):
            x = torch.randint(0, 3, (batch, *net.input_shape), generator=g).float()
            y, y_ref = runner.step(x), reference.step(x)
            assert torch.equal(y, y_ref), f"output differs at step {t}"
            if t % 10 == 9 or t < 5:
                got, want = runner.state(), reference.state()
                assert got.keys() == want.keys()
                for key, value in want.items():
                    if key.endswith(".s"):
                        assert np.array_equal(got[key], value), f"{key} spikes differ at step {t}"
                        rates.setdefault(key, []).append(float(value.mean()))
                    else:
                        assert np.abs(got[key] - value).max() <= 1e-5, f"{key} membrane differs at step {t}"
        # Every layer spikes, so the comparison is not between two silent networks.
        assert min(np.mean(r) for r in rates.values()) > 0.01, rates


def test_generic_weights_one_step_from_the_same_state(exported):
    torch.manual_seed(1)
    net = models.build_model("vgg11", **MODELS["vgg11"])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, L.BatchNorm2d):
                m.weight.uniform_(0.7, 1.5)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, L.LIF):
                m.threshold.uniform_(0.3, 1.0)
    path = exported["vgg11"][1][False].with_name("generic.onnx")
    export_step(net, path)
    runner = OrtStepRunner(path)
    sig = runner.signature
    reference = TorchStepRunner(net)
    thresholds = {f"state.{p}.s": m.threshold.detach().numpy() for p, m in net.named_modules() if isinstance(m, L.LIF)}
    state = None
    for t in range(40):
        x = (torch.rand(3, *net.input_shape) < 0.3).float() * 2
        feeds = {"x": x.numpy(), **(state or {n: np.zeros((3, *s), np.float32) for n, s in sig.state})}
        y, *new = runner.session.run(None, feeds)
        reference.step(x)
        want = reference.state()
        got = dict(zip([n for n, _ in sig.state], new))
        for key, value in want.items():
            if key.endswith(".u"):
                assert np.abs(got[key] - value).max() <= 1e-5, key
            else:  # a spike may only differ where the membrane sits at the threshold
                u = want[key[:-2] + ".u"]
                flipped = got[key] != value
                assert np.all(np.abs(u - thresholds[key])[flipped] < 1e-5), key
        state = want  # teacher forcing: both start the next step from torch's state


def test_graph_structure_names_and_opsets(exported, tmp_path):
    net, paths = exported["mlp"]
    model = onnx.load(str(paths[False]))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"Greater", "Cast"} <= ops and not {"Loop", "Scan", "If"} & ops
    assert model.opset_import[0].version == 20
    inputs = [i.name for i in model.graph.input]
    assert inputs == ["x", "state.2.u", "state.2.s", "state.4.u", "state.4.s"]
    assert [o.name for o in model.graph.output] == ["y", "new_state.2.u", "new_state.2.s", "new_state.4.u",
                                                    "new_state.4.s"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input)  # dynamic batch
    assert {i.name for i in model.graph.initializer} >= {"param.1.weight", "param.2.threshold", "param.2.leak"}
    with_params = onnx.load(str(paths[True]))
    assert "param.1.weight" in [i.name for i in with_params.graph.input]
    assert not {i.name for i in with_params.graph.initializer} & {"param.1.weight", "param.2.threshold"}
    for opset in (18, 19):
        sig = export_step(net, tmp_path / f"o{opset}.onnx", opset=opset)
        assert onnx.load(str(tmp_path / f"o{opset}.onnx")).opset_import[0].version == opset == sig.opset
    with pytest.raises(StepGraphError, match="opset 17 is not supported"):
        export_step(net, tmp_path / "bad.onnx", opset=17)


def test_export_leaves_the_network_alone(tmp_path):
    net = models.build_model("mlp", **MODELS["mlp"])
    L.set_stop_mode(net, True)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_step(net, tmp_path / "m.onnx")
    assert net.training and net[2].stop_mode and net[2].u is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_parameters_as_inputs_update_without_rebuild(exported):
    net, paths = exported["mlp"]
    runner = OrtStepRunner(paths[True])
    x = torch.randint(0, 3, (2, *net.input_shape)).float()
    with pytest.raises(StepGraphError, match="call set_parameters"):
        runner.step(x)
    changed = dyadic_(models.build_model("mlp", **MODELS["mlp"]), seed=5)
    runner.set_parameters(changed.state_dict())
    reference = TorchStepRunner(changed)
    for _ in range(20):
        assert torch.equal(runner.step(x), reference.step(x))
    runner.set_parameters({"2.threshold": torch.full_like(changed[2].threshold, 100.0)})
    runner.step(x)
    assert not runner.state()["state.2.s"].any()  # the new threshold silenced the hidden layer
    with pytest.raises(ValueError, match="'1.weight' has shape"):
        runner.set_parameters({"1.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="'nope' is not an input"):
        runner.set_parameters({"nope": torch.zeros(1)})
    with pytest.raises(StepGraphError, match="baked in"):
        OrtStepRunner(paths[False]).set_parameters(net.state_dict())


def test_runner_errors_and_backend_swap(exported, tmp_path):
    net, paths = exported["mlp"]
    foreign = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["a"], ["b"])], "g",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(StepGraphError, match="not a stoprt step graph"):
        OrtStepRunner(tmp_path / "foreign.onnx")
    with pytest.raises(StepGraphError, match="not a stoprt step graph"):
        read_signature(tmp_path / "foreign.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(StepGraphError, match="cannot be loaded as an ONNX model"):
        OrtStepRunner(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError):
        OrtStepRunner(tmp_path / "missing.onnx")
    runner = OrtStepRunner(paths[False])
    with pytest.raises(ValueError, match=r"expected \[B, 2, 16, 16\]"):
        runner.step(np.zeros((1, 2, 8, 8), np.float32))
    x = np.random.default_rng(0).integers(0, 3, (2, *net.input_shape)).astype(np.float32)
    runner.step(x)
    with pytest.raises(ValueError, match="call reset"):
        runner.step(x[:1])
    # Same interface, numpy in and out, plain run or IO binding: a session can swap backends.
    plain = OrtStepRunner(paths[False], io_binding=False)
    for backend in (plain, runner, TorchStepRunner(net)):
        backend.reset()
    outs = [[b.step(x) for _ in range(15)] for b in (plain, runner, TorchStepRunner(net))]
    assert all(isinstance(o, np.ndarray) for o in outs[0])
    for a, b, c in zip(*outs):
        assert np.array_equal(a, b) and np.array_equal(b, c)
    runner.reset()
    assert not any(v.any() for v in runner.state().values())


def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(StepGraphError, match="no neuron layer"):
        export_step(L.Sequential(L.Linear(4, 2), input_shape=(4,)), tmp_path / "a.onnx")
    with pytest.raises(StepGraphError, match="input_shape"):
        export_step(L.Sequential(L.Linear(4, 2), L.LIF()), tmp_path / "b.onnx")


def test_shared_leak_network_exports_one_leak_input(tmp_path):
    torch.manual_seed(0)
    net = dyadic_(models.build_model("resnet18", in_channels=2, size=16, classes=10, width=0.125))
    sig = export_step(net, tmp_path / "r.onnx", params_as_inputs=True)
    assert sig.weights["4.leak"] == sig.weights["1.main.1.leak"]  # tied: one input serves both
    runner = OrtStepRunner(tmp_path / "r.onnx", parameters=net.state_dict())
    reference = TorchStepRunner(net)
    for _ in range(20):
        x = torch.randint(0, 3, (2, *net.input_shape)).float()
        assert torch.equal(runner.step(x), reference.step(x))


def test_tensorrt_engine_matches_onnx_runtime(exported, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (Jetson: python3-libnvinfer)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from stoprt.export.tensorrt import TrtStepRunner, build_engine
    net, paths = exported["mlp"]
    engine = build_engine(paths[False], tmp_path / "m.engine", max_batch=4, workspace_mib=256, refit=True)
    trt_runner, ort_runner = TrtStepRunner(engine), OrtStepRunner(paths[False])
    x = torch.randint(0, 3, (3, *net.input_shape)).float()
    for _ in range(50):
        assert torch.equal(trt_runner.step(x.cuda()).cpu(), ort_runner.step(x))
    changed = dyadic_(models.build_model("mlp", **MODELS["mlp"]), seed=7)
    trt_runner.refit(changed.state_dict())
    trt_runner.reset()
    reference = TorchStepRunner(changed)
    for _ in range(20):
        assert torch.equal(trt_runner.step(x.cuda()).cpu(), reference.step(x))


def test_hybrid_backbone_on_onnx_runtime_head_learns_with_stop(tmp_path):
    from stoprt.runtime.datasets import load_builtin
    train = load_builtin("digits", "train", T=10, size=16, n_samples=200)
    test = load_builtin("digits", "test", T=10, size=16, n_samples=100)
    torch.manual_seed(0)
    net = models.build_model("mlp", **MODELS["mlp"])
    with torch.no_grad():  # dyadic backbone weights: its spikes can be compared exactly below
        net[1].weight.mul_(256).round_().div_(256)
        net[1].bias.mul_(256).round_().div_(256)
    with pytest.raises(ValueError, match="must follow a LIF"):
        split_network(net, 2)
    hybrid = HybridSTOP(net, 3, lambda p: torch.optim.Adam(p, lr=3e-3), workdir=tmp_path)
    assert isinstance(hybrid.runner, OrtStepRunner) and (tmp_path / "backbone.onnx").is_file()
    backbone_ref = TorchStepRunner(copy.deepcopy(hybrid.backbone))
    backbone_before = net[1].weight.detach().clone()
    head_before = net[3].weight.detach().clone()
    threshold_before, leak_before = net[4].threshold.item(), net[4].leak.item()
    x_test = test.frames.float().transpose(0, 1)
    before = float((hybrid.predict(x_test) == test.labels).float().mean())
    for i in range(0, len(train), 2):
        frames, labels = train.frames[i:i + 2].float(), train.labels[i:i + 2]
        backbone_ref.reset()
        for x_t in frames.transpose(0, 1):
            hybrid.step(x_t, labels)
            ref = backbone_ref.step(x_t)
            assert np.array_equal(hybrid.runner.state()["state.2.s"], ref.numpy())
        hybrid.end_sample()
    after = float((hybrid.predict(x_test) == test.labels).float().mean())
    assert hybrid.stats.updates == 100 and hybrid.stats.rejected_updates == 0
    assert not torch.equal(net[3].weight, head_before) and torch.equal(net[1].weight, backbone_before)
    assert net[4].threshold.item() != threshold_before and net[4].leak.item() != leak_before
    print(f"hybrid: held-out accuracy {before:.2f} -> {after:.2f}")
    assert after > before + 0.2, (before, after)
