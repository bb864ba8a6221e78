"""Integrity: corrupted or NaN checkpoints and model files are refused with one line (exit code 2),
a bundle manifest cannot be altered unnoticed, and `stream --model` reads session checkpoints."""

import json
import logging

import pytest
import torch

from stoprt.cli import main
from stoprt.export.bundle import BundleError, load_bundle, write_bundle
from stoprt.export.loading import load_network
from stoprt.export.model_file import ModelFileError, load_model, save_model
from stoprt.runtime import models
from stoprt.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

QUICK = ["--n-train", "16", "--n-test", "8", "--batch-size", "8", "--T", "4", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real `stoprt train` checkpoint."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--model", "mlp", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    return out / "checkpoint.pt"


def _flip_inside(path, tensor, out):
    """Flip 16 bytes in the middle of ``tensor``'s bytes where they lie in the file (stored raw)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) < 0, "the tensor's bytes are not found once in the file"
    mid = at + len(raw) // 2
    data[mid:mid + 16] = bytes(b ^ 0xA5 for b in data[mid:mid + 16])
    out.write_bytes(bytes(data))
    return out


def _refused(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], err[0]


def _cli_uses(model, tmp_path):
    return [["stream", "--source", "builtin:digits:2", "--model", str(model), "--quiet", "--threads", "1"],
            ["train", "--model", "mlp", "--epochs", "2", "--resume", str(model), *QUICK],
            ["export", str(model), "--to", "bundle", str(tmp_path / "bundle"), "--no-onnx"]]


def test_flipped_bytes_in_a_training_checkpoint_are_refused_everywhere(trained, tmp_path, capsys):
    weight = load_checkpoint(trained)["model_state"]["1.weight"]
    flip = _flip_inside(trained, weight, tmp_path / "flip.pt")
    with pytest.raises(CheckpointError, match=r"corrupted: tensor 'model_state/1.weight'"):
        load_checkpoint(flip)
    for argv in _cli_uses(flip, tmp_path):
        _refused(capsys, argv, "flip.pt", "model_state/1.weight", "corrupted")
    assert not (tmp_path / "bundle").exists()


def test_nan_weights_are_refused_in_checkpoints_and_model_files(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained)
    ckpt["model_state"]["3.weight"][0, 0] = float("nan")
    nan_ckpt = save_checkpoint(tmp_path / "nanw.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    for argv in _cli_uses(nan_ckpt, tmp_path):
        _refused(capsys, argv, "nanw.pt", "'3.weight'", "NaN/Inf")
    net = models.build_model("mlp", in_channels=2, size=8, classes=3)
    with torch.no_grad():
        net[3].weight[1, 2] = float("inf")
    path = save_model(tmp_path / "inf.stoprt", net, use_safetensors=False)
    with pytest.raises(ModelFileError, match=r"'3.weight' holds 1 NaN/Inf"):
        load_model(path)
    _refused(capsys, ["export", str(path), "--to", "bundle", str(tmp_path / "b2"), "--no-onnx"], "NaN/Inf")


def test_model_file_digest_names_the_tensor_and_covers_metadata(tmp_path):
    net = models.build_model("mlp", in_channels=2, size=8, classes=3)
    path = save_model(tmp_path / "m.stoprt", net, {"dt_us": 1000}, use_safetensors=False)
    flip = _flip_inside(path, net.state_dict()["1.weight"], tmp_path / "flip.stoprt")
    with pytest.raises(ModelFileError, match=r"corrupted: tensor 'tensors/1.weight'"):
        load_model(flip)
    data = torch.load(path, weights_only=True)
    data["metadata"]["input_spec"] = data["metadata"]["input_spec"].replace("1000", "2000")
    torch.save(data, tmp_path / "meta.stoprt")
    with pytest.raises(ModelFileError, match="corrupted: its plain"):
        load_model(tmp_path / "meta.stoprt")


def test_files_of_the_previous_version_load_with_a_warning(trained, tmp_path, caplog):
    old = torch.load(trained, weights_only=True)
    del old["integrity"]
    torch.save(old, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING):
        net = load_network(tmp_path / "old.pt").net
    assert "no integrity checksums" in caplog.text and "Save it again" in caplog.text
    assert torch.equal(net.state_dict()["1.weight"], old["model_state"]["1.weight"])


def test_an_altered_manifest_field_is_detected(tmp_path):
    net = models.build_model("mlp", in_channels=2, size=8, classes=3)
    out = write_bundle(tmp_path / "b", net, {"dt_us": 1000}, onnx=False)
    assert load_bundle(out).input_spec["dt_us"] == 1000
    manifest = json.loads((out / "manifest.json").read_text())
    for field, value in (("input_spec", {**manifest["input_spec"], "dt_us": 5000}), ("params_as_inputs", True)):
        (out / "manifest.json").write_text(json.dumps({**manifest, field: value}, indent=2))
        with pytest.raises(BundleError, match="does not match its manifest_sha256"):
            load_bundle(out)
    # Even with a recomputed checksum (or an old bundle without one) the spec must be the model's.
    altered = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    altered["input_spec"] = {**manifest["input_spec"], "dt_us": 5000}
    (out / "manifest.json").write_text(json.dumps(altered, indent=2))
    with pytest.raises(BundleError, match="input spec in manifest.json differs from the model file's"):
        load_bundle(out)


def test_stream_takes_a_session_checkpoint_as_model(tmp_path, capsys):
    first, second = tmp_path / "s1", tmp_path / "s2"
    base = ["stream", "--source", "builtin:digits:3", "--quiet", "--threads", "1", "--size", "8"]
    assert main([*base, "--learn", "--checkpoint", str(first)]) == 0
    net = load_network(first / "session.pt").net
    assert torch.equal(net.state_dict()["1.weight"], load_checkpoint(first / "session.pt")["model_state"]["1.weight"])
    # A session whose model came from a file records its architecture, so its session.pt loads too.
    model_file = save_model(tmp_path / "m.stoprt", net, use_safetensors=False)
    assert main([*base, "--model", str(model_file), "--learn", "--checkpoint", str(second)]) == 0
    assert main([*base, "--model", str(second / "session.pt"), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["steps"] > 0
