"""Exact resume: a run interrupted after a checkpoint and resumed equals the uninterrupted run
(`stoprt train`), and `stoprt stream` resumes from a consistent point without redoing work."""

import csv

import pytest
import torch

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
    real_save, calls = train_mod._save, []

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        calls.append(args[5] if len(args) > 5 else None)
        if len(calls) == kill_after_save:
            raise _Killed

    monkeypatch.setattr(train_mod, "_save", save_then_die)
    with pytest.raises(_Killed):
        train_mod.train(_cfg(cut))
    monkeypatch.setattr(train_mod, "_save", real_save)
    mid = load_checkpoint(cut / "checkpoint.pt")
    assert mid["position"] is not None and mid["position"]["batch"] in (2, 4)  # a mid-epoch checkpoint
    train_mod.train(_cfg(cut), resume=str(cut / "checkpoint.pt"))
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    for key in ("model_state", "optimizer_state", "stats", "epoch", "rng"):
        _same(a[key], b[key], key)
    assert _rows(full) == _rows(cut) and len(_rows(cut)) == 2
