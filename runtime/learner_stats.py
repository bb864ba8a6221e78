"""The counters every learner keeps (torch-free: the ONNX Runtime learner of the edge install uses them too)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LearnerStats:
    """Counters a learner keeps; ``rejected_updates`` counts updates refused for NaN/Inf."""

    steps: int = 0
    samples: int = 0
    updates: int = 0
    rejected_updates: int = 0
    clamped_values: int = 0
    last_loss: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)
