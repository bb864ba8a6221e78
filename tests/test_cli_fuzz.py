"""Fuzz the CLI: random bad arguments and bad files for every subcommand give exit code 2 and one line
on stderr, never a traceback (issue 10, "Done means"). Seeded and bounded: it runs in seconds.

Bad arguments are refused by the parser before anything heavy runs, so most calls are in-process;
a few run as real subprocesses to check what a shell sees.
"""

import random
import subprocess
import sys

import pytest

from stoprt.cli import main

SEED, CALLS = 10, 120

# Each subcommand: the arguments it needs to get past the parser, and its numeric options.
COMMANDS = {
    "demo": ([], ["--T", "--size", "--threads", "--passes", "--lr", "--max-samples"]),
    "train": ([], ["--T", "--size", "--threads", "--lr", "--epochs", "--batch-size", "--width", "--n-train",
                   "--n-test", "--checkpoint-every"]),
    "stream": (["--source", "builtin:digits:2"], ["--classes", "--size", "--window", "--dt-us", "--events-per-step",
                                                  "--sensor-width", "--sensor-height", "--lr", "--late-label-steps",
                                                  "--checkpoint-every", "--max-steps", "--queue", "--threads"]),
    "profile": (["--model", "mlp"], ["--size", "--width", "--channels", "--classes", "--T", "--batch", "--threads",
                                     "--limit-mib", "--timeout"]),
    "plan": (["--model", "mlp"], ["--size", "--width", "--channels", "--classes", "--batch", "--T"]),
    "export": (["model.pt", "--to", "tensorrt", "model.engine"], ["--opset", "--batch", "--workspace-mib"]),
    "import": (["model.nir", "--from", "nir", "--out", "model.pt"], ["--dt", "--input-shape"]),
}
NONNEGATIVE = {"--checkpoint-every", "--late-label-steps"}  # 0 is valid for these
BAD_VALUES = ["0", "-1", "-16", "nan", "inf", "-inf", "abc", "", "1e999", "0x10", "--", "2,0", "½"]
NONNEGATIVE_BAD = ["-1", "-16", "nan", "abc", "", "1.5", "1e999"]
BAD_WORDS = {"--device": ["cuda:99", "gpu", "tpu", ""], "--to": ["onnx2", "pdf"], "--from": ["keras"],
             "--method": ["sgd"], "--mode": ["train"], "--backend": ["cudnn"], "--nope": ["1"]}


def _case(rng: random.Random) -> list[str]:
    command = rng.choice(sorted(COMMANDS))
    needed, numeric = COMMANDS[command]
    argv = [command, *needed]
    if rng.random() < 0.8:
        option = rng.choice(numeric)
        argv += [option, rng.choice(NONNEGATIVE_BAD if option in NONNEGATIVE else BAD_VALUES)]
    else:
        option = rng.choice(sorted(BAD_WORDS))
        argv += [option, rng.choice(BAD_WORDS[option])]
    if rng.random() < 0.3:  # a valid extra option in front does not change the verdict
        argv[1:1] = ["--seed", str(rng.randint(0, 9))] if command in ("demo", "train", "stream") else []
    return argv


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def _check(argv, rc, err) -> None:
    assert rc == 2, (argv, rc, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert err.startswith("stoprt"), (argv, err)


def test_random_bad_arguments_of_every_subcommand(capsys):
    rng = random.Random(SEED)
    cases = [_case(rng) for _ in range(CALLS)]
    assert {c[0] for c in cases} == set(COMMANDS)  # every subcommand is hit
    for argv in cases:
        _check(argv, *_run(argv, capsys))


def _bad_files(tmp_path, rng: random.Random) -> dict[str, object]:
    garbage = bytes(rng.getrandbits(8) for _ in range(4096))
    files = {"garbage.pt": garbage, "empty.pt": b"", "zip.pt": b"PK\x03\x04" + garbage[:200],
             "labels.csv": b"1,0,10\n" + garbage[:64], "spec.json": b"{\"layers\": [", "garbage.nir": garbage,
             "garbage.aedat4": b"#!AER-DAT4.0\r\n" + garbage[:100], "garbage.xyz": garbage}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "adir").mkdir()
    return {name: tmp_path / name for name in [*files, "adir"]}


def test_bad_files_for_every_subcommand(tmp_path, capsys):
    f = {k: str(v) for k, v in _bad_files(tmp_path, random.Random(SEED)).items()}
    out = str(tmp_path / "out")
    cases = [
        ["stream", "--source", "builtin:digits:2", "--model", f["garbage.pt"]],
        ["stream", "--source", "builtin:digits:2", "--model", f["empty.pt"]],
        ["stream", "--source", "builtin:digits:2", "--model", f["adir"]],
        ["stream", "--source", "builtin:digits:2", "--labels", f["labels.csv"], "--learn"],
        ["stream", "--source", "builtin:digits:2", "--labels", f["adir"], "--learn"],
        ["stream", "--source", f["garbage.xyz"]],
        ["stream", "--source", f["garbage.aedat4"], "--sensor-width", "8", "--sensor-height", "8"],
        ["stream", "--source", str(tmp_path / "missing.raw")],
        ["train", "--resume", f["garbage.pt"], "--n-train", "4", "--epochs", "1"],
        ["train", "--data", f["adir"]],
        ["export", f["garbage.pt"], "--to", "onnx", out + ".onnx"],
        ["export", f["zip.pt"], "--to", "bundle", out],
        ["export", f["empty.pt"], "--to", "nir", out + ".nir"],
        ["import", f["garbage.pt"], "--from", "snntorch", "--spec", f["spec.json"], "--out", out + ".pt"],
        ["import", f["garbage.pt"], "--from", "spikingjelly", "--spec", f["garbage.xyz"], "--out", out + ".pt"],
        ["import", f["garbage.nir"], "--from", "nir", "--out", out + ".pt"],
        ["plan", "--model", f["garbage.pt"]],
        ["profile", "--model", f["zip.pt"]],
        ["demo", "--model", "nonsense"],
        ["info", "--root", f["garbage.xyz"]],
    ]
    assert {c[0] for c in cases} == {*COMMANDS, "info"}
    for argv in cases:
        _check(argv, *_run(argv, capsys))


@pytest.mark.parametrize("argv", [["train", "--width", "0"], ["export", "missing.pt", "--to", "onnx", "x.onnx"]])
def test_bad_input_in_a_real_process(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stoprt.cli", *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    _check(argv, proc.returncode, proc.stderr)
