"""Dataset folders of event recordings, read lazily (one sample per item) and binned into T frames.

Three layouts, told apart by :func:`detect_layout` (``load_folder`` does it for ``stoprt train --data``):

* ``"dvs_gesture"``: DVS128 Gesture (Amir et al., 2017) as distributed: ``userNN_<lighting>.aedat``
  (AEDAT 3.1, 128x128) next to ``userNN_<lighting>_labels.csv`` (header
  ``class,startTime_usec,endTime_usec``; classes 1..11), in ``ROOT`` or ``ROOT/DvsGesture``. Each
  labelled segment is one sample; subjects 1-23 are the train split, 24-29 the test split. Building
  the dataset reads only the csv files; an item reads its recording up to the segment's end.
* ``"nmnist"``: N-MNIST: ``ROOT/Train/<digit>/*.bin`` and ``ROOT/Test/...`` (34x34); the label is
  the digit itself, even when some digit folders are absent.
* ``"classes"``: any ``ROOT/<split>/<class>/<recording>`` with ``<split>`` ``train``/``Train`` or
  ``test``/``Test`` and recordings our readers know (``.bin``, ``.aedat``, ``.aedat4``, ``.raw``,
  ``.dat``); classes are the sorted folder names. Binned from the first to the last event.

Every dataset has ``files`` (one entry per sample, in order; a prefix may be kept to subsample),
``class_names``, ``num_classes``, ``T`` and ``input_shape`` ``(2, size, size)``; items are
``(frames float32 [T, 2, size, size], label)`` (channel 0 OFF, 1 ON).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .events import EVENT_DTYPE, events_to_frames
from .formats import EXTENSIONS, open_events
from .formats.nmnist import SENSOR_SIZE as NMNIST_SENSOR

# Formats whose files do not state the sensor size: the datasets that use them fix it.
DEFAULT_SENSOR = {"nmnist": NMNIST_SENSOR}
GESTURE_CLASSES = ("hand_clap", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
                   "right_arm_counter_clockwise", "left_arm_clockwise", "left_arm_counter_clockwise", "arm_roll",
                   "air_drums", "air_guitar", "other_gestures")
GESTURE_SENSOR = (128, 128)
GESTURE_SPLITS = {"train": range(1, 24), "test": range(24, 30)}
LABELS_HEADER = ("class", "startTime_usec", "endTime_usec")
_GESTURE_FILE = re.compile(r"user(\d+)_(.+)\.aedat$")
LAYOUTS = ("dvs_gesture", "nmnist", "classes")


def _split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist")
    split_dir = next((root / name for name in (split, split.capitalize()) if (root / name).is_dir()), None)
    if split_dir is None:
        raise ValueError(f"dataset folder {root} has no '{split}' (or '{split.capitalize()}') subfolder")
    return split_dir


def _set_shape(dataset: torch.utils.data.Dataset, T: int, size: int, sensor_size: tuple[int, int]) -> None:
    """Check and set the attributes every folder dataset shares (class_names must be set)."""
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    dataset.T, dataset.size, dataset.sensor_size = T, size, sensor_size
    dataset.num_classes = len(dataset.class_names)
    dataset.input_shape = (2, size, size)


class EventFolder(torch.utils.data.Dataset):
    """Recordings under ``root/<split>/<class>/``; items are ``(frames [T, 2, size, size], label)``.

    Args:
        sensor_size: ``(W, H)``; default from the first file's header, or the format's known size.
    """

    def __init__(self, root: str | Path, split: str = "train", T: int = 10, size: int = 32,
                 sensor_size: tuple[int, int] | None = None) -> None:
        split_dir = _split_dir(Path(root), split)
        self.class_names = tuple(sorted(d.name for d in split_dir.iterdir() if d.is_dir()))
        self.files = [(f, label) for label, name in enumerate(self.class_names)
                      for f in sorted((split_dir / name).iterdir()) if f.suffix.lower() in EXTENSIONS]
        if not self.files:
            raise ValueError(f"no event recordings ({', '.join(EXTENSIONS)}) in class folders under {split_dir}")
        _set_shape(self, T, size, sensor_size or self._sensor_of(self.files[0][0]))

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
        with open_events(path, sensor_size=self.sensor_size, errors="skip") as reader:
            events = reader.read_all()
        frames = events_to_frames(events, self.sensor_size, self.T, out_size=self.size)
        return frames.float(), label


class NMNISTFolder(EventFolder):
    """N-MNIST: ``root/Train/<digit>/*.bin`` and ``root/Test/<digit>/*.bin``, 34x34, label = digit."""

    def __init__(self, root: str | Path, split: str = "train", T: int = 10, size: int = 34) -> None:
        split_dir = _split_dir(Path(root), split)
        digits = sorted(d for d in split_dir.iterdir() if d.is_dir() and d.name.isdigit() and int(d.name) < 10)
        self.class_names = tuple(str(d) for d in range(10))
        self.files = [(f, int(d.name)) for d in digits for f in sorted(d.iterdir()) if f.suffix.lower() == ".bin"]
        if not self.files:
            raise ValueError(f"no N-MNIST recordings (<digit>/*.bin) under {split_dir}")
        _set_shape(self, T, size, DEFAULT_SENSOR["nmnist"])


class Segment(NamedTuple):
    """One labelled DVS Gesture sample: events of ``path`` in ``[start_us, end_us)``."""

    path: Path
    label: int  # 0-based: the csv's class id minus 1
    start_us: int
    end_us: int


def _gesture_dir(root: Path) -> Path | None:
    for folder in (root, root / "DvsGesture"):
        if folder.is_dir() and any(_GESTURE_FILE.match(f.name) for f in folder.glob("user*_*.aedat")):
            return folder
    return None


def read_gesture_labels(path: Path) -> list[tuple[int, int, int]]:
    """``(class 1..11, start_us, end_us)`` rows of a DVS Gesture labels file; ValueError naming the
    file and line of anything malformed."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [(i, row) for i, row in enumerate(csv.reader(f), 1) if any(cell.strip() for cell in row)]
    if not rows or tuple(cell.strip() for cell in rows[0][1]) != LABELS_HEADER:
        got = ",".join(rows[0][1]) if rows else "an empty file"
        raise ValueError(f"{path}: the header must be '{','.join(LABELS_HEADER)}', got {got!r}")
    out = []
    for line, row in rows[1:]:
        try:
            cls, start, end = (int(cell) for cell in row)
        except ValueError:
            raise ValueError(f"{path} line {line}: expected three integers, got {','.join(row)!r}") from None
        if not 1 <= cls <= len(GESTURE_CLASSES):
            raise ValueError(f"{path} line {line}: class {cls} is outside 1..{len(GESTURE_CLASSES)}")
        if end <= start or start < 0:
            raise ValueError(f"{path} line {line}: the segment [{start}, {end}) us is empty or negative")
        out.append((cls, start, end))
    return out


class DVSGestureFolder(torch.utils.data.Dataset):
    """DVS128 Gesture segments (see the module docstring); ``size`` defaults to the full 128."""

    def __init__(self, root: str | Path, split: str = "train", T: int = 10, size: int = 128) -> None:
        root = Path(root)
        if split not in GESTURE_SPLITS:
            raise ValueError(f"DVS Gesture splits are 'train' (subjects 1-23) and 'test' (24-29), got {split!r}")
        folder = _gesture_dir(root) if root.is_dir() else None
        if folder is None:
            raise ValueError(f"{root} holds no DVS Gesture recordings (userNN_<lighting>.aedat), "
                             "nor does its DvsGesture subfolder")
        subjects = GESTURE_SPLITS[split]
        self.files: list[Segment] = []
        for rec in sorted(folder.glob("user*_*.aedat")):
            m = _GESTURE_FILE.match(rec.name)
            if m is None or int(m.group(1)) not in subjects:
                continue
            labels = rec.with_name(rec.stem + "_labels.csv")
            if not labels.is_file():
                raise ValueError(f"{rec} has no labels file {labels.name} next to it")
            self.files += [Segment(rec, cls - 1, start, end) for cls, start, end in read_gesture_labels(labels)]
        if not self.files:
            raise ValueError(f"no labelled DVS Gesture segments of subjects {subjects.start}-{subjects.stop - 1} "
                             f"in {folder}")
        self.class_names = GESTURE_CLASSES
        _set_shape(self, T, size, GESTURE_SENSOR)

    def __len__(self) -> int:
        return len(self.files)

    def read_segment(self, index: int) -> np.ndarray:
        """The events of sample ``index`` (streams the file only up to the segment's end)."""
        seg = self.files[index]
        parts = []
        with open_events(seg.path, sensor_size=GESTURE_SENSOR, errors="skip") as reader:
            for chunk in reader:
                t = chunk["t"]
                if t[-1] >= seg.start_us:
                    parts.append(chunk[(t >= seg.start_us) & (t < seg.end_us)])
                if t[-1] >= seg.end_us:
                    break
        return np.concatenate(parts) if parts else np.zeros(0, dtype=EVENT_DTYPE)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        seg = self.files[index]
        frames = events_to_frames(self.read_segment(index), GESTURE_SENSOR, self.T, out_size=self.size,
                                  t_start=seg.start_us, t_end=seg.end_us)
        return frames, seg.label


def detect_layout(root: str | Path) -> str:
    """``"dvs_gesture"``, ``"nmnist"`` or ``"classes"`` for a dataset folder (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist")
    if _gesture_dir(root) is not None:
        return "dvs_gesture"
    split = next((root / n for n in ("Train", "train") if (root / n).is_dir()), None)
    if split is not None:
        classes = [d for d in split.iterdir() if d.is_dir()]
        if classes and all(d.name.isdigit() and int(d.name) < 10 for d in classes) and \
                any(f.suffix.lower() == ".bin" for d in classes for f in d.iterdir()):
            return "nmnist"
    return "classes"


def load_folder(root: str | Path, split: str = "train", T: int = 10, size: int = 32,
                layout: str | None = None) -> torch.utils.data.Dataset:
    """The ``split`` of a dataset folder, its layout detected unless ``layout`` names one of
    :data:`LAYOUTS`; frames are binned to ``T`` steps of ``size`` x ``size``."""
    layout = layout or detect_layout(root)
    if layout == "dvs_gesture":
        return DVSGestureFolder(root, split, T, size)
    if layout == "nmnist":
        return NMNISTFolder(root, split, T, size)
    if layout == "classes":
        return EventFolder(root, split, T, size)
    raise ValueError(f"unknown dataset layout {layout!r}; known: {', '.join(LAYOUTS)}")
