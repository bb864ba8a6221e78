"""`stoprt stream` end to end: learning from a labelled stream, SIGKILL and resume, chunked input,
UDP over loopback. The CLI runs in-process (``run_cli``) except where a real process is the point:
the run that is killed with SIGKILL."""

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from stoprt.runtime import layers as L, models
from stoprt.runtime.checkpoint import load_checkpoint
from stoprt.runtime.datasets import emulated_digits
from stoprt.runtime.events import events_to_frames
from stoprt.runtime.formats import write_events
from stoprt.runtime.stream.binning import Binner
from stoprt.runtime.stream.pipeline import StreamPipeline
from stoprt.runtime.stream.sources import FileSource

STREAM = ["stream", "--source", "builtin:digits:60", "--learn", "--threads", "1", "--quiet", "--checkpoint-every", "4"]


def _params(path):
    return load_checkpoint(path)["model_state"]


def test_sigkill_loses_nothing_before_the_last_checkpoint_and_resume_is_exact(tmp_path, run_cli):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_cli(*STREAM, "--checkpoint", str(full)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "stoprt.cli", *STREAM, "--checkpoint", str(killed)])
    ckpt = killed / "session.pt"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until a few samples are checkpointed, then kill -9
        if ckpt.is_file() and load_checkpoint(ckpt)["session"]["samples"] >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(ckpt)  # the last checkpoint is whole and loads
    assert saved["kind"] == "stream-session" and saved["session"]["samples"] >= 12
    # A kill inside a checkpoint write leaves its temporary file (never a half-written session.pt);
    # the resume removes such leftovers.
    assert run_cli(*STREAM, "--checkpoint", str(killed), "--resume").returncode == 0
    assert not [p for p in killed.iterdir() if p.name != "session.pt"], "a temporary file was left behind"
    a, b = _params(full / "session.pt"), _params(ckpt)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert load_checkpoint(ckpt)["session"]["updates"] == load_checkpoint(full / "session.pt")["session"]["updates"]


def test_stream_learns_and_reports(tmp_path, run_cli):
    out = tmp_path / "s.json"
    done = run_cli("stream", "--source", "builtin:digits:300", "--learn", "--threads", "1", "--quiet",
                   "--json", str(out))
    assert done.returncode == 0, done.stderr
    s = json.loads(out.read_text())
    assert s["labelled_samples"] >= 290 and s["updates"] == s["labelled_samples"]
    assert s["pipeline"]["steps_dropped"] == 0  # a recording is not live: the producer waits
    assert s["accuracy"] > 0.2  # online accuracy over the first pass, chance is 0.1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (Inductor's own)
def test_compile_chooses_how_the_learner_steps_and_the_summary_says_so(tmp_path, run_cli):
    """--compile reaches STOP: the summary names the mode it ran in, and the rate after the first step
    (which under fused includes compiling) beside the overall one; a bad mode is refused by name."""
    modes = {}
    for mode in ("fused", "eager"):
        out = tmp_path / f"{mode}.json"
        done = run_cli("stream", "--source", "builtin:digits:20", "--learn", "--threads", "1", "--quiet",
                       "--compile", mode, "--json", str(out))
        assert done.returncode == 0, done.stderr
        modes[mode] = s = json.loads(out.read_text())
        assert s["steady_steps_per_s"] > 0 and s["updates"] == s["labelled_samples"] >= 19
    assert modes["fused"]["learner_mode"] == "fused" and modes["eager"]["learner_mode"] == "eager"
    done = run_cli("stream", "--source", "builtin:digits:5", "--learn", "--compile", "inductor", "--quiet")
    assert done.returncode == 2 and "compile must be one of" in done.stderr and "'fused'" in done.stderr
    done = run_cli("stream", "--source", "builtin:digits:5", "--compile", "fused", "--quiet")  # no --learn
    assert done.returncode == 2 and "--compile applies to torch's STOP learner" in done.stderr


def test_chunked_streaming_equals_processing_at_once(tmp_path):
    events = emulated_digits(n_samples=1, seed=3)[0][0]
    path = tmp_path / "digit.bin"
    write_events(path, events)
    net = models.mlp(in_channels=2, size=16, classes=10).eval()
    dt = 20_000
    source = FileSource(path, packet_us=777, sensor_size=(34, 34))
    with StreamPipeline(source, Binner((34, 34), out_size=16, dt_us=dt)) as pipe:
        steps = list(pipe)
    t0 = int(events["t"].min())
    T = len(steps)
    at_once = events_to_frames(events, (34, 34), T, out_size=16, t_start=t0, t_end=t0 + T * dt)
    streamed = torch.stack([s.frame for s in steps])
    assert torch.equal(streamed, at_once)

    def outputs(frames):
        L.reset_state(net)
        with torch.no_grad():
            return torch.stack([net(f.unsqueeze(0)) for f in frames])

    assert torch.equal(outputs(streamed), outputs(at_once))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send_events(port, until_us):
    """1 ms packets of 200 random events to ``port``, paced at about 2 ms each."""
    from stoprt.runtime.stream.udp import UDPSender
    rng = np.random.default_rng(0)
    with UDPSender("127.0.0.1", port, format="stoprt") as sender:
        for t in range(0, until_us, 1000):
            n = 200
            ev = np.zeros(n, dtype=[("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
            ev["t"] = t + np.sort(rng.integers(0, 1000, n))
            ev["x"], ev["y"], ev["p"] = rng.integers(0, 32, n), rng.integers(0, 32, n), rng.integers(0, 2, n)
            sender.send(ev)
            time.sleep(0.002)


def test_stream_from_udp_over_loopback(tmp_path, run_cli):
    port = _free_port()
    out = tmp_path / "udp.json"
    # The sender runs in a thread while the CLI listens in this one (its signal handlers need the main
    # thread). 1 s of packets (at least 2 s of sending): datagrams sent before the CLI binds are lost,
    # and a few hundred of the 1000 are plenty for the claims below. The stream ends 3 s after the last.
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(_send_events, port, 1_000_000)
        done = run_cli("stream", "--source", f"udp://127.0.0.1:{port}?format=stoprt&width=32&height=32&timeout=3",
                       "--model", "mlp", "--dt-us", "1000", "--threads", "1", "--quiet", "--json", str(out))
        sending.result(timeout=60)
    assert done.returncode == 0, done.stderr
    s = json.loads(out.read_text())
    assert s["steps"] > 10 and s["pipeline"]["events"] > 1000
    assert s["pipeline"]["source"]["garbage_packets"] == 0


def test_onnxruntime_backend_streams_a_bundle_like_torch(tmp_path, run_cli):
    from stoprt.export.bundle import write_bundle
    torch.manual_seed(0)
    net = models.mlp(in_channels=2, size=16, classes=10)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, net, {"shape": [2, 16, 16], "dt_us": 30_000})
    results = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        done = run_cli("stream", "--source", "builtin:digits:30", "--model", str(bundle), "--backend", backend,
                       "--threads", "1", "--quiet", "--json", str(out))
        assert done.returncode == 0, done.stderr
        results[backend] = json.loads(out.read_text())
    assert results["torch"]["steps"] == results["onnxruntime"]["steps"] > 100
    assert results["torch"]["labelled_samples"] == results["onnxruntime"]["labelled_samples"] == 30
    assert abs(results["torch"]["accuracy"] - results["onnxruntime"]["accuracy"]) <= 0.1
