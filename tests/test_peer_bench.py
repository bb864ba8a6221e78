"""Smoke tests of the peer benchmark (examples/benchmarks/peers): its stoprt-only parts run here; the
parts that need snnTorch or SpikingJelly skip when those are not importable."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from stoprt.runtime import layers as L

PEERS_DIR = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS_DIR))

import bench_env  # noqa: E402
import peer_child  # noqa: E402
import peer_methods  # noqa: E402
import peer_nets  # noqa: E402
import peer_report  # noqa: E402


def _load_run():
    spec = importlib.util.spec_from_file_location("peers_run", PEERS_DIR / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child_args(**kw) -> argparse.Namespace:
    args = peer_child.parser().parse_args([kw.pop("task")])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


# ------------------------------------------------------------------------------ stoprt-only parts

def test_stop_memory_is_flat_in_T_and_bptt_grows():
    """The memory probe on stoprt's learners, in-process: STOP's saved bytes do not depend on T,
    BPTT's grow with it."""
    def saved(method, T):
        row = peer_child.memory(_child_args(task="memory", method=method, T=T, batch=2, size=16, width=0.125,
                                            threads=1))
        assert row["method"] == method and row["T"] == T and row["seconds_per_step"] > 0
        # what training holds covers what autograd saves, and the layers' state besides
        assert row["held_mib"] >= row["saved_for_backward_mib"] and row["state_mib"] > 0
        return row["saved_for_backward_mib"], row["held_mib"]

    short = saved("stop-wtl", 3)
    assert short[0] > 0 and saved("stop-wtl", 8) == pytest.approx(short)
    short, long = saved("bptt", 3), saved("bptt", 8)
    assert long[0] > 2 * short[0] > 0 and long[1] > 2 * short[1]


def test_stoprt_methods_train_and_predict_with_the_same_interface():
    ref = peer_nets.reference("mlp", 8, 10, 0.25, seed=0)
    xs = (torch.rand(4, 3, 2, 8, 8) < 0.3).float()
    y = torch.tensor([1, 2, 3])
    for name in ("stop-w", "stop-wtl", "bptt"):
        method = peer_methods.make(name, peer_nets.reference("mlp", 8, 10, 0.25, seed=0))
        before = [p.detach().clone() for p in method.net.parameters()]
        assert method.train_sample(xs, y).shape == (3,)
        assert any(not torch.equal(a, b) for a, b in zip(before, method.net.parameters())), name
        assert method.predict(xs).shape == (3,)
    assert all(n.surrogate == "atan" for n in L.neurons(ref))
    with pytest.raises(ValueError, match="unknown method"):
        peer_methods.make("sgd", ref)


def test_accuracy_child_trains_on_builtin_digits():
    # Settings at which STOP-WTL learns the 10 digits in ~1 s (0.50 held out here; chance is 0.10).
    row = peer_child.accuracy(_child_args(task="accuracy", method="stop-wtl", data="digits", model="mlp", size=8,
                                          width=0.5, T=4, epochs=3, batch=4, n_train=96, n_test=48, threads=1))
    assert row["n_train"] == 96 and row["n_test"] == 48 and len(row["history"]) == 3
    assert row["test_acc"] >= 0.3, row["history"]
    assert row["history"][-1]["test_acc"] > row["history"][0]["test_acc"] and row["history"][-1]["train_seconds"] > 0
    assert set(row["per_class_acc"]) <= set("0123456789") and sum(a > 0 for a in row["per_class_acc"].values()) >= 3


def test_rss_prediction_for_the_memory_cap():
    run = _load_run()
    assert run._predict_rss([], 100) is None
    assert run._predict_rss([{"T": 10, "rss_delta_mib": 50.0}], 100) == pytest.approx(500.0)
    two = [{"T": 10, "rss_delta_mib": 50.0}, {"T": 30, "rss_delta_mib": 130.0}]
    assert run._predict_rss(two, 100) == pytest.approx(130.0 + 4.0 * 70)


