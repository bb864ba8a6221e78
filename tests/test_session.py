"""The stream session: samples from windows or labels, in-situ learning, late labels, checkpoints."""

import copy
import os
import signal
from collections import namedtuple

import pytest
import torch

from stoprt.runtime import layers as L, models
from stoprt.runtime.checkpoint import load_checkpoint
from stoprt.runtime.stream.labels import LabelTrack, Segment
from stoprt.runtime.stream.session import StreamSession
from stoprt.runtime.stop import STOP

Step = namedtuple("Step", "frame t_start t_end")
DT = 1000


def _steps(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Step((torch.rand(2, 8, 8, generator=g) < 0.3).float() * 2, i * DT, (i + 1) * DT) for i in range(n)]


def _session(tmp_path=None, labels=None, **kw):
    torch.manual_seed(0)
    net = models.mlp(in_channels=2, size=8, classes=3, hidden=(16,))
    learner = STOP(net, torch.optim.Adam(net.parameters(), lr=1e-2))
    return StreamSession(net, learner, labels=labels, checkpoint_dir=tmp_path, **kw)


def _labels(n_segments, length=5, gap=2):
    # Segments of `length` steps separated by `gap` unlabelled steps; labels cycle 0, 1, 2.
    period = length + gap
    return LabelTrack(Segment(k * period * DT, (k * period + length) * DT, k % 3) for k in range(n_segments))


def _class_steps(track, n, seed=0):
    """A learnable stream: a labelled step shows its class's fixed pattern (80% of its pixels) plus 5% noise;
    an unlabelled step shows noise only."""
    g = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(3, 2, 8, 8, generator=g) < 0.3).float()
    steps = []
    for i in range(n):
        segment = track.at(i * DT)
        shown = patterns[segment.label] * (torch.rand(2, 8, 8, generator=g) < 0.8) if segment else 0.0
        noise = (torch.rand(2, 8, 8, generator=g) < 0.05).float()
        steps.append(Step(torch.clamp(shown + noise, 0, 1) * 2, i * DT, (i + 1) * DT))
    return steps


@pytest.mark.parametrize("mode", ["static", "eager"])
def test_predictions_read_from_the_learner_equal_the_sessions_own_sums(mode):
    """The session reads a learner's summed outputs rather than summing them again; with a learner
    that keeps none (here: one hiding them) it sums itself. Predictions and scores agree exactly."""
    class Hiding:  # a learner without output_sum
        def __init__(self, learner):
            self._l = learner
            self.net, self.stats, self.update = learner.net, learner.stats, learner.update
            self.optimizer = learner.optimizer

        def step(self, x, target=None):
            return self._l.step(x, target)

        def end_sample(self):
            return self._l.end_sample()

    windows = {}
    for hide in (False, True):
        torch.manual_seed(4)
        net = models.mlp(in_channels=2, size=8, classes=3, hidden=(16,), readout=True)  # graded outputs
        learner = STOP(net, torch.optim.Adam(net.parameters(), lr=1e-2), compile=mode)
        seen = []
        session = StreamSession(net, Hiding(learner) if hide else learner, labels=_labels(6),
                                on_prediction=seen.append)
        assert session._sums == hide
        running = [session.process(s.frame, s.t_start, s.t_end) for s in _class_steps(_labels(6), 40)]
        session.finish()
        windows[hide] = (running, [(w.prediction, w.score) for w in seen])
    assert windows[False] == windows[True] and len(windows[False][1]) >= 6


def test_a_learner_over_another_network_is_refused():
    """Checkpoints hold the session's network: with a learner over a copy of it they kept none of what
    was learned, silently."""
    torch.manual_seed(0)
    net = models.mlp(in_channels=2, size=8, classes=3, hidden=(16,))
    other = copy.deepcopy(net)
    learner = STOP(other, torch.optim.Adam(other.parameters(), lr=1e-2))
    with pytest.raises(ValueError, match=r"another network than the session's.*StreamSession\(learner.net"):
        StreamSession(net, learner)
    assert StreamSession(other, learner).learner is learner


