"""Importers from snnTorch, SpikingJelly and NIR: the imported network fires exactly like the source.

Each library's neuron equations are also written out here as small reference modules (with the same
state-dict keys), so the spec + state-dict path is tested without the libraries; where a library is
installed, its own neurons are checked against the reference and imported as instances.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from stoprt.cli import main
from stoprt.export.importers import ConversionError, from_snntorch, from_spikingjelly, snntorch_layers
from stoprt.runtime import layers as L
from stoprt.runtime.stop import STOP

from importer_helpers import T, assert_same_spikes, record


class RefLeaky(nn.Module):
    """snnTorch's Leaky (reset_delay=True) as documented in export/importers/snntorch.py."""

    def __init__(self, beta, threshold=1.0, mechanism="subtract", graded=1.0):
        super().__init__()
        self.register_buffer("beta", torch.as_tensor(beta, dtype=torch.float32))
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32))
        self.register_buffer("graded_spikes_factor", torch.as_tensor(graded))
        self.register_buffer("reset_mechanism_val", torch.as_tensor({"subtract": 0, "zero": 1}[mechanism]))
        self.mem = None

    def forward(self, x):
        mem = torch.zeros_like(x) if self.mem is None else self.mem
        reset = (mem - self.threshold > 0).to(x.dtype)
        beta = self.beta.clamp(0, 1)
        if int(self.reset_mechanism_val) == 0:
            self.mem = beta * mem + x - reset * self.threshold
        else:
            self.mem = beta * (1 - reset) * mem + x
        return (self.mem - self.threshold > 0).to(x.dtype) * self.graded_spikes_factor


class RefNode(nn.Module):
    """SpikingJelly's LIFNode / ParametricLIFNode (charge, fire at >=, reset), as in spikingjelly.py."""

    def __init__(self, tau=None, w=None, decay_input=True, v_threshold=1.0, v_reset=0.0):
        super().__init__()
        self.tau, self.decay_input, self.v_threshold, self.v_reset = tau, decay_input, v_threshold, v_reset
        if w is not None:
            self.w = nn.Parameter(torch.tensor(float(w)))
        self.v = None

    def forward(self, x):
        vr = 0.0 if self.v_reset is None else self.v_reset
        v = torch.full_like(x, vr) if self.v is None else self.v
        k = 1.0 / self.tau if self.tau is not None else self.w.sigmoid()
        h = v + (x - (v - vr)) * k if self.decay_input else v - (v - vr) * k + x
        s = (h - self.v_threshold >= 0).to(x.dtype)
        self.v = h - s * self.v_threshold if self.v_reset is None else (1 - s) * h + s * vr
        return s


def _snn_reference(graded=0.5):
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6),
        RefLeaky(0.85, 0.4 + 0.6 * torch.rand(6, 1, 1)), nn.MaxPool2d(2), nn.Dropout(0.3), nn.Flatten(),
        nn.Linear(96, 20), RefLeaky(torch.full((20,), 0.7), 0.3 + torch.rand(20), "zero", graded),
        nn.Linear(20, 5), RefLeaky(0.9, 0.5))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[6].weight.mul_(3)
        net[8].weight.mul_(3)
    return net.eval()


SNN_SPEC = {"input_shape": [2, 8, 8], "layers": [
    {"type": "nn.Conv2d", "padding": 1}, {"type": "BatchNorm2d"}, {"type": "snn.Leaky", "learn_threshold": True},
    {"type": "MaxPool2d", "kernel_size": 2}, {"type": "Dropout", "p": 0.3}, {"type": "Flatten"},
    {"type": "Linear", "in_features": 96}, {"type": "Leaky", "learn_beta": True}, {"type": "Linear"},
    {"type": "Leaky"}]}


def test_snntorch_spec_and_state_dict_fire_like_the_reference():
    ref = _snn_reference()
    net = from_snntorch(SNN_SPEC, ref.state_dict())
    xs = 2 * torch.rand(T, 4, 2, 8, 8)
    assert_same_spikes(record(ref, RefLeaky, xs), record(net, L.LIF, xs), factors=[1, 0.5, 1])
    assert torch.allclose(ref[-1].mem, net[-1].u, atol=1e-5)
    lifs = L.neurons(net)
    assert [m.reset for m in lifs] == ["soft_nodecay", "hard", "soft_nodecay"]
    assert lifs[0].threshold.requires_grad and not lifs[0].leak.requires_grad and lifs[1].leak.requires_grad
    assert lifs[0].granularity == "channel" and lifs[1].threshold.shape == (20,) and lifs[2].granularity == "layer"


