"""The step runners of every inference backend, and :func:`make_runner`, the one factory of them.

A step runner holds a network's state between calls: ``step(x_t) -> output`` runs one time step
``x_t`` ``[B, *input_shape]`` and returns the output ``[B, *output_shape]`` (spikes or readout
potential); ``reset()`` forgets the sample. A streaming session written against this interface runs
unchanged on torch (:class:`TorchStepRunner`), ONNX Runtime
(:class:`~stoprt.export.ort_runner.OrtStepRunner`) or TensorRT
(:class:`~stoprt.export.tensorrt.TrtStepRunner`). ``state()`` returns the current state under the
names the ONNX step graph uses (``state.<layer path>.u`` / ``.s``), which makes backends comparable.
The interface itself, :class:`StepRunner`, is defined by the runtime (:mod:`stoprt.runtime.stream.runner`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..runtime import layers as L
from ..runtime.stream.runner import StepRunner

BACKENDS = ("torch", "onnxruntime", "tensorrt")
__all__ = ["BACKENDS", "StepRunner", "TorchStepRunner", "make_runner"]


def make_runner(backend: str, model: Any, device: str | None = None, *, workdir: str | os.PathLike | None = None,
                name: str = "step", providers: list | None = None, threads: int | None = None,
                engine: Mapping[str, Any] | None = None) -> StepRunner:
    """A step runner for ``backend`` (``torch``, ``onnxruntime`` or ``tensorrt``) over ``model``.

    ``model``: a network (torch runs it in place; the others export its ONNX step graph to
    ``workdir/<name>.onnx`` first), a :class:`~stoprt.export.bundle.Bundle` or the path of one (its
    step graph; TensorRT keeps the engine it builds as ``step.engine`` in ``workdir``, default the
    bundle's folder, and reuses it), or the path of a ``.onnx`` step graph.
    ``device``: torch moves the network there; ONNX Runtime picks its provider by it (None: CUDA when
    available, else CPU; ``providers`` and ``threads`` are ONNX Runtime's). ``engine``: keyword
    arguments of :func:`~stoprt.export.tensorrt.build_engine`. ``workdir`` defaults to a temporary
    folder removed at exit.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose torch, onnxruntime or tensorrt")
    if backend == "torch":
        net = model if isinstance(model, nn.Module) else _bundle(model).net
        return TorchStepRunner(net, device)
    graph, reuse_engine, workdir = _step_graph(model, workdir, name)
    if backend == "onnxruntime":
        from .ort_runner import OrtStepRunner
        if providers is None and device is not None:
            providers = ["CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"]
        return OrtStepRunner(graph, providers=providers, threads=threads)
    from .tensorrt import TrtStepRunner, build_engine
    engine_path = workdir / f"{name}.engine"
    if not (reuse_engine and engine_path.exists()):
        build_engine(graph, engine_path, **dict(engine or {}))
    return TrtStepRunner(engine_path)


def _bundle(model: Any):
    from .bundle import Bundle, load_bundle
    return model if isinstance(model, Bundle) else load_bundle(model)


def _step_graph(model: Any, workdir: str | os.PathLike | None, name: str) -> tuple[Path, bool, Path]:
    """``(graph, reuse an existing engine, workdir)`` for a network, a bundle or a ``.onnx`` path."""
    if isinstance(model, nn.Module):
        workdir = Path(workdir) if workdir is not None else _temporary_folder()
        graph = workdir / f"{name}.onnx"
        from .onnx_step import export_step
        first = next(model.parameters(), None)
        where = first.device if first is not None else torch.device("cpu")
        export_step(model.cpu(), graph)  # exported on the CPU, then back where the network lives
        model.to(where)
        return graph, False, workdir
    if not hasattr(model, "onnx_path") and Path(model).suffix == ".onnx" and Path(model).is_file():
        workdir = Path(workdir) if workdir is not None else _temporary_folder()
        return Path(model), False, workdir
    bundle = _bundle(model)
    if bundle.onnx_path is None:
        raise ValueError(f"{model if isinstance(model, (str, os.PathLike)) else bundle.root} has no ONNX step graph: export it with `stoprt export ... --to bundle`")
    return bundle.onnx_path, True, Path(workdir) if workdir is not None else bundle.root


def _temporary_folder() -> Path:
    folder = tempfile.mkdtemp(prefix="stoprt-runner-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a runner may read its file lazily
    return Path(folder)


class TorchStepRunner:
    """Inference with the stoprt layers themselves (plain dynamics, eval mode, no gradients).

    Args:
        net: the network. It is used in place, so parameter updates made elsewhere (a learner) are
            seen at the next step; it is put in eval mode with plain dynamics (not STOP) here.
        device: where steps run; inputs are moved there. Default: the device of the parameters.

    ``step`` takes a torch tensor (returns one) or a numpy array (returns one).
    """

    def __init__(self, net: nn.Module, device: str | torch.device | None = None) -> None:
        L.set_stop_mode(net, False)
        self.net = net.eval()
        first = next(net.parameters(), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
        self.net.to(self.device)
        self._neurons = [(f"state.{path}", m) for path, m in net.named_modules()
                         if isinstance(m, L.Neuron)]
        self.reset()

    @torch.no_grad()
    def step(self, x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        as_numpy = isinstance(x, np.ndarray)
        t = torch.from_numpy(np.ascontiguousarray(x)) if as_numpy else x
        y = self.net(t.to(self.device, torch.float32))
        return y.cpu().numpy() if as_numpy else y

    def reset(self) -> None:
        L.reset_state(self.net)

    def state(self) -> dict[str, np.ndarray]:
        """The state after the last step (empty before the first), as numpy arrays."""
        return {f"{prefix}.{name}": t.detach().cpu().numpy() for prefix, m in self._neurons
                for name, t in m.get_state().items() if t is not None}