def test_missing_bench_env_is_a_clear_error(tmp_path):
    with pytest.raises(bench_env.BenchEnvError, match="could not start"):
        bench_env.check(tmp_path / "no-env")
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / bench_env._MARKER).write_text("{not json")
    assert bench_env._recorded(tmp_path / "env" / bench_env._MARKER) is None


def test_driver_stoprt_only_writes_json_and_page(tmp_path):
    # The driver runs in this process (its measurements run in child processes of their own either
    # way): a process of its own would only add a torch start-up.
    driver = _load_run()
    out = tmp_path / "results"
    argv = ["--quick", "--no-peers", "--sections", "timing", "--methods", "stop-wtl", "--threads", "1",
            "--out", str(out)]
    assert driver.main(argv) == 0
    timing = json.loads((out / "peers" / "timing.json").read_text())
    ms = timing["results"][0]["ms_per_step"]
    assert set(ms) == {"stop-wtl", "floor"} and all(v > 0 for v in ms.values())
    run = json.loads((out / "peers" / "run.json").read_text())
    assert run["notes"] == ["peers not run (--no-peers)"] and run["quick"]
    page = (tmp_path / "results.md").read_text()
    assert "Quick smoke run" in page and "stoprt STOP-WTL" in page and "peers not run" in page
    # the page is rebuilt from the JSON alone
    (tmp_path / "results.md").unlink()
    assert driver.main(["--report-only", "--out", str(out)]) == 0
    assert (tmp_path / "results.md").read_text() == page


def _fake_results(out: Path) -> None:
    """Raw JSON as run.py writes it, with numbers chosen so that each verdict is known."""
    (out / "peers").mkdir(parents=True)
    mem_rows = []
    for T in (10, 30):
        mem_rows += [{"method": "stop-wtl", "T": T, "batch": 8, "saved_for_backward_mib": 12.0, "held_mib": 14.0,
                      "rss_delta_mib": 50.0 + 0.1 * T, "seconds_per_step": 0.02},
                     {"method": "stop-w", "T": T, "batch": 8, "saved_for_backward_mib": 7.0, "held_mib": 9.0,
                      "rss_delta_mib": 40.0 + T, "seconds_per_step": 0.02},
                     {"method": "sj-ottt", "T": T, "batch": 8, "saved_for_backward_mib": 8.0, "held_mib": 11.0,
                      "rss_delta_mib": 48.0, "seconds_per_step": 0.03},
                     {"method": "sj-bptt", "T": T, "batch": 8, "saved_for_backward_mib": 7.5 * T, "held_mib": 8.0 * T,
                      "rss_delta_mib": 15.0 * T, "seconds_per_step": 0.02}]
    mem_rows.append({"method": "sj-bptt", "T": 300, "batch": 8, "skipped": "predicted RSS ~4500 MiB exceeds the cap"})
    files = {
        "run": {"date": "2026-01-01 00:00 UTC", "command": "python run.py", "threads": 2, "notes": [], "quick": False,
                "machine": {"cpu": "test cpu", "cores": 2, "memory_gib": 24, "platform": "linux",
                            "versions": {"torch": "2.x"}},
                "peers_env": {"snntorch": "1.0.0", "spikingjelly": "2.0.0", "torch": "2.x"}, "total_seconds": 60},
        "memory": {"config": {"Ts": [10, 30, 300], "width": 0.5, "size": 32, "batch": 8}, "rows": mem_rows,
                   "tree": {"commit": "abc1234", "modified": []}},
        "timing": {"config": {"T": 10, "repeats": 3}, "tree": {"commit": "abc1234", "modified": ["runtime/stop.py"]},
                   "results": [
            {"name": "small", "width": 0.5, "size": 32, "batch": 8,
             "ms_per_step": {"stop-wtl": 20.0, "sj-bptt": 15.0, "sj-ottt": 30.0, "floor": 16.0}}]},
        "accuracy": {"config": {"model": "dvs_gesture", "size": 16, "width": 1.0, "T": 10, "epochs": 3, "batch": 16,
                                "lr": 1e-3, "seed": 0, "datasets": ["digits"]},
                     "rows": [{"method": "stop-wtl", "data": "digits", "test_acc": 0.80, "seconds": 30, "n_train": 9,
                               "n_test": 3, "per_class_acc": {"0": 1.0, "1": 0.5}},
                              {"method": "sj-bptt", "data": "digits", "test_acc": 0.85, "seconds": 20, "n_train": 9,
                               "n_test": 3, "per_class_acc": {"0": 0.9, "1": 0.55}}]},
        "latency": {"config": {"model": "dvs_gesture", "size": 32, "width": 1.0, "threads": 1, "steps": 10, "rounds": 2},
                    "backends": {"stoprt-torch": {"median_us": 300, "p99_us": 400, "mean_us": 310,
                                                  "same_output_as_stoprt_torch": 1.0},
                                 "spikingjelly": {"median_us": 250, "p99_us": 900, "mean_us": 270,
                                                  "same_output_as_stoprt_torch": 1.0}},
                    "skipped": {"stoprt-ort": "not available"}},
    }
    for name, data in files.items():
        (out / "peers" / f"{name}.json").write_text(json.dumps(data))


