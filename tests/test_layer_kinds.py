"""The registry of layer kinds: one declaration per layer, read by wiring, planner, hybrid and export."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from stoprt.devices.cost.meters import SavedTensorsMeter
from stoprt.devices.cost.planner import MemoryPlanner
from stoprt.export.hybrid import split_network
from stoprt.export.onnx_step import StepFunction
from stoprt.runtime import layers as L
from stoprt.runtime.kinds import KINDS, TORCH_LAYERS
from stoprt.runtime.stop import STOP
from stoprt.runtime.wiring import WiringError, wire

ROOT = Path(__file__).resolve().parents[1]


class Scale(nn.Module):
    """A layer stoprt does not ship: a fixed positive factor, linear and fixed in time."""

    KIND = L.CURRENT_PASS

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def keeps(self, ctx: L.StepContext) -> list[L.Kept]:
        return []  # a product with a Python number keeps no tensor for backward


def test_every_layer_of_stoprt_has_its_role():
    expected = {"Linear": L.SYNAPSE, "Conv2d": L.SYNAPSE, "LIF": L.NEURON, "LeakyReadout": L.NEURON,
                "BatchNorm2d": L.AFFINE_PASS, "Dropout": L.CURRENT_PASS, "AvgPool2d": L.CURRENT_PASS,
                "AdaptiveAvgPool2d": L.CURRENT_PASS, "Flatten": L.CURRENT_PASS, "Identity": L.CURRENT_PASS,
                "MaxPool2d": L.SPIKE_PASS, "Residual": L.RESIDUAL, "Sequential": L.SEQUENCE}
    assert {name: L.layer_kind(getattr(L, name)) for name in expected} == expected
    exported = [obj for obj in vars(L).values() if isinstance(obj, type) and issubclass(obj, nn.Module)]
    assert all(L.layer_kind(cls) in KINDS for cls in exported)
    assert all(kind in KINDS for kind, _ in TORCH_LAYERS.values())
    assert L.layer_kind(L.LIF()) == L.NEURON and L.layer_kind(nn.Sequential()) == L.SEQUENCE


def test_an_unknown_layer_is_named():
    with pytest.raises(L.UnknownLayerError, match=r"torch.nn.modules.activation.ReLU is not a layer stoprt knows"):
        L.layer_kind(nn.ReLU())
    with pytest.raises(L.UnknownLayerError, match="Linear is a plain torch layer; use its stoprt"):
        L.layer_kind(nn.Linear(2, 2))
    assert L.layer_kind(nn.ReLU(), strict=False) is None
    with pytest.raises(WiringError, match=r"0 \(ReLU\): .*ReLU is not a layer stoprt knows"):
        wire(nn.Sequential(nn.ReLU(), L.Linear(2, 2), L.LIF()))


def _scaled_net() -> L.Sequential:
    return L.Sequential(L.Linear(6, 5), Scale(0.5), L.LIF(), Scale(2.0), L.Flatten(), L.Linear(5, 3),
                        L.LIF(), input_shape=(6,))


def test_a_layer_that_declares_its_role_is_followed_everywhere():
    """Wiring, the planner and hybrid splits know a new layer from its own declaration alone."""
    torch.manual_seed(0)
    net = _scaled_net()
    targets = wire(net)
    assert targets[net[0]] == [net[2]] and targets[net[5]] == [net[6]]  # the current crossed Scale
    backbone, head = split_network(net, 4)  # LIF, Scale: spikes still cross the boundary
    assert len(backbone) == 4 and head.input_shape == (5,)

    net = _scaled_net()
    plan = MemoryPlanner(net).plan("stop", batch=2, T=3)
    meter = SavedTensorsMeter(net)
    learner = STOP(net, torch.optim.SGD(net.parameters(), lr=1e-3), loss=meter.loss())
    with meter:
        for _ in range(3):
            meter.new_step()
            learner.step(torch.rand(2, 6), torch.tensor([0, 2]))
    assert (plan.saved_and_state, plan.state) == (meter.peak_total, meter.state_at_peak)


def test_neuron_state_is_read_and_written_by_name():
    lif, readout = L.LIF(), L.LeakyReadout()
    assert lif.state_names == ("u", "s") and readout.state_names == ("u",)
    assert lif.get_state() == {"u": None, "s": None}
    lif(torch.full((2, 3), 2.0))
    state = lif.get_state()
    assert torch.equal(state["s"], torch.ones(2, 3)) and torch.equal(state["u"], torch.full((2, 3), 2.0))
    lif.set_state({"u": torch.zeros(2, 3), "s": torch.zeros(2, 3)})
    assert torch.equal(lif(torch.full((2, 3), 0.5)), torch.zeros(2, 3))  # 0.5 * 0 + 0.5 < 1
    with pytest.raises(ValueError, match=r"LeakyReadout has no state \['s'\]; its state is \['u'\]"):
        readout.set_state({"s": torch.zeros(1)})
    fn = StepFunction(L.Sequential(L.Linear(4, 3), L.LIF(), L.Linear(3, 2), L.LeakyReadout()))
    assert fn.state_names == ["state.1.u", "state.1.s", "state.3.u"]


def _runtime_module(node: ast.ImportFrom, package: list[str]) -> str:
    """The absolute module an ``from X import ...`` reads, for a file in ``package``."""
    if node.level == 0:
        return node.module or ""
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(path: Path, rel: Path) -> list[str]:
    """Private names of stoprt.runtime that ``path`` (at ``rel`` in the repository) imports or reads."""
    package = ["stoprt", *rel.parts[:-1]]
    tree = ast.parse(path.read_text(), str(rel))
    bound, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _runtime_module(node, package)
            if module == "stoprt.runtime" or module.startswith("stoprt.runtime."):
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{rel}:{node.lineno} imports {module}.{alias.name}")
                    bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("stoprt.runtime"):
                    bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = ast.unparse(node.value)
            if root in bound or root.startswith("stoprt.runtime"):
                found.append(f"{rel}:{node.lineno} reads {root}.{node.attr}")
    return found


# White-box uses, each named: the dataset tests empty the in-memory cache they test (runtime.datasets
# has no public way to do that yet).
KNOWN = {("tests/test_emulator.py", "datasets._cached_frames")}


def test_no_module_outside_runtime_uses_a_private_name_of_runtime():
    files = [p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in ("runtime", ".venv", "runs")]
    assert len(files) > 50  # export, devices, examples, tests, cli.py
    found = [use for p in files for use in _private_uses(p, p.relative_to(ROOT))]
    found = [use for use in found if (use.split(":")[0], use.rsplit(" ", 1)[1]) not in KNOWN]
    assert not found, "\n".join(found)


def test_the_private_name_check_sees_both_forms(tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text("from stoprt.runtime import layers as lyr\nfrom stoprt.runtime.pooling import _pair\n"
                     "import stoprt.runtime.functional as SF\nx = lyr._PlainState\ny = SF._sum_to_shape\n"
                     "z = lyr.Neuron\nfrom ..runtime.functional import _reduce_product\n")
    found = _private_uses(probe, Path("export", "probe.py"))
    assert [f.split(" ", 1)[1] for f in found] == [
        "imports stoprt.runtime.pooling._pair", "imports stoprt.runtime.functional._reduce_product",
        "reads lyr._PlainState", "reads SF._sum_to_shape"]


def test_a_layer_without_its_declaration_is_named():
    class Half(nn.Module):
        KIND = L.CURRENT_PASS

        def forward(self, x):
            return x / 2

    ctx = L.StepContext("stop", True, lambda p: False)
    with pytest.raises(L.UnknownLayerError, match="Half declares KIND but not keeps"):
        L.step_keeps(Half(), ctx)
    assert L.step_keeps(L.Flatten(), ctx) is None  # a view
    assert L.step_keeps(L.MaxPool2d(2), ctx)[1] == L.Kept("indices", L.Steps.EVERY, L.OUTPUT, elsize=8)