def test_snntorch_library_matches_the_reference_and_imports_as_an_instance():
    snn = pytest.importorskip("snntorch", reason="snntorch is not installed (pip install snntorch --no-deps)")
    ref = _snn_reference(graded=1.0)
    leaky = [i for i, m in enumerate(ref) if isinstance(m, RefLeaky)]
    real = nn.Sequential(*[snn.Leaky(beta=ref[i].beta.clone(), threshold=ref[i].threshold.clone(),
                                     reset_mechanism="zero" if int(ref[i].reset_mechanism_val) else "subtract",
                                     init_hidden=True, learn_threshold=i == 2) if i in leaky else m
                           for i, m in enumerate(ref)]).eval()
    xs = 2 * torch.rand(T, 4, 2, 8, 8)
    theirs = record(real, snn.Leaky, xs)
    for a, b in zip(record(ref, RefLeaky, xs), theirs):
        assert torch.equal(a, b)
    net = from_snntorch(real, input_shape=(2, 8, 8))
    assert_same_spikes(theirs, record(net, L.LIF, xs))
    assert L.neurons(net)[0].threshold.requires_grad and not L.neurons(net)[1].threshold.requires_grad
    instant = nn.Sequential(nn.Linear(8, 16), snn.Leaky(0.8, 0.5, reset_mechanism="zero", reset_delay=False,
                                                         init_hidden=True)).eval()
    xs = 2 * torch.rand(T, 4, 8)  # an immediate zero reset gives the spikes of the delayed one
    assert_same_spikes(record(instant, snn.Leaky, xs), record(from_snntorch(instant), L.LIF, xs))


def test_imported_subtract_network_learns_weights_thresholds_and_leaks_with_stop():
    torch.manual_seed(6)
    spec = [{"type": "Linear"}, {"type": "Leaky", "beta": 0.8, "learn_beta": True, "learn_threshold": True},
            {"type": "Linear"}, {"type": "Leaky", "beta": 0.7}]
    net = from_snntorch(spec, {"0.weight": torch.randn(16, 8), "2.weight": torch.randn(3, 16)}).train()
    learner = STOP(net, torch.optim.SGD(net.parameters(), lr=0.1))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for x in torch.rand(5, 4, 8):
        learner.step(x, torch.tensor([0, 1, 2, 0]))
    learner.end_sample()
    changed = {n for n, p in net.named_parameters() if not torch.equal(before[n], p)}
    assert {"0.weight", "1.threshold", "1.leak", "2.weight"} <= changed and not {"3.threshold", "3.leak"} & changed


def _sj_reference():
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), RefNode(tau=2.5, v_reset=None), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(96, 20), RefNode(w=-0.4, v_reset=0.2, v_threshold=0.9),
        nn.Linear(20, 5), RefNode(tau=4.0, decay_input=False, v_threshold=0.7))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].weight.mul_(3)
        net[5].weight.mul_(8)
        net[7].weight.mul_(3)
    return net.double().eval()


SJ_SPEC = [{"type": "layer.Conv2d", "padding": 1}, {"type": "layer.BatchNorm2d"},
           {"type": "neuron.LIFNode", "tau": 2.5, "v_reset": None}, {"type": "AvgPool2d", "kernel_size": 2},
           {"type": "Flatten"}, {"type": "Linear"},
           {"type": "ParametricLIFNode", "v_reset": 0.2, "v_threshold": 0.9}, {"type": "Linear"},
           {"type": "LIFNode", "tau": 4.0, "decay_input": False, "v_threshold": 0.7}]


