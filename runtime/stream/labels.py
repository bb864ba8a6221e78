"""Labels of a stream: segments of stream time, each with a class, as a :class:`LabelTrack` that a
stream session looks up at every step and a labelling process (or a source, such as the built-in
streams) fills while streaming; read from ``class,start_us,end_us`` CSV files (DVS128 Gesture's
``_labels.csv``)."""

from __future__ import annotations

import bisect
import csv
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Segment:
    """A labelled stretch of the stream, ``[start_us, end_us)``."""

    start_us: int
    end_us: int
    label: int


class LabelTrack:
    """Labelled segments of a stream, sorted by start; labels can be added while streaming (also
    from another thread, e.g. a source's producer)."""

    def __init__(self, segments: Iterable[Segment] = ()) -> None:
        self.segments: list[Segment] = []
        self._starts: list[int] = []  # the segments' starts, searched at every step (no key function)
        self._lock = threading.Lock()
        # The last answer of ``at`` and the time it holds until (the segment's end, or the next start),
        # asked again at every step of the segment: checked without the lock and the search. Adding or
        # pruning clears it.
        self._hit: tuple[Segment, int] | None = None
        for seg in segments:
            self.add(seg.start_us, seg.end_us, seg.label)

    def add(self, start_us: int, end_us: int, label: int) -> Segment:
        if end_us <= start_us:
            raise ValueError(f"label segment must have end > start, got [{start_us}, {end_us})")
        if label < 0:
            raise ValueError(f"labels are class indices >= 0, got {label}")
        seg = Segment(int(start_us), int(end_us), int(label))
        with self._lock:
            i = bisect.bisect_right(self._starts, seg.start_us)
            self._starts.insert(i, seg.start_us)
            self.segments.insert(i, seg)
            self._hit = None
        return seg

    def at(self, t_us: int) -> Segment | None:
        """The segment containing time ``t_us``, if any."""
        hit = self._hit
        if hit is not None and hit[0].start_us <= t_us < hit[1]:
            return hit[0]
        with self._lock:
            i = bisect.bisect_right(self._starts, t_us) - 1
            if i < 0 or t_us >= self.segments[i].end_us:
                return None
            seg = self.segments[i]
            until = self._starts[i + 1] if i + 1 < len(self._starts) else seg.end_us
            self._hit = (seg, min(seg.end_us, until))
            return seg

    def prune(self, before_us: int) -> None:
        """Forget segments that ended before ``before_us`` (bounded memory on endless streams)."""
        with self._lock:
            self.segments = [s for s in self.segments if s.end_us > before_us]
            self._starts = [s.start_us for s in self.segments]
            self._hit = None

    @classmethod
    def from_csv(cls, path: str | Path, first_class: int = 1) -> "LabelTrack":
        """Read ``class,start_us,end_us`` rows (DVS128 Gesture's ``_labels.csv``; a header is skipped).

        ``first_class`` is the number the file gives its first class (1 in DVS128 Gesture). Only a first
        row that does not start with a number is a header; any other row must be three integers, else
        ``ValueError`` names the file and line (a skipped "1.5" would leave learning silently idle).
        """
        data = Path(path).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text (byte "
                             f"0x{data[err.start]:02x}); expected class,start_us,end_us rows") from None
        track = cls()
        rows = [(n, row) for n, row in enumerate(csv.reader(text.splitlines()), 1) if "".join(row).strip()]
        for i, (n, row) in enumerate(rows):
            try:
                if len(row) < 3:
                    raise ValueError(f"expected class,start_us,end_us, got {','.join(row)!r}")
                try:
                    label, start, end = (int(v) for v in row[:3])
                except ValueError:
                    if i == 0 and not _is_number(row[0]):
                        continue  # the header
                    raise ValueError(f"expected integers class,start_us,end_us, got {','.join(row)!r}") from None
                if label < first_class:
                    raise ValueError(f"class {label} is below the first class, {first_class}")
                track.add(start, end, label - first_class)
            except ValueError as err:
                raise ValueError(f"{path}:{n}: {err}") from None
        if not track.segments:
            raise ValueError(f"{path}: no label rows (class,start_us,end_us)")
        return track


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
