"""Every failure of the CLI is one line on stderr with exit code 2 (130 for Ctrl-C), never a traceback
(issue 10, defects 6 and 7)."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from stoprt import cli
from stoprt.cli import main
from stoprt.cli_args import int_list, positive_float, positive_int, torch_device

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA; CUDA is here")
TINY = ["--model", "mlp", "--size", "8", "--T", "2", "--n-train", "8", "--n-test", "4", "--batch-size", "4",
        "--epochs", "1", "--quiet", "--threads", "1"]


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of an in-process ``stoprt`` call (the parser exits by SystemExit)."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real `stoprt train` checkpoint (soft-reset LIF neurons, as every trained model has)."""
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out / "checkpoint.pt"


BAD_ARGS = [
    (["stream", "--source", "builtin:digits:2", "--size", "-16"], "--size"),
    (["train", "--n-train", "0"], "--n-train"),
    (["train", "--width", "0"], "--width"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--T", "0"], "--T"),
    (["demo", "--passes", "0"], "--passes"),
    (["plan", "--model", "mlp", "--size", "0"], "--size"),
    (["plan", "--model", "mlp", "--width", "-1"], "--width"),
    (["plan", "--model", "mlp", "--batch", "0"], "--batch"),
    (["profile", "--model", "mlp", "--T", "10,0"], "--T"),
    (["profile", "--model", "mlp", "--batch", "-2"], "--batch"),
    (["export", "x.pt", "--to", "tensorrt", "x.engine", "--workspace-mib", "0"], "--workspace-mib"),
    (["import", "x.nir", "--from", "nir", "--out", "y.pt", "--dt", "-1e-4"], "--dt"),
    (["import", "x.pt", "--from", "snntorch", "--out", "y.pt", "--input-shape", "2", "0", "8"], "--input-shape"),
]


@pytest.mark.parametrize("argv,name", BAD_ARGS, ids=[" ".join(a[:1] + [n]) for a, n in BAD_ARGS])
def test_argument_ranges_are_checked_at_parse_time(argv, name, capsys):
    assert_one_line(*run(argv, capsys), f"argument {name}")


@NO_CUDA
@pytest.mark.parametrize("command", [["stream", "--source", "builtin:digits:2"], ["train"], ["demo"],
                                     ["profile", "--model", "mlp"]])
def test_cuda_device_without_cuda(command, capsys):
    assert_one_line(*run([*command, "--device", "cuda"], capsys), "CUDA is not available")


def test_argument_types():
    assert positive_int("3") == 3 and int_list()("1, 2,3") == [1, 2, 3] and positive_float("0.5") == 0.5
    for parse, text in ((positive_int, "0"), (positive_int, "1.5"), (positive_float, "inf"), (positive_float, "0"),
                        (int_list(), ","), (torch_device, "gpu"), (torch_device, "cuda:x")):
        with pytest.raises(Exception, match="expected"):
            parse(text)
    assert torch_device("cpu") == "cpu"


def test_export_to_an_existing_directory(checkpoint, tmp_path, capsys):
    assert_one_line(*run(["export", str(checkpoint), "--to", "onnx", str(tmp_path)], capsys), "is a directory")


@pytest.mark.skipif(importlib.util.find_spec("nir") is None, reason="the nir package is not installed")
def test_nir_export_of_a_trained_model_needs_and_takes_the_flag(checkpoint, tmp_path, capsys):
    import nir
    out = tmp_path / "m.nir"
    assert_one_line(*run(["export", str(checkpoint), "--to", "nir", str(out)], capsys), "--allow-reset-change")
    assert not out.exists()
    rc, err = run(["export", str(checkpoint), "--to", "nir", str(out), "--allow-reset-change"], capsys)
    assert rc == 0, err
    graph = nir.read(out)
    lifs = [n for n in graph.nodes.values() if isinstance(n, nir.LIF)]
    assert len(lifs) == 2 and all((n.v_reset == 0).all() for n in lifs)
    assert_one_line(*run(["export", str(checkpoint), "--to", "onnx", str(tmp_path / "m.onnx"),
                          "--allow-reset-change"], capsys), "does not apply to --to onnx")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_backend_without_tensorrt(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), "--to", "bundle", str(tmp_path / "b"), "--no-onnx"]) == 0
    capsys.readouterr()
    rc, err = run(["stream", "--source", "builtin:digits:2", "--model", str(tmp_path / "b"),
                   "--backend", "tensorrt", "--quiet"], capsys)
    assert_one_line(rc, err, "TensorRT is not installed")


@pytest.mark.parametrize("content,needle", [
    (b"class,start,end\n1,0,1000\n\xff\xfe2,0,10\n", ":3: not UTF-8"),
    (b"class,start,end\n1,0,1000\n1.5,10,20\n", ":3: expected integers"),
    (b"1,0,1000\n2,abc,20\n", ":2: expected integers"),
    (b"class,start,end\n", "no label rows"),
])
def test_bad_labels_files_name_the_file_and_line(content, needle, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    rc, err = run(["stream", "--source", "builtin:digits:2", "--labels", str(labels), "--learn", "--quiet"], capsys)
    assert_one_line(rc, err, f"{labels}{needle}" if needle.startswith(":") else needle)


def test_labels_that_match_no_step_warn(tmp_path, capsys):
    labels = tmp_path / "relative.csv"
    labels.write_text("class,start,end\n1,900000000000,900000001000\n")
    rc, err = run(["stream", "--source", "builtin:digits:2", "--labels", str(labels), "--learn", "--max-steps", "6",
                   "--size", "8", "--quiet", "--threads", "1"], capsys)
    assert rc == 0, err
    assert "warning: --learn made no update: no step fell inside any of the 1 label segments" in err


def test_main_maps_errors_in_one_place(monkeypatch, capsys):
    def failing(exc):
        def run_it(args):
            raise exc
        return run_it
    parser = cli.build_parser()
    info = next(a for a in parser._actions if a.dest == "command").choices["info"]
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for exc, code in ((ValueError("bad\ninput"), 2), (FileNotFoundError(2, "No such file", "x"), 2),
                      (ImportError("no backend"), 2), (KeyboardInterrupt(), 130)):
        info.set_defaults(func=failing(exc))
        rc, err = run(["info"], capsys)
        assert rc == code and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    info.set_defaults(func=failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not bad input: the traceback stays
        main(["info"])


# Runs stoprt's CLI and sends itself SIGINT when torch's import begins: the signal lands at start-up,
# inside an import, whatever the machine's speed (a sleep before an outside kill raced fast start-ups).
SIGINT_AT_TORCH_IMPORT = """
import os, signal, sys
class InterruptAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, InterruptAtTorch())
from stoprt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["train", *TINY], ["stream", "--source", "builtin:digits:50"]])
def test_ctrl_c_during_startup_is_one_line_and_exit_130(command):
    proc = subprocess.run([sys.executable, "-c", SIGINT_AT_TORCH_IMPORT, *command], capture_output=True, text=True,
                          timeout=120)
    err = proc.stderr
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"stoprt {command[0]}: interrupted"] or \
        err.strip().splitlines() == ["stoprt: interrupted"], err