def test_label_lookups_follow_segments_added_and_pruned_between_them():
    """``at`` answers from its last hit while that holds; against a plain scan of the segments (the
    latest start at or before t wins, if t is before its end) over overlapping segments, with
    segments added and pruned between lookups."""
    import random

    def scan(segments, t):
        best = None
        for seg in segments:
            if seg.start_us <= t and (best is None or seg.start_us >= best.start_us):
                best = seg
        return best if best is not None and t < best.end_us else None

    track = LabelTrack([Segment(0, 100, 1)])
    assert track.at(10).label == 1
    track.add(50, 80, 2)  # inside the remembered hit: from 50 to 80 the later start wins
    assert track.at(60).label == 2 and track.at(90) is None
    track.prune(85)
    assert track.at(60).label == 1

    rng = random.Random(0)
    track, segments = LabelTrack(), []
    for _ in range(2000):
        roll = rng.random()
        if roll < 0.05:
            start = rng.randrange(0, 1000)
            segments.append(track.add(start, start + rng.randrange(1, 200), rng.randrange(3)))
        elif roll < 0.07:
            before = rng.randrange(0, 1000)
            track.prune(before)
            segments = [s for s in segments if s.end_us > before]
        else:
            t = rng.randrange(0, 1200)
            for u in (t, t + 1, t + 7):  # nearby lookups: the ones a stream makes
                assert track.at(u) == scan(segments, u), (u, segments)


def test_windows_without_labels_predict_per_window():
    torch.manual_seed(4)  # an untrained net whose prediction differs between the windows below
    net = models.mlp(in_channels=2, size=8, classes=3, hidden=(16,), readout=True)  # graded outputs: no ties
    reference = copy.deepcopy(net)
    s = StreamSession(net, STOP(net, torch.optim.Adam(net.parameters(), lr=1e-2)), window=4)
    steps = _class_steps(LabelTrack(Segment(4 * w * DT, 4 * (w + 1) * DT, w % 3) for w in range(5)), 20)
    seen = {}
    stats = s.run(steps, on_step=lambda sess: seen.setdefault(sess.stats.samples, sess.stats.last_prediction))
    assert stats.samples == 5 and stats.steps == 20 and stats.labelled_samples == 0 and stats.updates == 0
    predictions = [seen[k] for k in range(1, 5)] + [stats.last_prediction]
    expected = []
    for w in range(5):  # each window from a fresh state, outputs summed, argmax
        L.reset_state(reference)
        with torch.no_grad():
            expected.append(int(sum(reference(st.frame.unsqueeze(0)) for st in steps[4 * w:4 * w + 4]).argmax(1)))
    assert predictions == expected and len(set(expected)) > 1, (predictions, expected)


def test_labelled_segments_learn_and_gaps_only_predict():
    s = _session(labels=_labels(4))
    before = [p.detach().clone() for p in s.net.parameters()]
    stats = s.run(_steps(28))
    assert stats.labelled_samples == 4 and stats.updates == 4
    assert stats.samples == 8  # 4 labelled segments + 4 unlabelled gaps
    assert any(not torch.equal(a, b) for a, b in zip(before, s.net.parameters()))


def test_in_situ_learning_beats_chance_on_a_learnable_stream():
    track = _labels(24)
    s = _session(labels=track)
    halfway = []
    stats = s.run(_class_steps(_labels(24), 24 * 7),
                  on_step=lambda sess: sess.stats.labelled_samples == 12 and halfway.append(sess.stats.correct))
    later = (stats.correct - halfway[0]) / 12  # accuracy on the last 12 segments, predicted before each update
    assert stats.labelled_samples == 24 and stats.accuracy == stats.correct / 24
    assert later >= 0.75, later  # chance is 1/3


