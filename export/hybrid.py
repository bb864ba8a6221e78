"""Hybrid deploy for in-situ learning: a frozen backbone on an inference engine, a head that learns.

A ``Sequential`` network is split at a layer index. The backbone (layers before it) is exported as
an ONNX step graph and run by ONNX Runtime (or TensorRT, or torch for comparison); the head (the
layers from the index on) stays made of stoprt layers in torch and learns with
:class:`~stoprt.runtime.stop.STOP`, its weights, thresholds and leaks included. The split must come
after a LIF (optionally followed by pooling or flattening), so spikes, not currents, cross the
boundary: STOP's input traces of the head's first synaptic op are then exact, and the backbone
needs no gradient.

The head's layers are the network's own modules, so after learning ``net`` holds the new head and
can be saved whole (:func:`~stoprt.export.model_file.save_model`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..runtime import layers as L
from ..runtime.stop import KINDS, STOP
from .onnx_step import StepFunction
from .runners import make_runner

BACKENDS = ("onnxruntime", "tensorrt", "torch")
# Roles of the layers that may sit between the backbone's last LIF and the split: they pass spikes on
# unchanged in time (what reaches the head is still a function of this step's spikes only).
_SPIKE_PASSTHROUGH = (L.CURRENT_PASS, L.SPIKE_PASS)


def split_network(net: nn.Sequential, index: int) -> tuple[L.Sequential, L.Sequential]:
    """``(backbone, head)`` = ``net[:index]``, ``net[index:]`` sharing ``net``'s modules.

    Raises ``ValueError`` unless ``net`` is a Sequential with an input shape, ``0 < index < len(net)``
    and the backbone ends in a LIF (possibly followed by pooling / flattening / dropout).
    """
    if not isinstance(net, nn.Sequential):
        raise ValueError(f"a hybrid split needs a Sequential network, got {type(net).__name__}")
    input_shape = getattr(net, "input_shape", None)
    if input_shape is None:
        raise ValueError("the network has no input_shape; build it with Sequential(..., input_shape=...)")
    if not 0 < index < len(net):
        raise ValueError(f"split index must be in 1..{len(net) - 1}, got {index}")
    layers = list(net)
    last = index - 1
    while last >= 0 and L.layer_kind(layers[last], strict=False) in _SPIKE_PASSTHROUGH:
        last -= 1
    if last < 0 or not isinstance(layers[last], L.LIF):
        where = f"layer {last} ({type(layers[last]).__name__})" if last >= 0 else "no layer"
        raise ValueError(f"cannot split at {index}: {where} ends the backbone; the split must follow a LIF "
                         "so that spikes cross the boundary")
    backbone = L.Sequential(*layers[:index], input_shape=input_shape)
    head = L.Sequential(*layers[index:])
    out_shape, _ = StepFunction(backbone).shapes(tuple(input_shape))  # the backbone's output, no batch
    head.input_shape = tuple(out_shape)
    return backbone, head


class HybridSTOP:
    """Backbone on an inference backend, head learned online with STOP; STOP's interface.

    Args:
        net: a ``Sequential`` network of stoprt layers with ``input_shape``.
        split: index of the first head layer (see :func:`split_network`).
        optimizer: a ``torch.optim`` optimizer over (some of) the head's parameters, or a callable
            ``params -> optimizer`` called with the head's parameters.
        backend: ``"onnxruntime"`` (default), ``"tensorrt"`` (CUDA) or ``"torch"``.
        workdir: where the backbone's graph (and engine) is written; default a temporary directory.
        learn, update, loss: as for :class:`~stoprt.runtime.stop.STOP`.
        providers: ONNX Runtime providers; workspace_mib, fp16: TensorRT build options.

    Use exactly like STOP: ``out = hybrid.step(x_t, target=y)`` per step, ``hybrid.end_sample()``
    (``stats`` and ``optimizer`` too, so a stream session can take it as its learner).
    """

    def __init__(self, net: nn.Sequential, split: int,
                 optimizer: torch.optim.Optimizer | Callable[[Iterable[Tensor]], torch.optim.Optimizer],
                 backend: str = "onnxruntime", workdir: str | os.PathLike | None = None,
                 learn: Iterable[str] = KINDS, update: str | int = "sample", loss="ce",
                 providers: list | None = None, workspace_mib: int = 512, fp16: bool = False) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.backbone, self.head = split_network(net, split)
        self.backend = backend
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="stoprt-hybrid-"))
        self.runner = make_runner(backend, self.backbone, workdir=self.workdir, name="backbone", providers=providers,
                                  engine={"max_batch": 64, "opt_batch": 1, "fp16": fp16, "workspace_mib": workspace_mib})
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(self.head.parameters())
        device = next(self.head.parameters()).device
        self.device = device
        self.learner = STOP(self.head, optimizer, learn=learn, update=update, loss=loss)

    @property
    def stats(self):
        return self.learner.stats

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    def step(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """One time step ``[B, *input_shape]``: backbone on the backend, then the head learns (with a target)."""
        features = torch.as_tensor(self.runner.step(x))  # [B, *head.input_shape]
        return self.learner.step(features.to(self.device), target)

    def end_sample(self) -> Tensor | None:
        """End the sample: the head applies its update; both parts forget their state. Returns the
        prediction ``[B]`` (or None if no step ran)."""
        self.runner.reset()
        return self.learner.end_sample()

    @torch.no_grad()
    def predict(self, x_seq: Tensor) -> Tensor:
        """Class predictions ``[B]`` for a sample ``[T, B, ...]``, without learning."""
        if x_seq.dim() < 2 or x_seq.shape[0] == 0:
            raise ValueError(f"predict takes a sample [T, B, ...] with T >= 1, got shape {tuple(x_seq.shape)}")
        self.runner.reset()
        try:
            # T steps of [B, *head.input_shape] -> [T, B, *head.input_shape]
            features = torch.stack([torch.as_tensor(self.runner.step(x_t)).to(self.device) for x_t in x_seq])
        finally:
            self.runner.reset()
        return self.learner.predict(features)
