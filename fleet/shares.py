"""Non-IID shares of the built-in digits for fleet tests and benchmarks, and held-out evaluation.

The 1,797 emulated DVS digits (:func:`stoprt.runtime.stream.builtin.recordings`) are split once: the
last :data:`HELD_OUT` are never streamed by any board and measure accuracy over all ten classes; a
board's share draws from the rest, mostly from its own classes plus a few of the others. A share is
written as a real recording (EVT 2.0) with a labels CSV, so a board streams it with ``stoprt stream
--source share.raw --labels share.csv`` like any camera recording.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..runtime.atomic import atomic_path, write_text
from ..runtime.events import EVENT_DTYPE
from ..runtime.formats import write_events
from ..runtime.stream.binning import Binner
from ..runtime.stream.builtin import recordings
from ..runtime.stream.labels import LabelTrack
from ..runtime.stream.session import StreamSession

HELD_OUT = 200
SENSOR = (32, 32)


def digit_pool(duration_us: int, n: int = 1000, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """The first ``n`` emulated digits of ``duration_us`` each (cached after the first call; the last
    :data:`HELD_OUT` of them are held out)."""
    events, bounds, labels = recordings("digits", n, SENSOR, duration_us, seed)
    return np.split(events, bounds[1:-1]), labels


def share_indices(labels: np.ndarray, classes: list[int], n: int, others: float, seed: int) -> np.ndarray:
    """``n`` indices into the streamable pool: a fraction ``others`` from classes outside ``classes``,
    the rest from ``classes``, shuffled."""
    pool = np.arange(len(labels) - HELD_OUT)
    rng = np.random.default_rng(seed)
    mine = pool[np.isin(labels[pool], classes)]
    rest = pool[~np.isin(labels[pool], classes)]
    k = int(round(n * others))
    if n - k > len(mine) or k > len(rest):
        raise ValueError(f"a share of {n} with {others:.0%} others does not fit the pool")
    picked = np.concatenate([rng.choice(mine, n - k, replace=False), rng.choice(rest, k, replace=False)])
    return rng.permutation(picked)


def lay_out(events: list[np.ndarray], labels: np.ndarray, indices, gap_us: int) -> tuple[np.ndarray, LabelTrack]:
    """The recordings ``indices`` end to end with ``gap_us`` of silence between them, and their labels."""
    period = max(int(e["t"].max()) + 1 for e in events[:50]) + gap_us
    parts, track = [], LabelTrack()
    for k, i in enumerate(indices):
        ev = events[i].copy()
        start = k * period
        ev["t"] += start
        parts.append(ev)
        track.add(start, start + period - gap_us, int(labels[i]))
    return (np.concatenate(parts) if parts else np.zeros(0, EVENT_DTYPE)), track


def write_share(folder: str | os.PathLike, name: str, events, labels, indices, gap_us: int) -> tuple[Path, Path]:
    """``NAME.raw`` (EVT 2.0, 32x32) and ``NAME.csv`` (class,start_us,end_us with classes from 1)."""
    stream, track = lay_out(events, labels, indices, gap_us)
    raw, csv = Path(folder) / f"{name}.raw", Path(folder) / f"{name}.csv"
    with atomic_path(raw) as tmp:
        write_events(tmp, stream, format="evt2", width=SENSOR[0], height=SENSOR[1])
    write_text(csv, "class,start_us,end_us\n" + "".join(f"{s.label + 1},{s.start_us},{s.end_us}\n"
                                                          for s in track.segments))
    return raw, csv


def stream_steps(events: np.ndarray, size: int, dt_us: int):
    """The steps ``stoprt stream`` makes of a recording (time bins of ``dt_us`` from 0, ``size``)."""
    binner = Binner(SENSOR, out_size=(size, size), dt_us=dt_us, t_start=0)
    return binner.push(events) + binner.flush()


def evaluate(net: nn.Module, steps, track: LabelTrack) -> float:
    """Accuracy of ``net`` (not learning) on the labelled samples of ``steps``."""
    was_training = net.training
    net.eval()
    session = StreamSession(net, None, labels=LabelTrack(track.segments))
    with torch.no_grad():
        for step in steps:
            session.process(step.frame, step.t_start, step.t_end)
        session.finish()
    net.train(was_training)
    return float(session.stats.accuracy or 0.0)


class LoneBoard:
    """A board learning its share without the fleet, as ``stoprt stream --learn`` does (STOP, Adam at
    ``lr``, an update per sample): the local-only baseline, advanced sample by sample."""

    def __init__(self, net: nn.Module, steps, track: LabelTrack, lr: float) -> None:
        from ..runtime.stop import STOP
        self.net = net
        learner = STOP(net, torch.optim.Adam(net.parameters(), lr=lr), update="sample")
        self.session = StreamSession(net, learner, labels=LabelTrack(track.segments))
        self._steps = iter(steps)

    def learn_until(self, labelled: int) -> nn.Module:
        """The network once it has learned ``labelled`` labelled samples (or the whole share)."""
        while self.session.stats.labelled_samples < labelled:
            step = next(self._steps, None)
            if step is None:
                break
            self.session.process(step.frame, step.t_start, step.t_end)
        return self.net


def learn_alone(net: nn.Module, steps, track: LabelTrack, labelled: int, lr: float) -> nn.Module:
    """``net`` after learning the first ``labelled`` labelled samples of ``steps`` alone (:class:`LoneBoard`)."""
    return LoneBoard(net, steps, track, lr).learn_until(labelled)
