"""The step-runner interface: what a streaming session needs from an inference backend.

The runtime defines it; :mod:`stoprt.export.runners` implements it for torch and makes the ONNX
Runtime and TensorRT runners (:func:`stoprt.export.runners.make_runner`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class StepRunner(Protocol):
    """A network's state held between calls: ``step(x_t)`` runs one time step, ``reset()`` forgets."""

    def step(self, x: Any) -> Any:
        """Run one time step ``[B, *input_shape]``; returns ``[B, *output_shape]``."""

    def reset(self) -> None:
        """Forget the sample: state back to zero."""
