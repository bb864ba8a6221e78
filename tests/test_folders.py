"""Dataset folders: DVS128 Gesture, N-MNIST and class folders, on small datasets written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stoprt.cli import main
from stoprt.runtime.events import EVENT_DTYPE, events_to_frames
from stoprt.runtime.folders import (DVSGestureFolder, EventFolder, NMNISTFolder, detect_layout, load_folder,
                                    read_gesture_labels)
from stoprt.runtime.formats import AEDAT3Writer, EventFormatError, NMNISTWriter

HEADER = "class,startTime_usec,endTime_usec\n"


def events(n: int, t0: int, t1: int, w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(t0, t1, n))
    ev["x"], ev["y"], ev["p"] = rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n)
    return ev


def make_gestures(folder: Path) -> dict[str, np.ndarray]:
    """Three recordings (subjects 1 and 2 train, 24 test), each with labelled segments."""
    folder.mkdir(parents=True, exist_ok=True)
    recordings = {}
    specs = {"user01_fluorescent": [(1, 100_000, 400_000), (11, 500_000, 800_000)],
             "user02_led": [(5, 50_000, 250_000)],
             "user24_natural": [(3, 0, 300_000), (7, 350_000, 600_000)]}
    for i, (name, segments) in enumerate(specs.items()):
        ev = events(6000, 0, 900_000, 128, 128, seed=i)
        with AEDAT3Writer(folder / f"{name}.aedat", packet_events=512) as writer:
            writer.write(ev)
        (folder / f"{name}_labels.csv").write_text(HEADER + "".join(f"{c},{s},{e}\n" for c, s, e in segments))
        recordings[name] = ev
    return recordings


def test_dvs_gesture_segments_split_by_subject_and_bin_lazily(tmp_path):
    recordings = make_gestures(tmp_path / "DvsGesture")
    assert detect_layout(tmp_path) == "dvs_gesture"
    train = load_folder(tmp_path, "train", T=5, size=32)
    test = load_folder(tmp_path, "test", T=5, size=32)
    assert isinstance(train, DVSGestureFolder) and (len(train), len(test)) == (3, 2)
    assert [s.label for s in train.files] == [0, 10, 4] and [s.label for s in test.files] == [2, 6]
    assert train.num_classes == 11 and train.input_shape == (2, 32, 32) and train.class_names[0] == "hand_clap"
    frames, label = train[1]
    ev = recordings["user01_fluorescent"]
    ref = events_to_frames(ev, (128, 128), 5, out_size=32, t_start=500_000, t_end=800_000)
    assert label == 10 and frames.dtype == torch.float32 and torch.equal(frames, ref)
    assert float(frames.sum()) == int(((ev["t"] >= 500_000) & (ev["t"] < 800_000)).sum())


def test_dvs_gesture_indexes_only_the_csv_files(tmp_path):
    make_gestures(tmp_path)
    (tmp_path / "user01_fluorescent.aedat").write_bytes(b"#!AER-DAT3.1\r\nnot a real header")
    data = DVSGestureFolder(tmp_path, "train", T=4, size=16)  # builds without opening a recording
    assert len(data) == 3
    with pytest.raises(EventFormatError):
        data[0]
    assert data[2][1] == 4  # the other recordings still read


@pytest.mark.parametrize("content, problem", [
    ("class,start,end\n1,0,10\n", "the header must be 'class,startTime_usec,endTime_usec'"),
    (HEADER + "12,0,10\n", "line 2: class 12 is outside 1..11"),
    (HEADER + "1,50,10\n", "line 2: the segment"),
    (HEADER + "1,abc,10\n", "line 2: expected three integers"),
    ("", "an empty file"),
])
def test_bad_gesture_labels_are_named(tmp_path, content, problem):
    path = tmp_path / "user01_led_labels.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as err:
        read_gesture_labels(path)
    assert str(path) in str(err.value)


def test_gesture_folder_errors(tmp_path):
    make_gestures(tmp_path)
    (tmp_path / "user02_led_labels.csv").unlink()
    with pytest.raises(ValueError, match="no labels file user02_led_labels.csv"):
        DVSGestureFolder(tmp_path, "train")
    with pytest.raises(ValueError, match="splits are 'train'"):
        DVSGestureFolder(tmp_path, "val")
    with pytest.raises(ValueError, match="no DVS Gesture recordings"):
        DVSGestureFolder(tmp_path / "nowhere")


def make_nmnist(root: Path) -> dict[tuple[str, str], np.ndarray]:
    written = {}
    for split, digits in (("Train", (3, 7)), ("Test", (3,))):
        for d in digits:
            for k in range(2):
                folder = root / split / str(d)
                folder.mkdir(parents=True, exist_ok=True)
                ev = events(500, 0, 300_000, 34, 34, seed=10 * d + k)
                with NMNISTWriter(folder / f"{k:05d}.bin") as writer:
                    writer.write(ev)
                written[(split, f"{d}/{k:05d}")] = ev
    return written


def test_nmnist_labels_are_digits(tmp_path):
    written = make_nmnist(tmp_path)
    assert detect_layout(tmp_path) == "nmnist"
    train = load_folder(tmp_path, "train", T=3, size=17)
    assert isinstance(train, NMNISTFolder) and train.sensor_size == (34, 34) and train.num_classes == 10
    assert [label for _, label in train.files] == [3, 3, 7, 7]
    frames, label = train[2]
    ref = events_to_frames(written[("Train", "7/00000")], (34, 34), 3, out_size=17)
    assert label == 7 and torch.equal(frames, ref)
    assert len(load_folder(tmp_path, "test")) == 2


def test_class_folders_still_load(tmp_path):
    for split in ("train", "test"):
        for name in ("ball", "cup"):
            (tmp_path / split / name).mkdir(parents=True)
            with AEDAT3Writer(tmp_path / split / name / "a.aedat", width=64, height=64) as writer:
                writer.write(events(300, 0, 100_000, 64, 64, seed=len(name)))
    assert detect_layout(tmp_path) == "classes"
    data = load_folder(tmp_path, "train", T=4, size=8)
    assert isinstance(data, EventFolder) and data.class_names == ("ball", "cup") and data.sensor_size == (64, 64)
    frames, label = data[1]
    assert frames.shape == (4, 2, 8, 8) and label == 1 and float(frames.sum()) == 300
    with pytest.raises(ValueError, match="unknown dataset layout"):
        load_folder(tmp_path, layout="imagenet")


def test_train_cli_learns_from_a_gesture_folder(tmp_path, capsys):
    make_gestures(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "data"), "--model", "mlp", "--epochs", "1", "--T", "4", "--size", "16",
            "--batch-size", "2", "--quiet", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    assert "epoch 1:" in capsys.readouterr().out and (out / "checkpoint.pt").exists()
