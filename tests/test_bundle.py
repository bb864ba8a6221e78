"""Architecture descriptions, the stoprt model file, deployment bundles and `stoprt export`."""

import json
import shutil
import tarfile

import pytest
import torch
from torch import nn

from stoprt.cli import main
from stoprt.export.architecture import ArchitectureError, build, describe
from stoprt.export.bundle import BundleError, load_bundle, write_bundle
from stoprt.export.loading import load_network
from stoprt.export.model_file import ModelFileError, load_model, save_model
from stoprt.export.ort_runner import OrtStepRunner
from stoprt.runtime import layers as L, models
from stoprt.runtime.checkpoint import save_checkpoint


def shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def custom_net() -> L.Sequential:
    """Every layer type and LIF option, nested blocks, and a leak shared across them."""
    lead = L.LIF(threshold="neuron", shape=(4, 8, 8), surrogate="atan", alpha=2.0, reset="soft_nodecay",
                 leak=0.7, leak_range=(0.1, 0.95), threshold_floor=0.1, init_threshold=0.8)
    block = L.Sequential(L.BatchNorm2d(4, eps=1e-3, momentum=0.2),
                         L.LIF(threshold="channel", share_leak_with=lead, learn_threshold=False),
                         L.Conv2d(4, 4, 3, padding=1, stride=1, dilation=1, groups=2, bias=False))
    return L.Sequential(
        L.Conv2d(2, 4, (3, 3), padding=(1, 1)), lead,
        L.Residual(block, L.Conv2d(4, 4, 1)),
        L.LIF(reset="hard", surrogate="triangle", learn_leak=False), L.MaxPool2d(2), L.Dropout(0.3),
        L.AvgPool2d(1), L.Flatten(), L.Linear(64, 10, bias=False), L.Identity(),
        L.LeakyReadout(leak=0.8), input_shape=(2, 8, 8))


@pytest.mark.parametrize("readout", [False, True])
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_architecture_round_trip_builtin_models(name, readout):
    net = models.build_model(name, in_channels=2, size=16, classes=10, width=0.25, readout=readout)
    desc = json.loads(json.dumps(describe(net)))  # JSON-able
    twin = build(desc)
    assert shapes(twin) == shapes(net) and list(twin.state_dict()) == list(net.state_dict())
    assert describe(twin) == desc
    twin.load_state_dict(net.state_dict())


def test_architecture_round_trip_every_option():
    net = custom_net()
    desc = json.loads(json.dumps(describe(net)))
    twin = build(desc)
    assert shapes(twin) == shapes(net) and describe(twin) == desc
    assert twin[2].main[1].leak is twin[1].leak  # the shared leak is one Parameter again
    assert desc["net"]["layers"][2]["main"]["layers"][1]["share_leak_with"] == "1"
    lif = twin[1]
    assert (lif.granularity, lif.surrogate, lif.alpha, lif.reset, lif.leak_range, lif.threshold_floor) == \
        ("neuron", "atan", 2.0, "soft_nodecay", (0.1, 0.95), 0.1)
    assert tuple(twin[2].main[1].threshold.shape) == (4, 1, 1) and not twin[2].main[1].threshold.requires_grad
    assert twin[3].reset == "hard" and not twin[3].leak.requires_grad
    assert twin[2].main[2].groups == 2 and twin[2].main[0].eps == 1e-3 and twin[5].p == 0.3


def test_architecture_errors_name_the_layer():
    with pytest.raises(ArchitectureError, match=r"layer 2 \(torch.nn.modules.activation.ReLU\)"):
        describe(L.Sequential(L.Linear(4, 4), L.LIF(), nn.ReLU()))
    with pytest.raises(ArchitectureError, match=r"layer 1.main \(torch.nn.modules.linear.Linear\)"):
        describe(L.Sequential(L.Linear(4, 4), L.Residual(nn.Linear(4, 4))))
    desc = describe(L.Sequential(L.Linear(4, 4), L.LIF()))
    desc["net"]["layers"][1]["type"] = "Spiky"
    with pytest.raises(ArchitectureError, match="layer 1 has unknown type 'Spiky'"):
        build(desc)
    desc["net"]["layers"][1] = {"type": "LIF", "share_leak_with": "7"}
    with pytest.raises(ArchitectureError, match="layer 1 shares the leak of '7'"):
        build(desc)
    desc["net"]["layers"][1] = {"type": "LIF", "threshold": "per-synapse"}
    with pytest.raises(ArchitectureError, match=r"layer 1 \(LIF\) cannot be built.*granularity"):
        build(desc)
    with pytest.raises(ArchitectureError, match="version 9"):
        build({**desc, "version": 9})


