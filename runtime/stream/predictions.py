"""Per-window predictions of a stream session: a line for people, a row for files.

:class:`PredictionLog` is the ``on_prediction`` callback of a
:class:`~stoprt.runtime.stream.session.StreamSession`. It writes one row per closed window to a ``.csv`` or
``.jsonl`` file (chosen by the suffix), flushed row by row so that a killed run keeps every window it
finished (the file is written in place, not atomically: it grows while the stream runs), and keeps
the counts per class and the latest rows for the summary.

Columns: ``window`` (index from 0), ``t_start_us``, ``t_end_us`` (the stream time the window covers),
``steps``, ``prediction`` (class index), ``label`` (class index, empty / null when the window is not
labelled), ``score`` (the predicted class's output summed over the window).
"""

from __future__ import annotations

import csv
import json
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import WindowPrediction

COLUMNS = ("window", "t_start_us", "t_end_us", "steps", "prediction", "label", "score")
SUFFIXES = (".csv", ".jsonl")


def check_path(path: str | Path) -> Path:
    """``path`` if its suffix names a format; ValueError otherwise (before any work is done)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--predictions {path}: the file name must end in .csv or .jsonl (the format)")
    if path.is_dir():
        raise ValueError(f"--predictions {path} is a folder")
    return path


def describe(p: "WindowPrediction") -> str:
    """``window 12  0.360-0.660 s  class 3  (label 3)``."""
    label = "" if p.label is None else f"  (label {p.label}{'' if p.label == p.prediction else ', wrong'})"
    return f"window {p.index}  {p.t_start_us / 1e6:.3f}-{p.t_end_us / 1e6:.3f} s  class {p.prediction}{label}"


class PredictionLog:
    """Collects window predictions; writes them to ``path`` (``None``: no file) as they come."""

    def __init__(self, path: str | Path | None = None, keep: int = 1000) -> None:
        self.path = None if path is None else check_path(path)
        self.counts: Counter[int] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.total = 0
        self._file = self._csv = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", newline="")
            if self.path.suffix.lower() == ".csv":
                self._csv = csv.writer(self._file)
                self._csv.writerow(COLUMNS)
                self._file.flush()

    def __call__(self, p: "WindowPrediction") -> None:
        row = {"window": p.index, "t_start_us": p.t_start_us, "t_end_us": p.t_end_us, "steps": p.steps,
               "prediction": p.prediction, "label": p.label, "score": round(p.score, 6)}
        self.total += 1
        self.counts[p.prediction] += 1
        self.recent.append(row)
        if self._file is not None:
            if self._csv is not None:
                self._csv.writerow(["" if row[k] is None else row[k] for k in COLUMNS])
            else:
                self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def summary(self) -> dict[str, Any]:
        """For the stream summary: total, counts per class, the latest rows, the file."""
        return {"windows": self.total, "counts": {str(k): v for k, v in sorted(self.counts.items())},
                "latest": list(self.recent), "file": None if self.path is None else str(self.path)}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
