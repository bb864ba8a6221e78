"""make_runner: one factory of step runners, from a network, a bundle (or its path) or a step graph."""

from __future__ import annotations

import pytest
import torch

from stoprt.export.bundle import load_bundle, write_bundle
from stoprt.export.runners import TorchStepRunner, make_runner
from stoprt.runtime import models
from stoprt.runtime.stream.runner import StepRunner


def _outputs(runner, xs):
    runner.reset()
    return [torch.as_tensor(runner.step(x)).cpu() for x in xs]


def test_every_source_gives_the_same_steps(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = models.build_model("mlp", in_channels=2, size=8, classes=3)
    xs = [(torch.rand(2, 2, 8, 8) < 0.3).float() for _ in range(4)]
    reference = _outputs(make_runner("torch", net), xs)
    assert isinstance(make_runner("torch", net), (TorchStepRunner, StepRunner))
    bundle = write_bundle(tmp_path / "b", net, {"T": 4})
    for runner in (make_runner("onnxruntime", net, "cpu", workdir=tmp_path / "w"),
                   make_runner("onnxruntime", bundle), make_runner("onnxruntime", load_bundle(bundle)),
                   make_runner("onnxruntime", bundle / "step.onnx", threads=1)):
        assert isinstance(runner, StepRunner)
        for a, b in zip(reference, _outputs(runner, xs)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "w" / "step.onnx").is_file()


def test_bad_backend_and_a_bundle_without_a_graph(tmp_path):
    net = models.build_model("mlp", in_channels=2, size=8, classes=3)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        make_runner("cudnn", net)
    bundle = write_bundle(tmp_path / "b", net, onnx=False)
    with pytest.raises(ValueError, match="has no ONNX step graph"):
        make_runner("onnxruntime", bundle)