@pytest.mark.parametrize("use_safetensors", [True, False], ids=["safetensors", "torch"])
def test_model_file_round_trip(tmp_path, use_safetensors):
    if use_safetensors:
        pytest.importorskip("safetensors", reason="safetensors is not installed")
    torch.manual_seed(0)
    net = custom_net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.rand_like(p) * 0.01)
    path = save_model(tmp_path / "m.stoprt", net, {"T": 12, "sensor_size": [128, 128], "dt_us": 5000,
                                                   "binning": "time", "out_size": 8})
    assert [p.name for p in tmp_path.iterdir()] == ["m.stoprt"]  # atomic: no temporary file left
    twin, spec = load_model(path)
    assert spec == {"T": 12, "sensor_size": [128, 128], "dt_us": 5000, "binning": "time", "out_size": 8,
                    "shape": [2, 8, 8], "channels": 2}
    for (k, a), (k2, b) in zip(net.state_dict().items(), twin.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert twin[2].main[1].leak is twin[1].leak and not twin.training
    net.eval()
    with torch.no_grad():
        for _ in range(3):  # a few steps: the state evolves alike
            x = torch.rand(2, 2, 8, 8)
            assert torch.equal(net(x), twin(x))


def test_garbage_model_file_is_named_as_garbage(tmp_path):
    """Not reported as a safetensors file waiting for a package (needs no safetensors to run)."""
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelFileError, match="neither a torch zip archive nor a safetensors file"):
        load_model(tmp_path / "garbage.pt")


def test_model_file_errors(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed (the torch.save layout is used)")
    net = models.build_model("mlp", in_channels=2, size=8, classes=4)
    path = save_model(tmp_path / "m.stoprt", net)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the weights
    (tmp_path / "flipped.stoprt").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupted: tensor .* does not match the checksum"):
        load_model(tmp_path / "flipped.stoprt")
    (tmp_path / "torn.stoprt").write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelFileError, match="not a readable stoprt model file"):
        load_model(tmp_path / "torn.stoprt")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    meta_path = tmp_path / "v2.stoprt"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(meta_path), metadata={**meta, "format_version": "2", "stoprt_version": "9.0"})
    with pytest.raises(ModelFileError, match="format version 2 \\(written by stoprt 9.0\\)"):
        load_model(meta_path)
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a stoprt model file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.stoprt")
    with pytest.raises(ModelFileError, match="unknown input spec key"):
        save_model(tmp_path / "x.stoprt", net, {"frames_per_second": 30})
    with pytest.raises(ModelFileError, match="not both"):
        save_model(tmp_path / "x.stoprt", net, {"dt_us": 1000, "event_count": 500})
    with pytest.raises(ModelFileError, match="does not match the network's input shape"):
        save_model(tmp_path / "x.stoprt", net, {"shape": [2, 16, 16]})


def _train_checkpoint(path, net, name="mlp", kwargs=None, state=None):
    save_checkpoint(path, {"model": {"name": name, "kwargs": kwargs or {"in_channels": 2, "size": 8, "classes": 4}},
                           "input_spec": {"source": "digits", "T": 10, "shape": [2, 8, 8]},
                           "model_state": state if state is not None else net.state_dict(),
                           "optimizer_state": {}, "epoch": 1, "stats": {}, "config": {}})


def test_load_network_checkpoint_model_file_and_bundle(tmp_path):
    net = models.build_model("mlp", in_channels=2, size=8, classes=4)
    _train_checkpoint(tmp_path / "c.pt", net)
    loaded = load_network(tmp_path / "c.pt")
    from_ckpt, spec = loaded.net, loaded.input_spec
    assert loaded.model["name"] == "mlp" and loaded.path == tmp_path / "c.pt"
    assert spec == {"source": "digits", "T": 10, "shape": [2, 8, 8], "channels": 2}
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), from_ckpt.state_dict().values()))
    save_model(tmp_path / "m.stoprt", net, spec)
    assert load_network(tmp_path / "m.stoprt").input_spec == spec
    save_model(tmp_path / "m.pt", net, spec, use_safetensors=False)
    assert load_network(tmp_path / "m.pt").input_spec == spec
    write_bundle(tmp_path / "b", net, spec, onnx=False)
    assert load_network(tmp_path / "b").input_spec == spec
    # A checkpoint of another architecture: the first mismatching key and both shapes.
    other = models.build_model("mlp", in_channels=2, size=8, classes=4, hidden=(32,))
    _train_checkpoint(tmp_path / "wrong.pt", net, state=other.state_dict())
    with pytest.raises(ModelFileError, match=r"'1.weight' has shape \(32, 128\) in the file, \(256, 128\) in the model"):
        load_network(tmp_path / "wrong.pt")
    state = net.state_dict()
    del state["2.threshold"]
    _train_checkpoint(tmp_path / "short.pt", net, state=state)
    with pytest.raises(ModelFileError, match="it has no '2.threshold'"):
        load_network(tmp_path / "short.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFileError, match="not readable"):
        load_network(tmp_path / "junk.pt")


def test_bundle_write_verify_and_replace(tmp_path):
    net = models.build_model("mlp", in_channels=2, size=8, classes=4)
    out = write_bundle(tmp_path / "b", net, {"T": 10})
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.stoprt", "step.onnx", "input_spec.json"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"].values())
    assert {"stoprt", "torch", "onnx", "opset"} <= set(manifest["versions"])
    bundle = load_bundle(out)
    assert bundle.input_spec["T"] == 10 and bundle.onnx_path == out / "step.onnx"
    runner = OrtStepRunner(bundle.onnx_path)
    assert runner.signature.input_spec["T"] == 10
    x = torch.rand(1, 2, 8, 8)
    assert runner.step(x).shape == (1, 4)
    # Replacing a bundle works; a directory that is not a bundle is never overwritten.
    write_bundle(out, net, {"T": 20}, params_as_inputs=True)
    assert load_bundle(out).input_spec["T"] == 20 and load_bundle(out).manifest["params_as_inputs"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a bundle"):
        write_bundle(tmp_path / "mine", net)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "mine"]  # no staging directories left


