"""The stream's side of the step benchmark (see ``step_bench.py``): ``stoprt stream`` as a
subprocess, and the stream loop's own cost over the learner's calls."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from stoprt.runtime import models


def stream_rate(args, device: torch.device) -> dict:
    """``stoprt stream --source builtin:digits --learn --threads 1`` as a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "stream.json"
        cmd = [sys.executable, "-m", "stoprt.cli", "stream", "--source", args.stream_source, "--learn",
               "--threads", "1", "--device", str(device), "--quiet", "--json", str(summary)]
        if args.stream_steps:
            cmd += ["--max-steps", str(args.stream_steps)]
        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stream_timeout)
        wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0 or not summary.exists():
            return {"command": " ".join(cmd[1:]), "error": (done.stderr or done.stdout).strip()[-500:]}
        s = json.loads(summary.read_text())
    # steps per CPU second of the stream loop: what the rate would be with the core to itself (on a
    # shared, loaded machine the wall-clock rate mostly measures the other processes)
    cpu = s.get("cpu_s")
    return {"command": "python " + " ".join(cmd[1:]), "steps": s["steps"], "steps_per_s": s["steps_per_s"],
            "steady_steps_per_s": s.get("steady_steps_per_s"), "learner_mode": s.get("learner_mode"),
            "steps_per_cpu_s": s["steps"] / cpu if cpu else None, "first_step_s": s.get("first_step_s"),
            "updates": s["updates"], "stream_s": s["seconds"], "wall_s": wall,
            "startup_s": wall - s["seconds"], "realtime_factor": s["pipeline"]["realtime_factor"],
            "command_cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime}


def stream_overhead(args, make_learner: Callable) -> dict:
    """Seconds per step of the stream's own learner calls replayed bare, through the session over
    pre-binned steps, and through session + pipeline + the built-in source (CPU, demo network); the
    loop alone, each variant built before it is timed.

    Each variant's learner has run one step and its update before the clock starts (the static
    program and the optimizer state exist: start-up is ``first_step_s``'s to measure), and each run
    is short (``overhead_samples``) and repeated often (``overhead_repeats``, interleaved): an
    overhead is the median of the paired ratios (see below), which a shared machine's slow swings
    disturb least."""
    from stoprt.runtime.stream.labels import LabelTrack
    from stoprt.runtime.stream.session import StreamSession
    from stoprt.runtime.stream import Binner, StreamPipeline
    from stoprt.runtime.stream.builtin import BuiltinStream

    def source():
        return BuiltinStream("digits", n_samples=args.overhead_samples)

    def binner():
        return Binner((32, 32), out_size=16, dt_us=30_000)

    def fresh():
        torch.manual_seed(0)
        net = models.build_model("mlp", in_channels=2, size=16, classes=10)
        lrn = make_learner(net)
        lrn.step(torch.zeros(1, 2, 16, 16), torch.zeros(1, dtype=torch.int64))
        lrn.end_sample()
        return net, lrn

    src = source()
    with StreamPipeline(src, binner()) as pipe:
        steps = list(pipe)
    segments = list(src.labels.segments)  # a session prunes its track: each run gets a fresh one
    net, lrn = fresh()
    calls: list = []
    step, end = lrn.step, lrn.end_sample
    lrn.step = lambda x, target=None: (calls.append((x, target)), step(x, target))[1]
    lrn.end_sample = lambda: (calls.append(None), end())[1]
    StreamSession(net, lrn, labels=LabelTrack(segments)).run(steps)

    # Each variant is made (learner, source, binner, pipeline and session built, recordings read
    # from the cache) before its clock starts: that is start-up, which the stream's first_step_s
    # measures; what is timed is the loop alone.
    def bare():
        _, lr = fresh()
        return lambda: [lr.step(*c) if c is not None else lr.end_sample() for c in calls]

    def session():
        run = StreamSession(*fresh(), labels=LabelTrack(segments)).run
        return lambda: run(steps)

    def pipeline():
        (n, lr), s = fresh(), source()
        pipe, session = StreamPipeline(s, binner()), StreamSession(n, lr, labels=s.labels)

        def run():
            with pipe:
                session.run(pipe)
        return run

    # Wall time (what a stream sees, waits for the producer included) and the process's CPU time
    # (all threads: steadier on a loaded machine, but blind to waiting). The overheads are the median
    # over the repeats of each variant's time over the bare run of the same repeat (the three run
    # back to back, in an order that rotates: a paired ratio cancels the slow swings of a shared
    # machine); the times per step are the best of the repeats.
    variants = (("bare", bare), ("session", session), ("session_pipeline", pipeline))
    times = {(k, c): [] for k, _ in variants for c in ("wall", "cpu")}
    for r in range(args.overhead_repeats):
        for k, make in variants[r % 3:] + variants[:r % 3]:
            run = make()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            times[k, "wall"].append(time.perf_counter() - t0)
            times[k, "cpu"].append(time.process_time() - c0)
    n = len(steps)
    out = {"steps": n, "learner_calls": len(calls), "repeats": args.overhead_repeats}
    for c in ("wall", "cpu"):
        out.update({f"{k}_{c}_us_per_step": 1e6 * min(times[k, c]) / n for k, _ in variants})
        for k in ("session", "session_pipeline"):
            ratios = [t / b for t, b in zip(times[k, c], times["bare", c])]
            out[f"{k}_overhead_{c}"] = statistics.median(ratios) - 1
    return out


def stream_overhead_processes(args) -> dict:
    """:func:`stream_overhead` in ``overhead_processes`` fresh processes (this script), combined: each
    overhead the median over the processes, each time per step the best. One process's figures
    differ from the next one's by a few percent (where its memory lands shapes the caches the loop
    and the model share), more than the paired runs within a process differ."""
    runs = []
    for _ in range(args.overhead_processes):
        cmd = [sys.executable, __file__, "--overhead-samples", str(args.overhead_samples),
               "--overhead-repeats", str(args.overhead_repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"stream_loop.py failed: {(done.stderr or done.stdout).strip()[-500:]}")
        runs.append(json.loads(done.stdout))
    out = {k: v for k, v in runs[0].items() if not isinstance(v, float)}
    for k in runs[0]:
        if k.endswith("_us_per_step"):
            out[k] = min(r[k] for r in runs)
        elif "_overhead_" in k:
            out[k] = statistics.median(r[k] for r in runs)
    out["processes"] = [{k: v for k, v in r.items() if "_overhead_wall" in k} for r in runs]
    return out


if __name__ == "__main__":
    # The loop's overhead in this process: python examples/benchmarks/stream_loop.py [--overhead-samples N ...]
    import argparse

    from stoprt.runtime.stop import STOP

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--overhead-samples", type=int, default=20)
    p.add_argument("--overhead-repeats", type=int, default=15)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(stream_overhead(a, lambda net: STOP(net, torch.optim.Adam(net.parameters(), lr=1e-3))), indent=1))
