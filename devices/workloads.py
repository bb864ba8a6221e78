"""What a profile runs: a network by name or from a file, and inference step runners.

Step runners have ``step(x)`` and ``reset()``: :class:`~stoprt.export.runners.TorchStepRunner` (the stoprt layers themselves);
ONNX Runtime and TensorRT through :mod:`stoprt.export` when those parts are present (imported lazily, so
a missing one skips its backend with a reason instead of failing the profile).
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..export.loading import LoadedNetwork, load_network
from ..export.runners import TorchStepRunner


def load_workload(model: str, size: int | None = None, width: float | None = None, channels: int = 2,
                 classes: int | None = None) -> tuple[nn.Module, dict]:
    """A network to profile or plan (any model :func:`stoprt.export.loading.load_network` takes);
    returns it, in training mode, and what it is.

    A built-in name is built with ``size`` (default 32), ``width`` (default 1) and ``channels`` /
    ``classes``. A file's recorded builder arguments win: ``size``/``width`` must not contradict them.
    """
    kwargs = {"in_channels": channels, "size": size or 32, "width": 1.0 if width is None else width}
    if classes is not None:
        kwargs["classes"] = classes
    loaded = load_network(model, kwargs)
    if loaded.path is not None:
        _check_given(loaded, size, width)
    return loaded.net.train(), {"name": loaded.name, "kwargs": loaded.model.get("kwargs", {}),
                                "checkpoint": None if loaded.path is None else str(loaded.path)}


def _check_given(loaded: LoadedNetwork, size: int | None, width: float | None) -> None:
    """``--size``/``--width`` given for a file must be its own (a model file records its input shape)."""
    recorded = loaded.model.get("kwargs")
    if recorded is None:  # described by its architecture: the input shape is all there is to compare
        shape = getattr(loaded.net, "input_shape", None)
        recorded = {"size": shape[-1]} if shape else {}
        if width is not None:
            raise ValueError(f"--width applies to a built-in model, and {loaded.path} records its layers")
    for name, given, key in (("--size", size, "size"), ("--width", width, "width")):
        if given is not None and key in recorded and recorded[key] != given:
            raise ValueError(f"{name} {given} contradicts the checkpoint's {key} {recorded[key]}")


class RunnerUnavailable(RuntimeError):
    """An inference backend that cannot run here; the message says why."""


def inference_runner(cfg: dict, net: nn.Module):
    """A step runner (``step(x)``, ``reset()``) for ``cfg["backend"]``; raises RunnerUnavailable.

    ONNX Runtime and TensorRT run the ONNX step graph of :mod:`stoprt.export.onnx_step`, written to a
    temporary folder before the baseline is taken.
    """
    backend = cfg.get("backend", "torch")
    if backend == "torch":
        return TorchStepRunner(net)
    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r}; choose torch, onnxruntime or tensorrt")
    from ..export.onnx_step import export_step
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise RunnerUnavailable("tensorrt is not importable here")
    device = cfg.get("device", "cpu")
    folder = tempfile.mkdtemp(prefix="stoprt-profile-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a runner may read the file lazily
    path = Path(folder) / "step.onnx"
    export_step(net.cpu(), path)
    net.to(device)
    if backend == "tensorrt":
        from ..export.tensorrt import TrtStepRunner, build_engine
        return TrtStepRunner(build_engine(path, Path(folder) / "step.engine"))
    from ..export.ort_runner import OrtStepRunner
    provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
    return OrtStepRunner(path, providers=[provider], threads=cfg.get("threads"))