def _sj_membranes_match(ref_nodes, net):
    """SpikingJelly's v (after the reset, offset v_reset) against stoprt's U (before it)."""
    for node, lif in zip(ref_nodes, L.neurons(net)):
        vr = 0.0 if node.v_reset is None else node.v_reset
        after = lif.u - lif.threshold * lif.s if lif.reset == "soft" else lif.u * (1 - lif.s)
        assert torch.allclose(node.v, after + vr, atol=1e-5)


def test_spikingjelly_spec_folds_one_over_tau_and_fires_like_the_reference():
    ref = _sj_reference()
    net = from_spikingjelly(SJ_SPEC, ref.state_dict(), input_shape=(2, 8, 8))
    assert net[1].weight.dtype == torch.float64
    xs = 3 * torch.rand(T, 4, 2, 8, 8, dtype=torch.float64)
    assert_same_spikes(record(ref, RefNode, xs), record(net, L.LIF, xs))
    _sj_membranes_match([m for m in ref if isinstance(m, RefNode)], net)
    lifs = L.neurons(net)
    assert [m.reset for m in lifs] == ["soft", "hard", "hard"]
    assert torch.allclose(lifs[0].leak, torch.tensor(0.6, dtype=torch.float64))
    assert torch.allclose(net[1].weight, ref[1].weight / 2.5)  # 1/tau folded into BatchNorm's affine
    assert torch.allclose(lifs[1].threshold, torch.tensor(0.7, dtype=torch.float64))  # 0.9 - v_reset


def test_spikingjelly_library_matches_the_reference_and_imports_as_an_instance():
    pytest.importorskip("spikingjelly", reason="spikingjelly is not installed (pip install spikingjelly --no-deps)")
    from spikingjelly.activation_based import functional, layer, neuron
    ref = _sj_reference()
    real = nn.Sequential(layer.Conv2d(2, 6, 3, padding=1), layer.BatchNorm2d(6), neuron.LIFNode(tau=2.5, v_reset=None),
                         layer.AvgPool2d(2), layer.Flatten(), layer.Linear(96, 20),
                         neuron.ParametricLIFNode(v_reset=0.2, v_threshold=0.9), layer.Linear(20, 5),
                         neuron.LIFNode(tau=4.0, decay_input=False, v_threshold=0.7)).double().eval()
    real.load_state_dict(ref.state_dict())
    functional.reset_net(real)
    xs = 3 * torch.rand(T, 4, 2, 8, 8, dtype=torch.float64)
    theirs = record(real, neuron.BaseNode, xs)
    for a, b in zip(record(ref, RefNode, xs), theirs):
        assert torch.equal(a, b)
    net = from_spikingjelly(real, input_shape=(2, 8, 8))
    assert_same_spikes(theirs, record(net, L.LIF, xs))
    _sj_membranes_match([m for m in real if isinstance(m, neuron.BaseNode)], net)


def test_unsupported_layers_and_values_are_named():
    state = _snn_reference().state_dict()
    spec = json.loads(json.dumps(SNN_SPEC))
    spec["layers"][2]["type"] = "Synaptic"
    with pytest.raises(ConversionError, match=r"layer 2 \(snnTorch Synaptic\) is not supported"):
        from_snntorch(spec, state)
    per_neuron = dict(state, **{"7.beta": torch.linspace(0.5, 0.9, 20)})
    with pytest.raises(ConversionError, match="layer 7.*beta differs between neurons.*one leak per layer"):
        from_snntorch(SNN_SPEC, per_neuron)
    with pytest.raises(ConversionError, match="layer 2.*unknown keys \\['paddin'\\]"):
        from_spikingjelly([*SJ_SPEC[:2], {"type": "LIFNode", "paddin": 1}], _sj_reference().state_dict())
    with pytest.raises(ConversionError, match="IFNode.*not supported"):
        from_spikingjelly([{"type": "Linear"}, {"type": "IFNode"}], {"0.weight": torch.ones(2, 2)})
    with pytest.raises(ConversionError, match="state dict entry '0.weight': it has NaN or Inf values"):
        from_snntorch([{"type": "Linear"}, {"type": "Leaky", "beta": 0.5}], {"0.weight": torch.full((2, 2), np.nan)})
    with pytest.raises(ConversionError, match="spec says beta=0.5, the state dict holds"):
        from_snntorch([{"type": "Linear"}, {"type": "Leaky", "beta": 0.5}],
                      {"0.weight": torch.ones(2, 2), "1.beta": torch.tensor(0.8)})


