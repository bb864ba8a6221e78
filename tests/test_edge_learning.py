"""Learning bundles and ONNX Runtime learning in `stoprt stream`, without torch (issue 13, items 1, 3, 4).

One learning bundle is exported through the CLI (`stoprt export MODEL --to onnx-learn`) for the whole
module; the streams run in subprocesses in which `import torch` fails (a meta-path blocker), on an
EVT 2.0 recording with a labels CSV, so they show the edge install's path end to end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stoprt.cli import main
from stoprt.export.model_file import save_model
from stoprt.runtime import layers as L
from stoprt.runtime.checkpoint import load_array_checkpoint
from stoprt.runtime.events import events_from_arrays
from stoprt.runtime.formats import write_events
from stoprt.runtime.models import build_model

pytest.importorskip("onnxruntime")

SENSOR, CLASSES, SAMPLE_US = 16, 4, 60_000
# Runs stoprt's CLI with torch unimportable; prints whether torch got loaded anyway.
BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
from stoprt.cli import main
code = main(sys.argv[1:])
print("TORCH_LOADED", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


def _stoprt_blocked(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A learning bundle of a small MLP, a labelled recording (class c: events in quadrant c) and its labels."""
    root = tmp_path_factory.mktemp("edge")
    torch.manual_seed(0)
    net = build_model("mlp", size=8, classes=CLASSES, hidden=(32,))
    save_model(root / "model.stoprt", net, {"dt_us": 10_000})
    code = main(["export", str(root / "model.stoprt"), "--to", "onnx-learn", str(root / "bundle"),
                 "--lr", "0.5", "--momentum", "0.5", "--weight-decay", "0.001", "--no-onnx"])
    assert code == 0
    rng = np.random.default_rng(0)
    labels, events = [], []
    for i in range(24):
        c, t0 = i % CLASSES, i * SAMPLE_US
        n = 600
        x = rng.integers(0, SENSOR // 2, n) + (c % 2) * SENSOR // 2
        y = rng.integers(0, SENSOR // 2, n) + (c // 2) * SENSOR // 2
        events.append(events_from_arrays(np.sort(rng.integers(t0, t0 + SAMPLE_US, n)), x, y, rng.integers(0, 2, n)))
        labels.append(f"{c + 1},{t0},{t0 + SAMPLE_US}")
    write_events(root / "rec.raw", np.concatenate(events), format="evt2", width=SENSOR, height=SENSOR)
    (root / "labels.csv").write_text("class,start_us,end_us\n" + "\n".join(labels) + "\n")
    return {"root": root, "bundle": root / "bundle", "rec": root / "rec.raw", "labels": root / "labels.csv"}


def _stream(data: dict, *extra: str, bundle: Path | None = None) -> subprocess.CompletedProcess:
    return _stoprt_blocked("stream", "--source", data["rec"], "--labels", data["labels"], "--model",
                           bundle or data["bundle"], "--backend", "onnxruntime", "--learn", "--dt-us", "10000",
                           "--quiet", *extra)


def test_export_writes_a_checked_learning_bundle(data):
    manifest = json.loads((data["bundle"] / "manifest.json").read_text())
    learning = manifest["learning"]
    assert learning["optimizer"] == {"name": "sgd", "lr": 0.5, "momentum": 0.5, "weight_decay": 0.001}
    assert (learning["loss"], learning["update"]) == ("ce", "sample")
    for name in ("learn_step.onnx", "update.onnx", "params.npz", "model.stoprt"):
        digest = hashlib.sha256((data["bundle"] / name).read_bytes()).hexdigest()
        assert manifest["files"][name]["sha256"] == digest
    with np.load(data["bundle"] / "params.npz") as params:
        assert sorted(params.files) == sorted(k for k, _ in build_model("mlp", size=8, classes=CLASSES,
                                                                         hidden=(32,)).named_parameters())


def test_learning_options_are_refused_for_other_targets(data, capsys):
    assert main(["export", str(data["root"] / "model.stoprt"), "--to", "onnx", str(data["root"] / "x.onnx"),
                 "--momentum", "0.9"]) == 2
    assert "--momentum does not apply to --to onnx" in capsys.readouterr().err
    assert not (data["root"] / "x.onnx").exists()


def test_torch_free_stream_learns_and_checkpoints(data, tmp_path):
    run = _stream(data, "--checkpoint", tmp_path, "--json", tmp_path / "s.json")
    assert run.returncode == 0, run.stderr
    assert "TORCH_LOADED False" in run.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["updates"] == summary["labelled_samples"] == 24
    saved = load_array_checkpoint(tmp_path / "session.npz")
    assert saved["learner_stats"]["updates"] == 24 and saved["session"]["t_us"] > 0
    params = saved["learner_state"]["params"]
    with np.load(data["bundle"] / "params.npz") as start:
        moved = [k for k in start.files if not np.array_equal(params["param." + k], start[k])]
        assert all(np.isfinite(params["param." + k]).all() for k in start.files)
    assert "1.weight" in moved and "3.weight" in moved, moved
    assert any(np.abs(v).max() > 0 for v in saved["learner_state"]["optimizer"].values())  # momentum


def test_torch_free_resume_equals_an_uninterrupted_run(data, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _stream(data, "--checkpoint", whole).returncode == 0
    first = _stream(data, "--checkpoint", parts, "--max-steps", "65")
    assert first.returncode == 0, first.stderr
    stopped = load_array_checkpoint(parts / "session.npz")["session"]["t_us"]
    assert 0 < stopped < 24 * SAMPLE_US
    second = _stream(data, "--checkpoint", parts, "--resume")
    assert second.returncode == 0 and "resumed at step" in second.stderr, second.stderr
    a, b = load_array_checkpoint(whole / "session.npz"), load_array_checkpoint(parts / "session.npz")
    assert a["session"] == b["session"] and a["learner_stats"] == b["learner_stats"]
    for what in ("params", "optimizer"):
        for name, value in a["learner_state"][what].items():
            np.testing.assert_array_equal(b["learner_state"][what][name], value, err_msg=name)


def _one_error_line(run: subprocess.CompletedProcess, *words: str) -> str:
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if not line.startswith("TORCH_LOADED")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _rewrite_manifest(bundle: Path, change=None) -> None:
    """Re-sign a bundle after an edit (as someone who edits it on purpose would): file and manifest checksums."""
    from stoprt.export.bundle import _manifest_sha256, _sha256
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry.update(sha256=_sha256(bundle / name), size=(bundle / name).stat().st_size)
    if change:
        change(manifest)
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_learning_graph_is_refused(data, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(data["bundle"], bundle)
    graph = bytearray((bundle / "learn_step.onnx").read_bytes())
    graph[len(graph) // 2] ^= 0xFF
    (bundle / "learn_step.onnx").write_bytes(bytes(graph))
    _one_error_line(_stream(data, "--checkpoint", tmp_path / "ck", bundle=bundle), "learn_step.onnx", "checksum")
    assert not (tmp_path / "ck" / "session.npz").exists()


def test_graph_inputs_that_do_not_match_the_spec_are_refused(data, tmp_path):
    import onnx
    altered = tmp_path / "altered"
    shutil.copytree(data["bundle"], altered)
    proto = onnx.load(str(altered / "learn_step.onnx"))
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3  # x: [B, 3, 8, 8], metadata [2, 8, 8]
    onnx.save(proto, str(altered / "learn_step.onnx"))
    _rewrite_manifest(altered)
    _one_error_line(_stream(data, bundle=altered), "input x has shape", "altered")
    other = tmp_path / "other"
    shutil.copytree(data["bundle"], other)
    _rewrite_manifest(other, lambda m: m["input_spec"].update(shape=[2, 9, 9]))
    _one_error_line(_stream(data, bundle=other), "takes input [2, 8, 8]", "[2, 9, 9]")


def test_unsupported_layer_is_named(tmp_path, capsys):
    net = L.Sequential(L.Conv2d(2, 4, 3, padding=1), torch.nn.MaxPool2d(2), L.LIF(), L.Flatten(),
                       L.Linear(4 * 4 * 4, 3), L.LIF(), input_shape=(2, 8, 8))
    save_model(tmp_path / "m.stoprt", net)
    assert main(["export", str(tmp_path / "m.stoprt"), "--to", "onnx-learn", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "MaxPool2d" in err, err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["m.stoprt"]


def test_missing_execution_provider_falls_back_or_fails_strict(data, tmp_path):
    import onnxruntime
    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the TensorRT execution provider: nothing to fall back from")
    run = _stream(data, "--provider", "tensorrt", "--max-steps", "20")
    assert run.returncode == 0 and "no TensorrtExecutionProvider" in run.stderr and "CPU" in run.stderr, run.stderr
    strict = _stream(data, "--provider", "tensorrt", "--strict", "--checkpoint", tmp_path / "ck")
    _one_error_line(strict, "no TensorrtExecutionProvider", "--strict")
    assert not (tmp_path / "ck" / "session.npz").exists()


def test_tampered_session_checkpoint_is_refused(data, tmp_path):
    assert _stream(data, "--checkpoint", tmp_path, "--max-steps", "30").returncode == 0
    path = tmp_path / "session.npz"
    blob = bytearray(path.read_bytes())
    start = blob.index(b"param.1.weight")  # inside the array's npz member: flip a byte of its data
    blob[start + 400] ^= 0x01
    path.write_bytes(bytes(blob))
    _one_error_line(_stream(data, "--checkpoint", tmp_path, "--resume"), "session.npz")


def test_adam_learning_bundle_carries_adam_and_learns(tmp_path: Path) -> None:
    """`--optimizer adam` reaches the update graph: Adam's state in the learner, and an update moves it."""
    from stoprt.export.ort_learner import OrtLearner
    torch.manual_seed(0)
    net = build_model("mlp", size=8, classes=CLASSES, hidden=(16,))
    save_model(tmp_path / "model.stoprt", net, {"dt_us": 10_000})
    assert main(["export", str(tmp_path / "model.stoprt"), "--to", "onnx-learn", str(tmp_path / "bundle"),
                 "--optimizer", "adam", "--lr", "0.01", "--no-onnx"]) == 0
    learner = OrtLearner.from_bundle(tmp_path / "bundle")
    assert learner.usig.optimizer == "adam" and "adam.step" in learner.optimizer_state
    before = {n: a.copy() for n, a in learner.params.items()}
    rng = np.random.default_rng(0)
    for _ in range(3):
        learner.step(rng.random((1, 2, 8, 8), dtype=np.float32), np.array([1]))
    learner.end_sample()
    assert learner.updates == 1 and float(learner.optimizer_state["adam.step"]) == 1.0
    assert any(not np.array_equal(before[n], a) for n, a in learner.params.items())


def test_torch_backend_on_the_edge_install_says_what_to_install(data):
    run = _stoprt_blocked("stream", "--source", data["rec"], "--dt-us", "10000", "--quiet")
    _one_error_line(run, "pip install 'stoprt[torch]'", "--backend onnxruntime")
