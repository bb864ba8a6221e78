"""NIR import and export: round trips, the Euler equations, refusals, and SpikingJelly's NIR files."""

import numpy as np
import pytest
import torch
from torch import nn

from importer_helpers import T, assert_same_spikes, record
from stoprt.export.importers import ConversionError, export_nir, import_nir
from stoprt.runtime import layers as L


def _hard_net():
    torch.manual_seed(3)
    net = L.Sequential(L.Conv2d(2, 6, 3, padding=1), L.BatchNorm2d(6), L.LIF("channel", reset="hard", leak=0.7),
                       L.AvgPool2d(2), L.Flatten(), L.Linear(96, 20), L.LIF("neuron", reset="hard", leak=0.6),
                       L.Dropout(0.2), L.Linear(20, 5), L.LeakyReadout(leak=0.8), input_shape=(2, 8, 8)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[2].threshold.uniform_(0.4, 1.0)
        net[6].threshold.uniform_(0.2, 0.6)
        net[5].weight.mul_(3)
    return net.eval()


def test_nir_round_trip_keeps_spikes_and_outputs(tmp_path):
    pytest.importorskip("nir", reason="nir is not installed (pip install nir --no-deps; it needs h5py)")
    net = _hard_net()
    export_nir(net, tmp_path / "net.nir")
    back = import_nir(tmp_path / "net.nir", dtype=torch.float64)
    assert [type(m).__name__ for m in back] == ["Conv2d", "LIF", "AvgPool2d", "Flatten", "Linear", "LIF",
                                                "Linear", "LeakyReadout"]
    assert all(m.reset == "hard" for m in back if isinstance(m, L.LIF))
    xs = 2 * torch.rand(T, 4, 2, 8, 8, dtype=torch.float64)
    assert_same_spikes(record(net, L.LIF, xs), record(back, L.LIF, xs))
    assert torch.allclose(record(net, L.LeakyReadout, xs)[0], record(back, L.LeakyReadout, xs)[0], atol=1e-9)


def _euler_graph(nir):
    """A NIR chain with r != tau/dt, v_leak and v_reset set, sum pooling, CubaLIF and LI."""
    g = np.random.default_rng(4)
    c, n, dt = 3, 10, 1e-4
    full = lambda v, shape: np.full(shape, v)  # noqa: E731
    nodes = {
        "in": nir.Input(input_type={"input": np.array([2, 6, 6])}),
        "conv": nir.Conv2d(input_shape=(6, 6), weight=g.normal(0, 1.0, (c, 2, 3, 3)), stride=1, padding="same",
                           dilation=1, groups=1, bias=g.normal(0, 0.1, c)),
        "lif": nir.LIF(tau=full(5e-4, (c, 6, 6)), r=full(2.0, (c, 6, 6)), v_leak=full(0.1, (c, 6, 6)),
                       v_threshold=np.repeat(g.uniform(0.4, 0.8, (c, 1, 1)), 36).reshape(c, 6, 6),
                       v_reset=full(-0.1, (c, 6, 6))),
        "pool": nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]), padding=np.array([0, 0])),
        "flat": nir.Flatten(input_type={"input": np.array([c, 3, 3])}, start_dim=0, end_dim=-1),
        "fc": nir.Linear(weight=g.normal(0, 0.5, (n, c * 9))),
        "cuba": nir.CubaLIF(tau_syn=full(2e-4, n), tau_mem=full(4e-4, n), r=g.uniform(2, 4, n), v_leak=full(0.0, n),
                            v_threshold=g.uniform(0.2, 0.5, n), w_in=full(1.5, n)),
        "fc2": nir.Affine(weight=g.normal(0, 0.5, (4, n)), bias=g.normal(0, 0.1, 4)),
        "li": nir.LI(tau=full(3e-4, 4), r=full(1.5, 4), v_leak=full(0.2, 4)),
        "out": nir.Output(output_type={"output": np.array([4])}),
    }
    order = list(nodes)
    return nir.NIRGraph(nodes=nodes, edges=list(zip(order[:-1], order[1:])), type_check=False), dt


def _euler_reference(graph, dt, xs):
    """The graph stepped by forward Euler, as the nir module docstring states (float64 numpy)."""
    n = graph.nodes
    conv = torch.nn.functional.conv2d
    v1 = np.full((xs.shape[1], 3, 6, 6), -0.1)  # the membrane starts at v_reset
    i2 = v2 = np.zeros((xs.shape[1], 10))
    v3 = np.zeros((xs.shape[1], 4))
    spikes, outs = [[], []], []
    for x in xs.numpy():
        cur = conv(torch.from_numpy(x), torch.from_numpy(n["conv"].weight), torch.from_numpy(n["conv"].bias),
                   padding=1).numpy()
        lif = n["lif"]
        v1 = v1 + dt / lif.tau * (lif.v_leak - v1 + lif.r * cur)
        s1 = (v1 > lif.v_threshold).astype(float)
        v1 = np.where(s1 > 0, lif.v_reset, v1)
        pooled = s1.reshape(-1, 3, 3, 2, 3, 2).sum((3, 5)).reshape(len(x), -1)
        cu = n["cuba"]
        i2 = i2 + dt / cu.tau_syn * (-i2 + cu.w_in * (pooled @ n["fc"].weight.T))
        v2 = v2 + dt / cu.tau_mem * (cu.v_leak - v2 + cu.r * i2)
        s2 = (v2 > cu.v_threshold).astype(float)
        v2 = np.where(s2 > 0, cu.v_reset, v2)
        li = n["li"]
        v3 = v3 + dt / li.tau * (li.v_leak - v3 + li.r * (s2 @ n["fc2"].weight.T + n["fc2"].bias))
        spikes[0].append(s1), spikes[1].append(s2), outs.append(v3)
    return [torch.from_numpy(np.stack(s)) for s in spikes], torch.from_numpy(np.stack(outs))


