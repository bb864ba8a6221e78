"""Exact resume: a run interrupted after a checkpoint and resumed equals the uninterrupted run
(`stoprt train`), and `stoprt stream` resumes from a consistent point without redoing work."""

import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from stoprt.cli import main
from stoprt.runtime import train as train_mod
from stoprt.runtime.checkpoint import load_checkpoint
from stoprt.runtime.train import TrainConfig

TIMING = {"seconds", "steps_per_s", "peak_rss_mib"}  # differ between any two runs


class _Killed(Exception):
    pass


def _cfg(out, **kw):
    base = dict(model="mlp", data="digits", epochs=2, batch_size=8, n_train=48, n_test=16, T=4, size=16,
                checkpoint_every=2, out_dir=str(out), progress=False)
    return TrainConfig(**{**base, **kw})


def _rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _same(a, b, where=""):
    """Tensors equal bit for bit, other values equal, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


@pytest.mark.parametrize("kill_after_save", [2, 6])  # mid-epoch 1 (batch 4 of 6); mid-epoch 2 (batch 2)
def test_train_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, kill_after_save):
    torch.set_num_threads(1)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_mod.train(_cfg(full))
    real_save, saves = train_mod.save_checkpoint, []  # a kill right after a checkpoint lands

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        saves.append(1)
        if len(saves) == kill_after_save:
            raise _Killed

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_mod.train(_cfg(cut))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    mid = load_checkpoint(cut / "checkpoint.pt")
    assert mid["position"] is not None and mid["position"]["batch"] in (2, 4)  # a mid-epoch checkpoint
    train_mod.train(_cfg(cut), resume=str(cut / "checkpoint.pt"))
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    for key in ("model_state", "optimizer_state", "stats", "epoch", "rng"):
        _same(a[key], b[key], key)
    assert _rows(full) == _rows(cut) and len(_rows(cut)) == 2


# ---- stoprt stream ------------------------------------------------------------------------------------
PERIOD = 330_000


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """Eight emulated digits back to back in one .bin recording, with their labels CSV."""
    from stoprt.runtime.datasets import emulated_digits
    from stoprt.runtime.formats import write_events
    root = tmp_path_factory.mktemp("rec")
    recordings, labels = emulated_digits(n_samples=8, seed=5)
    parts = []
    for k, ev in enumerate(recordings):
        ev = ev.copy()
        ev["t"] += k * PERIOD
        parts.append(ev)
    write_events(root / "digits.bin", np.concatenate(parts))
    (root / "labels.csv").write_text("class,start_us,end_us\n" + "".join(
        f"{int(c) + 1},{k * PERIOD},{k * PERIOD + 300_000}\n" for k, c in enumerate(labels)))
    return root


def _stream(rec, out, *extra):
    return ["stream", "--source", str(rec / "digits.bin"), "--labels", str(rec / "labels.csv"), "--learn",
            "--sensor-width", "34", "--sensor-height", "34", "--size", "8", "--classes", "10", "--dt-us", "20000",
            "--threads", "1", "--quiet", "--checkpoint", str(out), "--checkpoint-every", "100",
            "--json", str(out / "summary.json"), *extra]


def test_repeated_stops_make_progress_by_seeking_and_end_exact(recording, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_stream(recording, full)) == 0
    total = json.loads((full / "summary.json").read_text())
    assert main(_stream(recording, cut, "--max-steps", "40")) == 0
    done = [load_checkpoint(cut / "session.pt")["session"]["steps"]]
    for _ in range(2):  # two more stops: each continues where the last checkpoint is
        assert main(_stream(recording, cut, "--max-steps", "40", "--resume")) == 0
        done.append(load_checkpoint(cut / "session.pt")["session"]["steps"])
        s = json.loads((cut / "summary.json").read_text())
        assert s["pipeline"]["source"]["seek_skipped_events"] > 0  # the past is not binned again
        assert s["pipeline"]["binner"]["events_in"] < total["pipeline"]["binner"]["events_in"]
        # The rate counts this process's steps only (the stream may end before --max-steps).
        assert s["steps_per_s"] * s["seconds"] == pytest.approx(s["steps"] - done[-2], abs=0.01)
    assert all(b > a for a, b in zip(done, done[1:])), done
    assert main(_stream(recording, cut, "--resume")) == 0
    a, b = load_checkpoint(full / "session.pt"), load_checkpoint(cut / "session.pt")
    assert b["session"]["skipped_steps"] == 0
    for key in ("steps", "samples", "labelled_samples", "updates", "correct", "t_us"):
        assert a["session"][key] == b["session"][key], key
    assert a["session"]["updates"] == 8
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k


def test_resume_with_another_source_or_settings_is_refused_unless_forced(recording, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_stream(recording, out, "--max-steps", "30")) == 0
    capsys.readouterr()
    argv = _stream(recording, out, "--max-steps", "30", "--resume")
    argv[argv.index("--dt-us") + 1] = "10000"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dt-us 20000 (now 10000)" in err[0] and "--force" in err[0]
    other = [*argv[:argv.index("--dt-us")], "--dt-us", "20000", *argv[argv.index("--dt-us") + 2:]]
    other[other.index("--source") + 1] = "builtin:digits:2"
    assert main(other) == 2 and "--source" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_stale_temporaries_of_killed_writes_are_removed_and_only_ours(recording, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    ours, theirs = out / ".session.pt.k2j4x_9a.tmp", [out / ".notes.txt.abcdefgh.tmp", out / "session.pt.tmp"]
    for p in (ours, *theirs):
        p.write_bytes(b"partial")
    assert main(_stream(recording, out, "--max-steps", "5")) == 0
    assert not ours.exists() and all(p.exists() for p in theirs)


def test_sigint_mid_sample_learns_no_sample_twice(recording, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_stream(recording, full)) == 0
    # Paced by its timestamps (2.6 s whatever the machine's speed), with a queue that drops nothing.
    cmd = [sys.executable, "-m", "stoprt.cli", *_stream(recording, cut, "--realtime", "--queue", "100000")]
    cmd[cmd.index("--checkpoint-every") + 1] = "1"
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (cut / "session.pt").is_file() and load_checkpoint(cut / "session.pt")["session"]["samples"] >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130  # stopped by the signal, mid-stream
    assert load_checkpoint(cut / "session.pt")["session"]["updates"] < 8
    assert main(_stream(recording, cut, "--resume")) == 0
    a, b = load_checkpoint(full / "session.pt"), load_checkpoint(cut / "session.pt")
    assert b["session"]["updates"] == a["session"]["updates"] == 8
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
