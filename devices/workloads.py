"""What a profile runs: a network by name or from a checkpoint, and inference step runners.

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

from ..export.runners import TorchStepRunner
from ..runtime.models import MODELS, build_model


def load_network(model: str, size: int | None = None, width: float | None = None, channels: int = 2,
                 classes: int | None = None) -> tuple[nn.Module, dict]:
    """A network from a model name or a ``stoprt train`` checkpoint; returns it and what it is.

    For a checkpoint, its recorded builder arguments win: ``size``/``width`` must not contradict them.
    """
    if model in MODELS:
        kwargs = {"in_channels": channels, "size": size or 32, "width": 1.0 if width is None else width}
        if classes is not None:
            kwargs["classes"] = classes
        return build_model(model, **kwargs), {"name": model, "kwargs": kwargs, "checkpoint": None}
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"unknown model {model!r}: neither a model name ({', '.join(MODELS)}) nor a "
                         "checkpoint file")
    from ..runtime.checkpoint import load_checkpoint
    data = load_checkpoint(path)
    spec = data.get("model")
    if not isinstance(spec, dict) or spec.get("name") not in MODELS:
        raise ValueError(f"{path} has no model entry this stoprt can build (need model name and kwargs)")
    kwargs = dict(spec.get("kwargs", {}))
    for name, given, key in (("--size", size, "size"), ("--width", width, "width")):
        if given is not None and key in kwargs and kwargs[key] != given:
            raise ValueError(f"{name} {given} contradicts the checkpoint's {key} {kwargs[key]}")
    net = build_model(spec["name"], **kwargs)
    try:
        net.load_state_dict(data["model_state"])
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{path}: its weights do not fit its own model entry: {str(err).splitlines()[0]}") from None
    return net, {"name": spec["name"], "kwargs": kwargs, "checkpoint": str(path)}


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
