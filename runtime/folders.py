"""Dataset folders of event recordings in the class-folder layout (as N-MNIST is distributed).

Layout: ``ROOT/<split>/<class>/<recording>`` where ``<split>`` is ``train``/``Train`` or
``test``/``Test`` and each recording is a file our readers know (``.bin``, ``.aedat``, ``.aedat4``,
``.raw``, ``.dat``). Recordings are read lazily, one per item, and binned into T equal-time frames.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .events import events_to_frames
from .formats import EXTENSIONS, open_events

# Formats whose files do not state the sensor size: the datasets that use them fix it.
DEFAULT_SENSOR = {"nmnist": (34, 34)}


class EventFolder(torch.utils.data.Dataset):
    """Recordings under ``root/<split>/<class>/``; items are ``(frames [T, 2, size, size], label)``.

    Args:
        sensor_size: ``(W, H)``; default from the first file's header, or the format's known size.
    """

    def __init__(self, root: str | Path, split: str = "train", T: int = 10, size: int = 32,
                 sensor_size: tuple[int, int] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"dataset folder {root} does not exist")
        split_dir = next((root / name for name in (split, split.capitalize()) if (root / name).is_dir()), None)
        if split_dir is None:
            raise ValueError(f"dataset folder {root} has no '{split}' (or '{split.capitalize()}') subfolder")
        self.class_names = tuple(sorted(d.name for d in split_dir.iterdir() if d.is_dir()))
        self.files = [(f, label) for label, name in enumerate(self.class_names)
                      for f in sorted((split_dir / name).iterdir()) if f.suffix.lower() in EXTENSIONS]
        if not self.files:
            raise ValueError(f"no event recordings ({', '.join(EXTENSIONS)}) in class folders under {split_dir}")
        self.T, self.size = T, size
        self.num_classes = len(self.class_names)
        self.input_shape = (2, size, size)
        self.sensor_size = sensor_size or self._sensor_of(self.files[0][0])

    @staticmethod
    def _sensor_of(path: Path) -> tuple[int, int]:
        with open_events(path) as reader:
            size = reader.info.sensor_size or DEFAULT_SENSOR.get(reader.info.format)
        if size is None:
            raise ValueError(f"{path} does not state its sensor size; pass sensor_size=(W, H)")
        return size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        with open_events(path) as reader:
            events = reader.read_all()
        frames = events_to_frames(events, self.sensor_size, self.T, out_size=self.size)
        return frames.float(), label


def load_folder(root: str | Path, split: str = "train", T: int = 10, size: int = 32) -> EventFolder:
    """The ``split`` of a class-folder dataset (see the module docstring)."""
    return EventFolder(root, split, T, size)