def test_mismatched_shapes_are_named():
    state = _snn_reference().state_dict()
    wrong = json.loads(json.dumps(SNN_SPEC))
    wrong["layers"][6]["in_features"] = 80
    with pytest.raises(ConversionError, match="layer 6.*in_features=80, but the weights say 96"):
        from_snntorch(wrong, state)
    chain = [{"type": "Linear"}, {"type": "Leaky", "beta": 0.5}, {"type": "Linear"}, {"type": "Leaky", "beta": 0.5}]
    with pytest.raises(ConversionError, match=r"layer 2 \(snnTorch Linear\) expects 6 input features, but layer 0 "
                                              r"\(snnTorch Linear\) gives 5"):
        from_snntorch(chain, {"0.weight": torch.ones(5, 4), "2.weight": torch.ones(3, 6)})
    with pytest.raises(ConversionError, match=r"layer 6 \(snnTorch Linear\) does not fit its input of shape"):
        from_snntorch(SNN_SPEC, state, input_shape=(2, 10, 10))
    with pytest.raises(ConversionError, match="entries no layer of the spec uses.*'9.threshold'"):
        from_snntorch(SNN_SPEC["layers"][:9], state)
    with pytest.raises(ConversionError, match="bias has shape \\(4,\\)"):
        from_snntorch(chain[:2], {"0.weight": torch.ones(5, 4), "0.bias": torch.ones(4)})


def test_cli_imports_a_state_dict_with_a_spec(tmp_path, capsys):
    ref = _snn_reference(graded=1.0)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    (tmp_path / "spec.json").write_text(json.dumps(SNN_SPEC))
    out = tmp_path / "model.pt"
    assert main(["import", str(tmp_path / "w.pt"), "--from", "snntorch", "--spec", str(tmp_path / "spec.json"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "10 layers" in printed and "hard, soft_nodecay" in printed and "BPTT" in printed
    assert out.is_file()
    ours = from_snntorch(SNN_SPEC, ref.state_dict())
    xs = 2 * torch.rand(T, 4, 2, 8, 8)
    assert_same_spikes(record(ours, L.LIF, xs), record(_read_model(out), L.LIF, xs))


def _read_model(path):
    """The network of a file ``stoprt import`` wrote: a model file, or the checkpoint fallback."""
    try:
        from stoprt.export.model_file import load_model
    except ImportError:
        architecture = pytest.importorskip("stoprt.export.architecture", reason="export/architecture.py absent")
        data = torch.load(path, weights_only=True)
        net = architecture.build(data["model"]["architecture"])
        net.load_state_dict(data["model_state"])
        return net.eval()
    loaded = load_model(path)
    net = loaded[0] if isinstance(loaded, tuple) else getattr(loaded, "net", loaded)
    return net.eval()


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    torch.save({"0.weight": torch.ones(2, 2)}, tmp_path / "w.pt")
    assert main(["import", str(tmp_path / "w.pt"), "--from", "spikingjelly", "--out", str(tmp_path / "m.pt")]) == 2
    assert "needs --spec" in capsys.readouterr().err
    (tmp_path / "spec.json").write_text(json.dumps([{"type": "Linear"}, {"type": "Conv3d"}]))
    assert main(["import", str(tmp_path / "w.pt"), "--from", "snntorch", "--spec", str(tmp_path / "spec.json"),
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert "layer 1 (snnTorch Conv3d) is not supported" in capsys.readouterr().err
    (tmp_path / "code.pt").write_bytes(b"garbage")
    assert main(["import", str(tmp_path / "code.pt"), "--from", "snntorch", "--spec", str(tmp_path / "spec.json"),
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_layers_describe_what_build_makes():
    layers, shape = snntorch_layers(SNN_SPEC, _snn_reference().state_dict())
    assert shape == (2, 8, 8)
    assert [layer.kind for layer in layers][:3] == ["Conv2d", "BatchNorm2d", "LIF"]
    assert layers[2].kwargs["reset"] == "soft_nodecay" and layers[2].kwargs["threshold"] == "channel"
