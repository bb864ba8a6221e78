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
leaks, BN), optimizer state, counters, the RNG state and the stream time, always as of a sample
boundary. They are written atomically every ``checkpoint_every`` samples, at the end of the stream,
and when the run stops early (SIGINT/SIGTERM or ``max_steps``): the sample in progress is then
neither learned nor counted, and the checkpoint is the state at its start (the learner applies its
updates at sample ends, so the parameters are still that state), so a resume learns that sample
once, whole. :meth:`StreamSession.resume` loads a checkpoint; the caller should start the source at
its stream time (``stats.t_us``), and steps up to that time are skipped anyway.

Torch is not needed: a session without a torch network (``net=None``) runs a learner or runner whose
values are numpy arrays (the ONNX Runtime learner of the edge install, fed numpy frames by the binner)
and writes its checkpoints as ``session.npz`` (:func:`~stoprt.runtime.checkpoint.save_array_checkpoint`:
the learner's ``state_dict()`` of arrays, the counters and the stream time, digests checked on load).
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from ..checkpoint import load_array_checkpoint, load_checkpoint, save_array_checkpoint, save_checkpoint
from .binning import host_to_device
from .labels import LabelTrack, Segment
from .runner import StepRunner

if TYPE_CHECKING:
    from torch import nn


@dataclass
class SessionStats:
    steps: int = 0
    samples: int = 0
    labelled_samples: int = 0
    labelled_by_class: list[int] = field(default_factory=list)  # [class]: labelled samples of it (sums to labelled_samples)
    correct: int = 0
    updates: int = 0
    replayed_samples: int = 0
    skipped_steps: int = 0
    t_us: int = -1                 # end time of the last processed step
    last_prediction: int | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled_samples if self.labelled_samples else None


@dataclass(frozen=True)
class WindowPrediction:
    """The prediction of one closed sample (readout window): ``index`` counts samples from 0 over the
    session (resumes included), ``[t_start_us, t_end_us)`` is the stream time it covers, ``label`` its
    class when labelled, ``score`` the predicted class's output summed over the window."""

    index: int
    t_start_us: int
    t_end_us: int
    steps: int
    prediction: int
    label: int | None
    score: float


@dataclass
class _Sample:
    segment: Segment | None
    start_us: int
    end_us: int = 0
    steps: int = 0
    output_sum: Any = None         # [1, K] tensor or array (summed by the session when the learner does not)
    target: Any = None             # the segment's label as a [1] tensor or array, made once per sample
    frames: list | None = field(default_factory=list)  # None: too long to keep for replay


def _label(label: int, like: Any) -> Any:
    """``[label]`` as the learner takes it: an int64 array beside numpy frames, else a tensor on the frame's device."""
    if isinstance(like, np.ndarray):
        return np.array([label], np.int64)
    import torch  # a tensor frame: torch is loaded
    return host_to_device(torch.tensor([label]), like.device, torch.int64)


class StreamSession:
    """Runs ``net`` on a stream of steps, predicting continuously and learning in place.

    Args:
        net: a stoprt network; one step's input is ``[1, *input_shape]``. None: the learner or runner
            holds the model (no torch; checkpoints as ``session.npz``).
        learner: a STOP learner over ``net`` to learn in place (or, with ``net=None``, a learner with
            the same ``step``/``end_sample``/``stats`` and a ``state_dict()`` of arrays, such as
            :class:`stoprt.export.ort_learner.OrtLearner`), or None to only predict.
        window: steps per sample when there are no labels (the readout window).
        labels: labelled segments; samples then follow them.
        checkpoint_dir: where ``session.pt`` (``session.npz`` with ``net=None``) is written (atomically).
        checkpoint_every: samples between checkpoints (0: only on signals and at the end).
        late_label_steps: keep up to this many input steps of the last sample for a late label.
        meta: extra JSON-able facts stored in checkpoints (model description, input spec).
        runner: for inference without learning, another backend (a :class:`StepRunner`: ``step(x) ->
            output`` and ``reset()``, from :func:`stoprt.export.runners.make_runner`) used instead of ``net``.
        on_prediction: called with a :class:`WindowPrediction` each time a sample closes.
        on_sample_end: called with the session at each sample boundary, before the periodic
            checkpoint (e.g. :class:`~stoprt.runtime.stream.merge.FleetMerge`, which may change the
            parameters there); it must not block.
    """

    def __init__(self, net: nn.Module | None, learner: Any = None, window: int = 10,
                 labels: LabelTrack | None = None, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int = 0, late_label_steps: int = 0, meta: dict | None = None,
                 runner: StepRunner | None = None, on_prediction: Callable[[WindowPrediction], None] | None = None,
                 on_sample_end: Callable[["StreamSession"], None] | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 step, got {window}")
        if runner is not None and learner is not None:
            raise ValueError("a session learns with a learner or runs another backend, not both")
        if net is None and learner is None and runner is None:
            raise ValueError("a session without a torch network needs a learner or a runner")
        if net is not None and getattr(learner, "net", net) is not net:
            # checkpoints hold the session's network: they would lose all that the learner learned
            raise ValueError("the learner learns another network than the session's; pass the learner's own: "
                             "StreamSession(learner.net, learner, ...)")
        self.net, self.learner, self.window, self.runner = net, learner, window, runner
        self.arrays = net is None  # numpy values throughout: no torch, array checkpoints
        if net is not None and learner is None and runner is None:
            import torch
            self._no_grad = torch.no_grad
        self.labels = labels
        self.checkpoint_path = self.checkpoint_file(checkpoint_dir, self.arrays) if checkpoint_dir else None
        self.checkpoint_every, self.late_label_steps = checkpoint_every, late_label_steps
        self.meta = meta or {}
        self.on_prediction = on_prediction
        self.on_sample_end = on_sample_end
        self.stats = SessionStats()
        # A learner keeps the sample's summed outputs itself (STOP, BPTT and the graph learners: their
        # output_sum); the session reads those, and sums the outputs only for the others.
        self._sums = learner is None or not hasattr(learner, "output_sum")
        self._sample: _Sample | None = None
        self._last_unlabelled: _Sample | None = None
        self._stop_requested = False
        self._resume_after_us = -1
        self._at_sample_start: dict | None = None  # counters and RNG at the start of the sample in progress

    @staticmethod
    def checkpoint_file(directory: str | Path, arrays: bool) -> Path:
        """The checkpoint of a session in ``directory``: ``session.npz`` for an array session, else ``session.pt``."""
        return Path(directory) / ("session.npz" if arrays else "session.pt")

    # ---- one step -------------------------------------------------------------------------------
    def process(self, frame: Any, t_start: int, t_end: int) -> int:
        """Run one time step; returns the running prediction of the current sample."""
        if not self._advance(frame, t_start, t_end):
            return -1
        return int(self._summed(self._sample).argmax(1)[0])

    def _advance(self, frame: Any, t_start: int, t_end: int, batch: Any = None) -> bool:
        """:meth:`process` without the running prediction (a host read per step; :meth:`run` needs
        none); ``batch``: ``frame[None]`` when the step brings it. False for a step skipped after a
        resume."""
        if t_end <= self._resume_after_us:
            self.stats.skipped_steps += 1
            return False
        segment = self.labels.at(t_start) if self.labels is not None else None
        if self._sample is not None and self._boundary(segment):
            self._close_sample()
        if self._sample is None:
            self._at_sample_start = self._counters() if self.checkpoint_path else None
            self._sample = _Sample(segment, t_start)
        sample = self._sample
        x = frame[None] if batch is None else batch  # [1, *input_shape], a view (tensor or array)
        if segment is not None and sample.target is None:
            sample.target = _label(segment.label, x)
        target = sample.target
        if self.learner is not None:
            out = self.learner.step(x, target)
        elif self.runner is not None:
            out = self.runner.step(x)
        else:
            with self._no_grad():
                out = self.net(x)
        if self.late_label_steps and segment is None and sample.frames is not None:
            if len(sample.frames) < self.late_label_steps:
                sample.frames.append(frame)
            else:
                sample.frames = None  # longer than the replay bound: a late label will not apply
        sample.steps += 1
        sample.end_us = t_end
        if self._sums:
            if sample.output_sum is None:
                sample.output_sum = out + 0  # a copy (tensor or array), summed in place below: never the caller's
            else:
                sample.output_sum += out
        self.stats.steps += 1
        self.stats.t_us = t_end
        return True

    def _summed(self, sample: _Sample) -> Any:
        """The sample's summed outputs ``[1, K]`` (the learner's while the sample is open)."""
        return sample.output_sum if self._sums else self.learner.output_sum

    def _boundary(self, segment: Segment | None) -> bool:
        if self.labels is not None:  # (``is`` first: the lookup returns the same object all through a segment)
            return segment is not self._sample.segment and segment != self._sample.segment
        return self._sample.steps >= self.window

    def _close_sample(self) -> None:
        sample, self._sample = self._sample, None
        # the prediction and its score from one read (a synchronisation on a GPU); numpy's argmax, as
        # torch's, takes the first of equal maxima and a NaN over any number
        scores = self._summed(sample)[0].tolist()
        prediction = int(np.argmax(scores))
        if self.learner is not None:
            self.learner.end_sample()
            self.stats.updates = self.learner.stats.updates
        elif self.runner is not None:
            self.runner.reset()
        else:
            from .. import layers as L  # a torch network
            L.reset_state(self.net)
        self.stats.samples += 1
        self.stats.last_prediction = prediction
        if sample.segment is not None:
            self.stats.labelled_samples += 1
            by_class, label = self.stats.labelled_by_class, sample.segment.label
            by_class.extend([0] * (label + 1 - len(by_class)))
            by_class[label] += 1
            self.stats.correct += int(prediction == sample.segment.label)
        elif sample.frames:
            self._last_unlabelled = sample
        if self.on_prediction is not None:
            self.on_prediction(WindowPrediction(
                self.stats.samples - 1, sample.start_us, sample.end_us, sample.steps, prediction,
                None if sample.segment is None else sample.segment.label,
                float(scores[prediction])))
        if self.labels is not None:
            self.labels.prune(sample.start_us)
        if self.on_sample_end is not None:
            self.on_sample_end(self)
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
        target = _label(label, last.frames[0])
        for frame in last.frames:
            self.learner.step(frame[None], target)
        self.learner.end_sample()
        self._last_unlabelled = None
        self.stats.replayed_samples += 1
        self.stats.updates = self.learner.stats.updates
        return True

    # ---- whole streams ------------------------------------------------------------------------
    def run(self, steps: Iterable[Any], max_steps: int | None = None, on_step=None) -> SessionStats:
        """Process ``steps`` (objects with ``frame``, ``t_start``, ``t_end``) until the stream ends,
        ``max_steps`` are done in this call, or SIGINT/SIGTERM; then checkpoint. At the stream's end
        the last sample is closed; on an early stop it is left unlearned (see the module docstring)."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._request_stop)
        steps0, ended = self.stats.steps, True
        try:
            for step in steps:
                self._advance(step.frame, step.t_start, step.t_end, getattr(step, "batch", None))
                if on_step is not None:
                    on_step(self)
                if self._stop_requested or (max_steps is not None and self.stats.steps - steps0 >= max_steps):
                    ended = False
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.finish(stream_ended=ended)
        return self.stats

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    @property
    def interrupted(self) -> bool:
        return self._stop_requested

    def finish(self, stream_ended: bool = True) -> None:
        """Write a final checkpoint; the sample in progress is closed first if the stream ended (or if
        the learner updates within samples, so that its state is no longer the sample's start)."""
        in_progress = self._sample is not None and self._sample.steps
        if in_progress and (stream_ended or not self._updates_only_at_sample_end()):
            self._close_sample()
        if self.checkpoint_path:
            self.save()

    def _updates_only_at_sample_end(self) -> bool:
        return self.learner is None or getattr(self.learner, "update", "sample") == "sample"

    # ---- checkpoints ---------------------------------------------------------------------------
    def _counters(self) -> dict:
        counters = {"session": asdict(self.stats),
                    "learner_stats": self.learner.stats.as_dict() if self.learner else None}
        if not self.arrays:  # the dropout masks of a torch network (an array learner draws nothing)
            import torch
            counters["rng_state"] = torch.get_rng_state()
        return counters

    def save(self) -> Path:
        """Write the checkpoint atomically, as of the last sample boundary (see the module docstring)."""
        if self.checkpoint_path is None:
            raise ValueError("this session has no checkpoint_dir")
        at_start = self._at_sample_start if self._sample is not None and self._updates_only_at_sample_end() else None
        counters = at_start or self._counters()
        if self.arrays:
            return save_array_checkpoint(self.checkpoint_path, {
                "kind": "stream-session", "learner_state": self.learner.state_dict() if self.learner else None,
                **counters, "meta": self.meta, "saved_at": time.time()})
        return save_checkpoint(self.checkpoint_path, {
            "kind": "stream-session", "model_state": self.net.state_dict(),
            "optimizer_state": self.learner.optimizer.state_dict() if self.learner else None,
            **counters, "meta": self.meta, "saved_at": time.time()})

    def resume(self, path: str | Path | None = None, data: dict | None = None) -> dict:
        """Load a session checkpoint (or its loaded ``data``) into this session; later steps up to its
        time are skipped."""
        where = path or self.checkpoint_path
        if data is None:
            data = load_array_checkpoint(where) if self.arrays else load_checkpoint(where)
        if data.get("kind") != "stream-session":
            raise ValueError(f"{where} is not a stream-session checkpoint")
        if self.arrays:
            if (data.get("learner_state") is None) != (self.learner is None):
                raise ValueError(f"{where} was written by a session that {'did not learn' if self.learner else 'learned'}")
            if self.learner is not None:
                self.learner.load_state_dict(data["learner_state"])
        else:
            try:
                self.net.load_state_dict(data["model_state"])
            except RuntimeError as err:
                raise ValueError(f"the checkpoint does not fit this model: {str(err).splitlines()[0]}") from err
            if self.learner is not None and data["optimizer_state"] is not None:
                self.learner.optimizer.load_state_dict(data["optimizer_state"])
        if self.learner is not None:
            for k, v in (data.get("learner_stats") or {}).items():
                setattr(self.learner.stats, k, v)
        for k, v in data["session"].items():
            setattr(self.stats, k, v)
        if not self.arrays:
            import torch
            torch.set_rng_state(data["rng_state"])  # the same dropout masks as an uninterrupted run
        self._resume_after_us = self.stats.t_us
        return data