def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path):
    steps = _steps(42)
    full = _session(tmp_path / "a", labels=_labels(6), checkpoint_every=2)
    full.run(steps)
    crashed = _session(tmp_path / "b", labels=_labels(6), checkpoint_every=2)
    for st in steps[:25]:  # the process dies here: no finish(), only periodic checkpoints survive
        crashed.process(st.frame, st.t_start, st.t_end)
    resumed = _session(tmp_path / "b", labels=_labels(6), checkpoint_every=2)
    info = resumed.resume()
    assert info["session"]["samples"] == 6 and 0 < resumed.stats.t_us < steps[25].t_end
    resumed.run(steps)
    assert resumed.stats.skipped_steps > 0
    for (name, a), b in zip(full.net.named_parameters(), resumed.net.parameters()):
        assert torch.equal(a, b), name
    assert resumed.stats.updates == full.stats.updates and resumed.stats.correct == full.stats.correct


def test_a_late_label_replays_the_sample_like_an_in_time_label():
    steps = _steps(6)
    in_time = _session(labels=LabelTrack([Segment(0, 5 * DT, 2)]))
    in_time.run(steps[:5])
    late = _session(labels=LabelTrack(), late_label_steps=10)
    late.run(steps[:5])
    assert late.stats.updates == 0
    assert late.add_label(0, 5 * DT, 2) is True
    assert late.stats.updates == 1 and late.stats.replayed_samples == 1
    for a, b in zip(in_time.net.parameters(), late.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def _signalled_at(steps, i_signal, sig=signal.SIGTERM):
    for i, st in enumerate(steps):
        if i == i_signal:
            os.kill(os.getpid(), sig)
        yield st


def test_sigterm_stops_and_checkpoints_at_the_last_sample_boundary(tmp_path):
    s = _session(tmp_path, window=5)
    stats = s.run(_signalled_at(_steps(100), 12))
    # Steps 10..12 began a third sample: it is neither learned nor counted, and the checkpoint is the
    # state at its start, so that a resume runs it once, whole.
    assert s.interrupted and stats.steps == 13 and stats.samples == 2
    saved = load_checkpoint(tmp_path / "session.pt")["session"]
    assert saved["steps"] == 10 and saved["t_us"] == 10 * DT and saved["samples"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("i_signal", [9, 14, 16, 33])  # mid-sample, at a sample start, in a gap
def test_a_signal_mid_sample_then_resume_learns_each_sample_once(tmp_path, i_signal):
    steps = _steps(60)
    full = _session(labels=_labels(8))
    full.run(steps)
    cut = _session(tmp_path, labels=_labels(8))
    cut.run(_signalled_at(steps, i_signal, signal.SIGINT))
    resumed = _session(tmp_path, labels=_labels(8))
    resumed.resume()
    resumed.run(s for s in steps if s.t_start >= resumed.stats.t_us)  # the source starts at the checkpoint
    assert resumed.stats.skipped_steps == 0
    assert resumed.stats.updates == full.stats.updates == 8
    assert resumed.stats.samples == full.stats.samples and resumed.stats.steps == full.stats.steps
    for a, b in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)


def test_state_stays_bounded_and_old_labels_are_forgotten():
    track = _labels(300, length=3, gap=1)
    s = _session(labels=track)
    s.run(_steps(40))
    size = sum(t.numel() for t in L.state_tensors(s.net))
    s.run(_steps(1200)[40:])
    assert sum(t.numel() for t in L.state_tensors(s.net)) <= size
    assert len(track.segments) < 5


def test_label_csv_and_errors(tmp_path):
    path = tmp_path / "user01_lab_labels.csv"
    path.write_text("class,startTime_usec,endTime_usec\n1,100,200\n11,300,450\n")
    track = LabelTrack.from_csv(path)
    assert track.at(150).label == 0 and track.at(449).label == 10 and track.at(250) is None
    with pytest.raises(ValueError, match="end > start"):
        track.add(5, 5, 1)
    with pytest.raises(ValueError, match="window"):
        _session(window=0)
