"""Stream session: continuous prediction and in-situ learning on a stream of time steps.

A session takes time steps one at a time (``frame [C, H, W]`` with ``t_start``/``t_end`` in us, as
the binner produces them) and cuts them into samples: the labelled segments of a :class:`LabelTrack`,
or fixed windows of ``window`` steps when there are no labels. Within a sample the network's state
carries over; at its end the prediction is the argmax of the outputs summed over the sample (the
readout window), the learner applies its update, and the state is reset.

Learning uses the STOP learner from the live stream: a step inside a labelled segment learns from
that label. Labels may be sparse (unlabelled samples only predict) or late: with
``late_label_steps > 0`` the inputs of the last sample are kept (bounded) and replayed when its label
arrives, which gives exactly the update an in-time label would have.

Checkpoints hold everything learned and where the stream was: parameters (weights, thresholds,
leaks, BN), optimizer state, counters and the stream time. They are written atomically at sample
boundaries, every ``checkpoint_every`` samples, and on SIGINT/SIGTERM (which end the current sample
early). :meth:`StreamSession.resume` loads one; steps up to its stream time are then skipped, so an
interrupted run continues where its checkpoint left it.
"""

from __future__ import annotations

import bisect
import csv
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import layers as L
from .checkpoint import load_checkpoint, save_checkpoint
from .stop import STOP


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
        self._lock = threading.Lock()
        for seg in segments:
            self.add(seg.start_us, seg.end_us, seg.label)

    def add(self, start_us: int, end_us: int, label: int) -> Segment:
        if end_us <= start_us:
            raise ValueError(f"label segment must have end > start, got [{start_us}, {end_us})")
        if label < 0:
            raise ValueError(f"labels are class indices >= 0, got {label}")
        seg = Segment(int(start_us), int(end_us), int(label))
        with self._lock:
            bisect.insort(self.segments, seg, key=lambda s: s.start_us)
        return seg

    def at(self, t_us: int) -> Segment | None:
        """The segment containing time ``t_us``, if any."""
        with self._lock:
            i = bisect.bisect_right(self.segments, t_us, key=lambda s: s.start_us) - 1
            return self.segments[i] if i >= 0 and t_us < self.segments[i].end_us else None

    def prune(self, before_us: int) -> None:
        """Forget segments that ended before ``before_us`` (bounded memory on endless streams)."""
        with self._lock:
            self.segments = [s for s in self.segments if s.end_us > before_us]

    @classmethod
    def from_csv(cls, path: str | Path, first_class: int = 1) -> "LabelTrack":
        """Read ``class,start_us,end_us`` rows (DVS128 Gesture's ``_labels.csv``; a header is skipped).

        ``first_class`` is the number the file gives its first class (1 in DVS128 Gesture).
        """
        track = cls()
        with open(path, newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or not row[0].strip().lstrip("-").isdigit():
                    continue  # header or blank line
                if len(row) < 3:
                    raise ValueError(f"{path}:{n}: expected class,start_us,end_us, got {row}")
                track.add(int(row[1]), int(row[2]), int(row[0]) - first_class)
        return track


@dataclass
class SessionStats:
    steps: int = 0
    samples: int = 0
    labelled_samples: int = 0
    correct: int = 0
    updates: int = 0
    replayed_samples: int = 0
    skipped_steps: int = 0
    t_us: int = -1                 # end time of the last processed step
    last_prediction: int | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled_samples if self.labelled_samples else None


@dataclass
class _Sample:
    segment: Segment | None
    start_us: int
    steps: int = 0
    output_sum: Tensor | None = None
    target: Tensor | None = None   # the segment's label as a [1] tensor, made once per sample
    frames: list[Tensor] | None = field(default_factory=list)  # None: too long to keep for replay


class StreamSession:
    """Runs ``net`` on a stream of steps, predicting continuously and learning in place.

    Args:
        net: a stoprt network; one step's input is ``[1, *input_shape]``.
        learner: a STOP learner over ``net`` to learn in place, or None to only predict.
        window: steps per sample when there are no labels (the readout window).
        labels: labelled segments; samples then follow them.
        checkpoint_dir: where ``session.pt`` is written (atomically).
        checkpoint_every: samples between checkpoints (0: only on signals and at the end).
        late_label_steps: keep up to this many input steps of the last sample for a late label.
        meta: extra JSON-able facts stored in checkpoints (model description, input spec).
        runner: for inference without learning, another backend with ``step(x) -> output`` and
            ``reset()`` (e.g. :class:`stoprt.export.ort_runner.OrtStepRunner`) used instead of ``net``.
    """

    def __init__(self, net: nn.Module, learner: STOP | None = None, window: int = 10,
                 labels: LabelTrack | None = None, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int = 0, late_label_steps: int = 0, meta: dict | None = None,
                 runner: Any = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 step, got {window}")
        if runner is not None and learner is not None:
            raise ValueError("a session learns with a torch learner or runs another backend, not both")
        self.net, self.learner, self.window, self.runner = net, learner, window, runner
        self.labels = labels
        self.checkpoint_path = Path(checkpoint_dir) / "session.pt" if checkpoint_dir else None
        self.checkpoint_every, self.late_label_steps = checkpoint_every, late_label_steps
        self.meta = meta or {}
        self.stats = SessionStats()
        self._sample: _Sample | None = None
        self._last_unlabelled: _Sample | None = None
        self._stop_requested = False
        self._resume_after_us = -1

    # ---- one step -------------------------------------------------------------------------------
    def process(self, frame: Tensor, t_start: int, t_end: int) -> int:
        """Run one time step; returns the running prediction of the current sample."""
        if t_end <= self._resume_after_us:
            self.stats.skipped_steps += 1
            return -1
        segment = self.labels.at(t_start) if self.labels is not None else None
        if self._sample is not None and self._boundary(segment):
            self._close_sample()
        if self._sample is None:
            self._sample = _Sample(segment, t_start)
        sample = self._sample
        x = frame.unsqueeze(0)
        if segment is not None and sample.target is None:
            sample.target = torch.tensor([segment.label], device=x.device)
        target = sample.target
        if self.learner is not None:
            out = self.learner.step(x, target)
        elif self.runner is not None:
            out = torch.as_tensor(self.runner.step(x))
        else:
            with torch.no_grad():
                out = self.net(x)
        if self.late_label_steps and segment is None and sample.frames is not None:
            if len(sample.frames) < self.late_label_steps:
                sample.frames.append(frame)
            else:
                sample.frames = None  # longer than the replay bound: a late label will not apply
        sample.steps += 1
        sample.output_sum = out if sample.output_sum is None else sample.output_sum + out
        self.stats.steps += 1
        self.stats.t_us = t_end
        return int(sample.output_sum.argmax(1))

    def _boundary(self, segment: Segment | None) -> bool:
        if self.labels is not None:
            return segment != self._sample.segment
        return self._sample.steps >= self.window

    def _close_sample(self) -> None:
        sample, self._sample = self._sample, None
        prediction = int(sample.output_sum.argmax(1))
        if self.learner is not None:
            self.learner.end_sample()
            self.stats.updates = self.learner.stats.updates
        elif self.runner is not None:
            self.runner.reset()
        else:
            L.reset_state(self.net)
        self.stats.samples += 1
        self.stats.last_prediction = prediction
        if sample.segment is not None:
            self.stats.labelled_samples += 1
            self.stats.correct += int(prediction == sample.segment.label)
        elif sample.frames:
            self._last_unlabelled = sample
        if self.labels is not None:
            self.labels.prune(sample.start_us)
        if self.checkpoint_path and self.checkpoint_every and self.stats.samples % self.checkpoint_every == 0:
            self.save()

    def add_label(self, start_us: int, end_us: int, label: int) -> bool:
        """A label that arrives while streaming. If it covers the last, unlabelled sample whose inputs
        were kept, that sample is replayed with it now; returns whether that happened."""
        if self.labels is None:
            raise ValueError("this session segments by windows; create it with a LabelTrack for labels")
        self.labels.add(start_us, end_us, label)
        last = self._last_unlabelled
        if last is None or self.learner is None or not start_us <= last.start_us < end_us:
            return False
        if self._sample is not None:
            # The replay needs the network to itself: finish the sample in progress first.
            self._close_sample()
        target = torch.tensor([label], device=last.frames[0].device)
        for frame in last.frames:
            self.learner.step(frame.unsqueeze(0), target)
        self.learner.end_sample()
        self._last_unlabelled = None
        self.stats.replayed_samples += 1
        self.stats.updates = self.learner.stats.updates
        return True

    # ---- whole streams ------------------------------------------------------------------------
    def run(self, steps: Iterable[Any], max_steps: int | None = None, on_step=None) -> SessionStats:
        """Process ``steps`` (objects with ``frame``, ``t_start``, ``t_end``) until the stream ends,
        ``max_steps`` are done, or SIGINT/SIGTERM; then close the sample and checkpoint."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._request_stop)
        try:
            for step in steps:
                self.process(step.frame, step.t_start, step.t_end)
                if on_step is not None:
                    on_step(self)
                if self._stop_requested or (max_steps is not None and self.stats.steps >= max_steps):
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.finish()
        return self.stats

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    @property
    def interrupted(self) -> bool:
        return self._stop_requested

    def finish(self) -> None:
        """Close the sample in progress and write a final checkpoint."""
        if self._sample is not None and self._sample.steps:
            self._close_sample()
        if self.checkpoint_path:
            self.save()

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        """Write ``session.pt`` atomically (call at sample boundaries; see the module docstring)."""
        if self.checkpoint_path is None:
            raise ValueError("this session has no checkpoint_dir")
        stats = asdict(self.stats)
        return save_checkpoint(self.checkpoint_path, {
            "kind": "stream-session", "model_state": self.net.state_dict(),
            "optimizer_state": self.learner.optimizer.state_dict() if self.learner else None,
            "learner_stats": self.learner.stats.as_dict() if self.learner else None,
            "session": stats, "meta": self.meta, "saved_at": time.time(),
            "rng_state": torch.get_rng_state()})

    def resume(self, path: str | Path | None = None) -> dict:
        """Load a session checkpoint into this session; later steps up to its time are skipped."""
        data = load_checkpoint(path or self.checkpoint_path)
        if data.get("kind") != "stream-session":
            raise ValueError(f"{path or self.checkpoint_path} is not a stream-session checkpoint")
        try:
            self.net.load_state_dict(data["model_state"])
        except RuntimeError as err:
            raise ValueError(f"the checkpoint does not fit this model: {str(err).splitlines()[0]}") from err
        if self.learner is not None and data["optimizer_state"] is not None:
            self.learner.optimizer.load_state_dict(data["optimizer_state"])
            for k, v in (data["learner_stats"] or {}).items():
                setattr(self.learner.stats, k, v)
        for k, v in data["session"].items():
            setattr(self.stats, k, v)
        torch.set_rng_state(data["rng_state"])  # the same dropout masks as an uninterrupted run
        self._resume_after_us = self.stats.t_us
        return data