def test_nir_import_follows_the_euler_equations():
    nir = pytest.importorskip("nir", reason="nir is not installed")
    graph, dt = _euler_graph(nir)
    net = import_nir(graph, dt=dt, dtype=torch.float64)
    assert [type(m).__name__ for m in net] == ["Conv2d", "LIF", "AvgPool2d", "Flatten", "Linear", "LeakyReadout",
                                               "LIF", "Linear", "LeakyReadout"]
    xs = torch.rand(T, 3, 2, 6, 6, dtype=torch.float64)
    spikes, outs = _euler_reference(graph, dt, xs)
    assert_same_spikes(spikes, record(net, L.LIF, xs))
    assert torch.allclose(outs, record(net, L.LeakyReadout, xs)[1], atol=1e-9)


def test_nir_export_refuses_soft_reset_unless_allowed(tmp_path):
    nir = pytest.importorskip("nir", reason="nir is not installed")
    net = L.Sequential(L.Linear(4, 3), L.LIF(reset="soft"), input_shape=(4,))
    with pytest.raises(ConversionError, match=r"layer 1 \(LIF\): reset='soft'.*allow_reset_change"):
        export_nir(net, tmp_path / "a.nir")
    assert not (tmp_path / "a.nir").exists()
    graph = export_nir(net, tmp_path / "a.nir", allow_reset_change=True)
    assert isinstance(graph.nodes["1"], nir.LIF) and np.all(graph.nodes["1"].v_reset == 0)
    res = L.Sequential(L.Residual(L.Sequential(L.Linear(4, 4))), L.LIF(reset="hard"), input_shape=(4,))
    with pytest.raises(ConversionError, match="Residual.*sequential"):
        export_nir(res)


def test_nir_import_refuses_branches_and_unsupported_nodes(tmp_path):
    nir = pytest.importorskip("nir", reason="nir is not installed")
    lin = lambda: nir.Linear(weight=np.ones((3, 3)))  # noqa: E731
    lif = nir.LIF(tau=np.full(3, 1e-3), r=np.full(3, 10.0), v_leak=np.zeros(3), v_threshold=np.ones(3))
    nodes = {"in": nir.Input(input_type={"input": np.array([3])}), "a": lin(), "b": lin(), "lif": lif,
             "out": nir.Output(output_type={"output": np.array([3])})}
    branch = nir.NIRGraph(nodes=nodes, edges=[("in", "a"), ("in", "b"), ("a", "lif"), ("b", "lif"), ("lif", "out")],
                          type_check=False)
    with pytest.raises(ConversionError, match="'in'.*feeds.*sequential chains"):
        import_nir(branch)
    delay = nir.NIRGraph.from_list(lin(), nir.Delay(delay=np.ones(3)), lif, type_check=False)
    with pytest.raises(ConversionError, match=r"\(Delay\) is not supported"):
        import_nir(delay)
    if_graph = nir.NIRGraph.from_list(lin(), nir.IF(r=np.ones(3), v_threshold=np.ones(3)), type_check=False)
    with pytest.raises(ConversionError, match="integrate-and-fire.*strictly between 0 and 1"):
        import_nir(if_graph)
    (tmp_path / "bad.nir").write_bytes(b"not hdf5")
    with pytest.raises(ConversionError, match="not a readable NIR file"):
        import_nir(tmp_path / "bad.nir")



def test_nir_files_interoperate_with_spikingjelly(tmp_path):
    pytest.importorskip("spikingjelly.activation_based.nir_exchange",
                        reason="spikingjelly with nirtorch is not installed (pip install --no-deps)")
    from spikingjelly.activation_based import layer, neuron
    from spikingjelly.activation_based.nir_exchange import from_nir, to_nir
    torch.manual_seed(5)
    sj = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), neuron.LIFNode(tau=2.5), layer.AvgPool2d(2),
                       layer.Flatten(), layer.Linear(64, 10), neuron.LIFNode(tau=3.0, decay_input=False,
                                                                             v_threshold=0.5)).eval()
    with torch.no_grad():
        sj[0].weight.mul_(3)
    to_nir.export_to_nir(sj, torch.zeros(1, 2, 8, 8), tmp_path / "sj.nir")
    ours = import_nir(tmp_path / "sj.nir")
    xs = 3 * torch.rand(T, 3, 2, 8, 8)
    assert_same_spikes(record(sj, neuron.BaseNode, xs), record(ours, L.LIF, xs))
    export_nir(ours, tmp_path / "ours.nir")
    back, state, spikes = from_nir.import_from_nir(tmp_path / "ours.nir"), None, []
    with torch.no_grad():
        for x in xs:
            out, state = back(x, state)
            spikes.append(out)
    assert torch.equal(torch.stack(spikes), record(ours, L.LIF, xs)[-1])