def test_report_verdicts_and_losses_come_from_the_numbers(tmp_path):
    out = tmp_path / "results"
    _fake_results(out)
    page = peer_report.write(out).read_text()
    targets = page.split("## Targets")[1].split("## 1.")[0]
    assert "STOP-WTL memory flat in T (T=10 to 30) | held +0%, RSS +2.0 MiB | **met**" in targets
    assert "STOP-W memory flat in T (T=10 to 30) | held +0%, RSS +20.0 MiB | **not met**" in targets
    assert ("STOP-W below every peer at T >= 30 (held for training) | 9.00 MiB vs SpikingJelly OTTT 11.00 MiB "
            "(T=30) | **met**") in targets
    assert ("STOP-WTL below every peer at T >= 30 (held for training) | 14.00 MiB vs SpikingJelly OTTT 11.00 MiB "
            "(T=30) | **not met**") in targets
    assert ("STOP-W below every peer at T >= 30 (saved for backward, for reference) | 7.00 MiB vs SpikingJelly "
            "OTTT 8.00 MiB (T=30) | **met**") in targets
    assert ("STOP-WTL below every peer at T >= 30 (saved for backward, for reference) | 12.00 MiB vs SpikingJelly "
            "OTTT 8.00 MiB (T=30) | **not met**") in targets
    assert "within 1.3x of the floor (small) | 1.250x | **met**" in targets
    assert "| stoprt STOP-WTL | 20.0 | 1.25 |" in page
    assert "faster than SpikingJelly OTTT (small) | 20.0 vs 30.0 ms | **met**" in targets
    assert "(digits) | 80.0% vs SpikingJelly BPTT 85.0% | **not met**" in targets
    losses = page.split("## Where stoprt loses")[1]
    for words in ("Memory (held for training): stoprt STOP-WTL 14.00 MiB, SpikingJelly OTTT 11.00 MiB",
                  "this view leaves out the membrane potentials OTTT keeps as state", "SpikingJelly BPTT (15.0 ms)",
                  "Accuracy (digits): SpikingJelly BPTT 85.0%", "Latency: SpikingJelly (single-step mode)"):
        assert words in losses
    assert "no method learned `1` (best 55%); some method recognises each other class perfectly" in page
    assert ("| stoprt source | memory: as of commit abc1234; timing: as of commit abc1234, with uncommitted changes to "
            "runtime/stop.py; accuracy, latency: not recorded |") in page
    assert "predicted RSS ~4500 MiB exceeds the cap" in page and "not measured: not available" in page
    assert "](results/peers/memory.png)" in page
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: no plots")
    for name in ("memory", "timing", "accuracy", "latency"):
        assert (out / "peers" / f"{name}.png").stat().st_size > 1000