def test_bundle_errors_name_the_file(tmp_path):
    net = models.build_model("mlp", in_channels=2, size=8, classes=4)
    out = write_bundle(tmp_path / "b", net)
    with open(out / "step.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match="step.onnx does not match its checksum"):
        load_bundle(out)
    write_bundle(out, net)
    (out / "model.stoprt").unlink()
    with pytest.raises(BundleError, match="model.stoprt is missing"):
        load_bundle(out)
    write_bundle(out, net)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(BundleError, match="bundle of version 2"):
        load_bundle(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        load_bundle(out)
    shutil.rmtree(out)
    out.mkdir()
    with pytest.raises(BundleError, match="not a stoprt bundle"):
        load_bundle(out)


def test_bundle_archive(tmp_path):
    net = models.build_model("mlp", in_channels=2, size=8, classes=4)
    archive = write_bundle(tmp_path / "b.tar", net, {"T": 7}, archive=True)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["input_spec.json", "manifest.json", "model.stoprt", "step.onnx"]
    bundle = load_bundle(archive, extract_to=tmp_path / "unpacked")
    assert bundle.input_spec["T"] == 7 and bundle.onnx_path.parent == tmp_path / "unpacked"
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(tmp_path / "unpacked" / "manifest.json", arcname="../manifest.json")
    with pytest.raises(BundleError, match="unexpected archive member '../manifest.json'"):
        load_bundle(evil, extract_to=tmp_path / "x")
    assert not (tmp_path / "manifest.json").exists()


def test_cli_export(tmp_path, capsys):
    net = models.build_model("mlp", in_channels=2, size=8, classes=4)
    _train_checkpoint(tmp_path / "c.pt", net)
    assert main(["export", str(tmp_path / "c.pt"), "--to", "onnx", str(tmp_path / "m.onnx"), "--opset", "19"]) == 0
    assert "ONNX step graph (opset 19, 4 state tensors)" in capsys.readouterr().out
    assert OrtStepRunner(tmp_path / "m.onnx").signature.input_spec["T"] == 10
    assert main(["export", str(tmp_path / "c.pt"), "--to", "bundle", str(tmp_path / "b.tar"), "--archive",
                 "--params-as-inputs"]) == 0
    assert load_bundle(tmp_path / "b.tar", extract_to=tmp_path / "u").manifest["params_as_inputs"]
    assert main(["export", str(tmp_path / "b.tar"), "--to", "bundle", str(tmp_path / "b2"), "--no-onnx"]) == 0
    assert load_bundle(tmp_path / "b2").onnx_path is None
    capsys.readouterr()
    assert main(["export", str(tmp_path / "c.pt"), "--to", "onnx", str(tmp_path / "x.onnx"), "--fp16"]) == 2
    assert "--fp16 does not apply to --to onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope.pt"), "--to", "onnx", str(tmp_path / "x.onnx")]) == 2
    assert "no model file, checkpoint or bundle at" in capsys.readouterr().err


def test_cli_export_tensorrt_without_tensorrt(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be checked")
    except ImportError:
        pass
    net = models.build_model("mlp", in_channels=2, size=8, classes=4)
    save_model(tmp_path / "m.stoprt", net)
    assert main(["export", str(tmp_path / "m.stoprt"), "--to", "tensorrt", str(tmp_path / "m.engine"),
                 "--batch", "4", "--workspace-mib", "256"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()  # it failed before exporting anything


def test_load_network_builds_a_builtin_name_and_names_an_unknown_one(tmp_path):
    loaded = load_network("mlp", {"in_channels": 2, "size": 8, "classes": 3})
    assert loaded.path is None and loaded.model == {"name": "mlp", "kwargs": {"in_channels": 2, "size": 8, "classes": 3}}
    assert tuple(loaded.net.input_shape) == (2, 8, 8) and loaded.name == "mlp"
    with pytest.raises(ValueError, match="neither a model name"):
        load_network("alexnet")
    with pytest.raises(FileNotFoundError, match="no model file, checkpoint or bundle at mlp"):
        load_network("mlp", builtin=False)  # stoprt export: files only
