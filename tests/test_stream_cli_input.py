"""`stoprt stream` on damaged or unusual recordings, and what it shows while predicting (issue 10,
defects 5 and 8): exit codes, stderr lines, the --json summary, --predictions files. The CLI runs
in-process (``run_cli``) where a shell would see the same; a killed run and the process's peak RSS
run as real subprocesses."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stoprt.runtime.events import EVENT_DTYPE
from stoprt.runtime.formats import EVT2Writer
from stoprt.runtime.formats.aedat4 import check_available

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dvs"
STREAM = ["stream", "--threads", "1"]
PROCESS = [sys.executable, "-m", "stoprt.cli", *STREAM]  # a real `stoprt stream`


@pytest.fixture
def stream(run_cli):
    """``stoprt stream --threads 1 ARGS`` in this process, as a ``CompletedProcess``."""
    return lambda *args: run_cli(*STREAM, *args)


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {path} is absent (see ../shared/fixtures/dvs/SOURCES.md)")
    return path


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("stoprt stream: warning:")]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-600:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("stoprt stream: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def evt2_file(path: Path, n: int = 3000) -> bytes:
    rng = np.random.default_rng(0)
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, 2_000_000, n))
    ev["x"], ev["y"], ev["p"] = rng.integers(0, 640, n), rng.integers(0, 480, n), rng.integers(0, 2, n)
    with EVT2Writer(path, width=640, height=480) as w:
        w.write(ev)
    return path.read_bytes()


# --------------------------------------------------------------------------- defect 5: bad recordings
def test_garbage_bin_warns_that_most_events_were_dropped(stream, tmp_path: Path) -> None:
    path, out = tmp_path / "garbage.bin", tmp_path / "s.json"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    proc = stream("--source", str(path), "--quiet", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-600:]
    lines = warnings(proc.stderr)
    assert len(lines) == 1 and "of 20,000 events dropped" in lines[0] and str(path) in lines[0]
    assert json.loads(out.read_text())["warnings"] == [lines[0].removeprefix("stoprt stream: warning: ")]


def test_empty_file_is_an_error(stream, tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    assert "no event could be read" in one_error_line(stream("--source", str(path), "--quiet"))


def test_truncated_raw_warns_and_streams_what_it_has(stream, tmp_path: Path) -> None:
    path, out = tmp_path / "cut.raw", tmp_path / "s.json"
    path.write_bytes(evt2_file(path)[:-2])
    proc = stream("--source", str(path), "--quiet", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-600:]
    lines = warnings(proc.stderr)
    assert len(lines) == 1 and "file ends inside a 4-byte record" in lines[0] and "truncated file?" in lines[0]
    summary = json.loads(out.read_text())
    assert summary["steps"] > 10 and summary["pipeline"]["source"]["reader"]["truncated_bytes"] == 2


def test_header_cut_mid_line_is_one_clear_error(stream, tmp_path: Path) -> None:
    path = tmp_path / "cut.raw"
    data = evt2_file(path)
    path.write_bytes(data[: data.index(b";width")])
    line = one_error_line(stream("--source", str(path), "--quiet"))
    assert "file ends inside the text header" in line and "Nonex" not in line


@pytest.mark.skipif(not check_available(), reason="the optional 'aedat' package (stoprt[aedat]) is not installed")
def test_aedat4_missing_its_last_byte_is_reported(stream, tmp_path: Path) -> None:
    path = tmp_path / "short.aedat4"
    path.write_bytes(fixture("sample.aedat4").read_bytes()[:-1])
    proc = stream("--source", str(path), "--quiet")
    assert proc.returncode == 0, proc.stderr[-600:]
    lines = warnings(proc.stderr)
    assert len(lines) == 1 and "file ends inside a data table" in lines[0]


def test_format_option_picks_the_reader(stream, tmp_path: Path) -> None:
    path = tmp_path / "recording.bin"  # an EVT 2.0 file under N-MNIST's extension
    evt2_file(path)
    assert "--format" in one_error_line(stream("--source", str(path), "--quiet"))
    out = tmp_path / "s.json"
    proc = stream("--source", str(path), "--format", "evt2", "--quiet", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-600:]
    summary = json.loads(out.read_text())
    assert summary["steps"] > 10 and summary["pipeline"]["source"]["events"] == 3000
    assert "unknown event format 'evt9'" in one_error_line(stream("--source", str(path), "--format", "evt9"))


def test_nmnist_bin_needs_no_sensor_size_flags(stream, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    proc = stream("--source", str(fixture("sample_nmnist.bin")), "--quiet", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-600:]
    assert not warnings(proc.stderr)
    summary = json.loads(out.read_text())
    assert summary["pipeline"]["source"]["events"] == 4325 and summary["steps"] >= 10


# ------------------------------------------------------------------------ defect 8: predictions shown
def test_inference_prints_and_writes_a_prediction_per_window(stream, tmp_path: Path) -> None:
    out, rows = tmp_path / "s.json", tmp_path / "p.csv"
    proc = stream("--source", str(fixture("sample_nmnist.bin")), "--model", "mlp", "--dt-us", "10000",
                  "--window", "5", "--json", str(out), "--predictions", str(rows))
    assert proc.returncode == 0, proc.stderr[-600:]
    summary = json.loads(out.read_text())
    printed = [line for line in proc.stdout.splitlines() if line.startswith("window ")]
    table = list(csv.DictReader(rows.open()))
    assert summary["samples"] == len(printed) == len(table) == summary["predictions"]["windows"] >= 6
    assert summary["steps"] == sum(int(r["steps"]) for r in table)
    for i, (line, row) in enumerate(zip(printed, table)):
        assert int(row["window"]) == i and int(row["t_start_us"]) < int(row["t_end_us"])
        assert line.endswith(f"class {row['prediction']}")
        assert f"{int(row['t_start_us']) / 1e6:.3f}-{int(row['t_end_us']) / 1e6:.3f} s" in line
    assert int(table[1]["t_start_us"]) == int(table[0]["t_end_us"])  # back to back windows
    assert summary["predictions"]["latest"][-1]["prediction"] == int(table[-1]["prediction"])
    assert summary["predictions"]["counts"] == {
        k: sum(r["prediction"] == k for r in table) for k in {r["prediction"] for r in table}}


def test_predictions_jsonl_with_labels_and_a_killed_run_keeps_its_rows(tmp_path: Path) -> None:
    rows = tmp_path / "p.jsonl"
    proc = subprocess.Popen([*PROCESS, "--source", "builtin:digits:300", "--quiet", "--realtime",
                             "--predictions", str(rows)])
    try:
        deadline = time.time() + 240
        while time.time() < deadline and (not rows.exists() or rows.read_text().count("\n") < 3):
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-stream, not finished
    lines = rows.read_text().splitlines()
    assert len(lines) >= 3
    for i, line in enumerate(lines):  # every row written before the kill is whole
        row = json.loads(line)
        assert row["window"] == i and isinstance(row["prediction"], int) and row["t_start_us"] < row["t_end_us"]
    assert any(json.loads(line)["label"] is not None for line in lines)


def test_summary_peak_rss_is_the_process_peak(tmp_path: Path) -> None:
    """The summary's peak equals the kernel's high-water mark of the process (read by a parent that
    has no other child), not the RSS at the end."""
    out = tmp_path / "s.json"
    parent = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    cmd = [*PROCESS, "--source", "builtin:digits:40", "--quiet", "--json", str(out)]
    peak = float(subprocess.run([sys.executable, "-c", parent, *cmd], capture_output=True, text=True,
                                check=True, timeout=300).stdout.splitlines()[-1])
    summary_peak = json.loads(out.read_text())["peak_rss_mib"]
    # The summary is read before the process ends: teardown may still touch a few pages after it.
    assert peak - 1.0 <= summary_peak <= peak