# ------------------------------------------------------------------------------ peers (skip when absent)

def _hidden_spikes(net, is_neuron, run) -> list[torch.Tensor]:
    got = []
    hooks = [m.register_forward_hook(lambda m, i, o: got.append(o)) for m in net.modules() if is_neuron(m)]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return got


@pytest.fixture(scope="module")
def calibrated_ref():
    from stoprt.runtime.batchnorm import calibrate_batchnorm
    ref = peer_nets.reference("dvs_gesture", 16, 10, 0.5, seed=0)
    xs = (torch.rand(8, 3, 2, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.3).float() * 2
    calibrate_batchnorm(ref, [xs])  # statistics from data: the hidden layers then fire
    return ref.eval(), xs


def _stoprt_spikes(ref, xs, reset: str) -> list[torch.Tensor]:
    for n in L.neurons(ref):
        n.reset = reset
    L.reset_state(ref)
    try:
        return _hidden_spikes(ref, lambda m: isinstance(m, L.LIF), lambda: [ref(x) for x in xs])
    finally:
        for n in L.neurons(ref):
            n.reset = "soft"
        L.reset_state(ref)


def test_snntorch_network_spikes_like_stoprt(calibrated_ref):
    snn = pytest.importorskip("snntorch", reason="snntorch is not installed (pip install snntorch --no-deps)")
    ref, xs = calibrated_ref
    net = peer_nets.set_training(peer_nets.convert(ref, "snntorch"), False)
    got = _hidden_spikes(net, lambda m: isinstance(m, snn.Leaky), lambda: [net(x) for x in xs])
    want = _stoprt_spikes(ref, xs, "soft_nodecay")  # snnTorch's subtract reset
    assert len(got) == len(want) and sum(int(s.sum()) for s in want) > 100
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("lib", ["sj_multi", "sj_single", "sj_ottt"])
def test_spikingjelly_networks_spike_like_stoprt(calibrated_ref, lib):
    pytest.importorskip("spikingjelly", reason="spikingjelly is not installed (pip install spikingjelly --no-deps)")
    try:
        from spikingjelly.activation_based import neuron
        if lib == "sj_ottt":
            from spikingjelly.activation_based.learning import online_learning  # noqa: F401
    except ImportError as err:
        pytest.skip(f"spikingjelly's {lib} parts do not import here ({err}); run.py's bench env provides them")
    ref, xs = calibrated_ref
    net = peer_nets.set_training(peer_nets.convert(ref, lib), False)
    is_neuron = lambda m: isinstance(m, neuron.LIFNode)  # noqa: E731 (OTTTLIFNode is one too)
    if lib == "sj_multi":
        per_layer = _hidden_spikes(net, is_neuron, lambda: net(xs))            # each [T, B, ...]
        got = [layer[t] for t in range(len(xs)) for layer in per_layer]      # step-major, as stoprt's
    else:
        got = _hidden_spikes(net, is_neuron, lambda: [net(x) for x in xs])
    peer_nets.reset(net, lib)
    want = _stoprt_spikes(ref, xs, "soft")
    assert len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_peer_methods_train_when_installed():
    ref = peer_nets.reference("dvs_gesture", 8, 4, 0.25, seed=0)
    xs = (torch.rand(3, 2, 2, 8, 8) < 0.3).float()
    ran = []
    for name in peer_methods.LIBRARY:
        if peer_methods.available(name):
            continue
        method = peer_methods.make(name, ref)
        before = [p.detach().clone() for p in method.net.parameters() if p.requires_grad]
        assert method.train_sample(xs, torch.tensor([0, 3])).shape == (2,)
        after = [p for p in method.net.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), name
        assert method.predict(xs).shape == (2,)
        ran.append(name)
    if not ran:
        pytest.skip("neither snntorch nor spikingjelly is importable here")
