"""The step-runner interface every inference backend offers, and its torch implementation.

A step runner holds a network's state between calls: ``step(x_t) -> output`` runs one time step
``x_t`` ``[B, *input_shape]`` and returns the output ``[B, *output_shape]`` (spikes or readout
potential); ``reset()`` forgets the sample. A streaming session written against this interface runs
unchanged on torch (:class:`TorchStepRunner`), ONNX Runtime
(:class:`~stoprt.export.ort_runner.OrtStepRunner`) or TensorRT
(:class:`~stoprt.export.tensorrt.TrtStepRunner`). ``state()`` returns the current state under the
names the ONNX step graph uses (``state.<layer path>.u`` / ``.s``), which makes backends comparable.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..runtime import layers as L


class StepRunner(Protocol):
    """What a streaming session needs from a backend."""

    def step(self, x: Any) -> Any:
        """Run one time step ``[B, *input_shape]``; returns ``[B, *output_shape]``."""

    def reset(self) -> None:
        """Forget the sample: state back to zero."""


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
