"""When a STOP learner applies its accumulated gradients: the one schedule that torch's ``STOP`` and the
learners of the exported graphs (ONNX Runtime, TensorRT) follow. Torch-free, for the edge install.

``"sample"``: at each sample's end; ``"step"``: after every labelled step; ``N``: after every N
labelled steps (and at a sample's end, whatever is pending).
"""

from __future__ import annotations

from typing import Union

UpdateSchedule = Union[str, int]


def check_update_schedule(update: UpdateSchedule) -> None:
    if update not in ("sample", "step") and not (isinstance(update, int) and update >= 1):
        raise ValueError(f"update must be 'sample', 'step' or an int >= 1, got {update!r}")


def update_due(update: UpdateSchedule, labelled_steps_since_update: int) -> bool:
    """Whether the update is applied right after a labelled step (a sample's end always applies it)."""
    return update == "step" or (isinstance(update, int) and labelled_steps_since_update >= update)
