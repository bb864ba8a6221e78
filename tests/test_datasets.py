"""The built-in ``gestures``: the rotation direction survives the peer benchmark's binning.

Before the fix the shapes spun about their own centre, and at 2x16x16, T=10 (the accuracy benchmark's
frames) clockwise and counter-clockwise turns differed only in sub-pixel edge polarity: every method
there learned ``rotate_cw`` and none ``rotate_ccw``. On that generator the check below found no
turn in any rotation (0%: each bin's event centroid stayed put); it now finds the right one in all.
"""

from __future__ import annotations

import numpy as np
import torch

from stoprt.runtime.datasets import GESTURE_CLASSES, synthetic_gestures
from stoprt.runtime.events import events_to_frames

SENSOR, SIZE, T, DURATION_US = 32, 16, 10, 200_000  # as load_builtin("gestures", T=10, size=16) bins
# px^2 at 16x16: turns now enclose 7-30, moves and zooms up to ~1.7, the old spins ~0.02 (400 each)
DEAD_ZONE = 2.0


def _benchmark_frames(n_samples: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``(frames [N, T, 2, SIZE, SIZE], labels [N])`` binned as the accuracy benchmark sees them."""
    events, labels = synthetic_gestures(n_samples=n_samples, sensor_size=(SENSOR, SENSOR), seed=seed)
    frames = torch.stack([events_to_frames(ev, (SENSOR, SENSOR), T, out_size=SIZE, t_start=0,
                                           t_end=DURATION_US + 1) for ev in events])
    return frames, labels


def _swept_area(frames: torch.Tensor) -> torch.Tensor:
    """Signed area ``[N]`` (pixels^2) enclosed by the path of each bin's event centroid, closed.

    Image rows grow downwards, so a path that turns clockwise on screen encloses a positive area.
    """
    counts = frames.float().sum(2)  # [N, T, H, W], both polarities
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    mass = counts.sum((2, 3)).clamp(min=1)
    cx, cy = (counts * xs).sum((2, 3)) / mass, (counts * ys).sum((2, 3)) / mass  # [N, T]
    nx, ny = cx.roll(-1, 1), cy.roll(-1, 1)
    return 0.5 * (cx * ny - nx * cy).sum(1)  # shoelace formula


def test_rotation_direction_is_visible_in_benchmark_frames() -> None:
    frames, labels = _benchmark_frames(160, seed=0)  # 20 recordings per class
    area = _swept_area(frames)
    cw, ccw = (torch.from_numpy(labels == GESTURE_CLASSES.index(name)) for name in ("rotate_cw", "rotate_ccw"))
    # One feature, a fixed rule, no fitting: a path enclosing more than DEAD_ZONE turns clockwise
    # (positive) or counter-clockwise (negative); anything smaller counts as no turn (a miss).
    assert float((area[cw] > DEAD_ZONE).float().mean()) >= 0.95
    assert float((area[ccw] < -DEAD_ZONE).float().mean()) >= 0.95
    # and the rule sees turns only where there are some: moves and zooms stay inside the dead zone
    assert float((area[~(cw | ccw)].abs() < DEAD_ZONE).float().mean()) >= 0.95
