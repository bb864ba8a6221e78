"""End-to-end streaming benchmark: ``stoprt stream`` steps per second with and without learning, and
memory over a long stream with learning (RSS growth after warm-up against a stated bound).

    python examples/benchmarks/session_bench.py --out runs/bench/session.json              # ~5 min
    python examples/benchmarks/session_bench.py --long-steps 20000 --out runs/quick.json   # shorter

Steps/s comes from the real command (a subprocess per configuration, the demo network: the MLP on
16x16 input, built-in digit stream). The long stream runs in this process: a looping built-in stream,
STOP-WTL learning from every labelled segment, RSS read every ``--every`` steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from stoprt.runtime import models
from stoprt.runtime.stream.session import StreamSession
from stoprt.runtime.stop import STOP
from stoprt.runtime.stream import Binner, StreamPipeline
from stoprt.runtime.stream.builtin import BuiltinStream

GROWTH_BOUND_MIB = 16.0  # stated bound on RSS growth after warm-up


def command_rate(learn: bool, steps: int, threads: int) -> dict:
    """Run ``stoprt stream`` on the built-in digit stream; its own JSON summary gives the rate."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.json"
        cmd = [sys.executable, "-m", "stoprt.cli", "stream", "--source", "builtin:digits:200", "--model", "mlp",
               "--max-steps", str(steps), "--threads", str(threads), "--quiet", "--json", str(out)]
        subprocess.run(cmd + (["--learn"] if learn else []), check=True)
        s = json.loads(out.read_text())
    return {"learning": learn, "steps": s["steps"], "steps_per_s": s["steps_per_s"],
            "realtime_factor": s["pipeline"]["realtime_factor"], "updates": s["updates"]}


def long_stream(steps: int, every: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    source = BuiltinStream("digits", n_samples=100, loop=True)
    net = models.mlp(in_channels=2, size=16, classes=10)
    learner = STOP(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    session = StreamSession(net, learner, labels=source.labels)
    proc = psutil.Process()
    trace: list[tuple[int, float]] = []

    def on_step(sess) -> None:
        if sess.stats.steps % every == 0:
            trace.append((sess.stats.steps, proc.memory_info().rss / 2**20))

    start = time.perf_counter()
    with StreamPipeline(source, Binner(source.sensor_size, out_size=16, dt_us=30_000)) as pipe:
        stats = session.run(pipe, max_steps=steps, on_step=on_step)
    seconds = time.perf_counter() - start
    after = [rss for step, rss in trace if step >= warmup]
    growth = max(after) - after[0] if after else float("nan")
    return {"steps": stats.steps, "samples": stats.samples, "updates": stats.updates,
            "online_accuracy": stats.accuracy, "seconds": seconds, "steps_per_s": stats.steps / seconds,
            "warmup_steps": warmup, "rss_after_warmup_mib": after[0] if after else None,
            "rss_growth_after_warmup_mib": growth, "bound_mib": GROWTH_BOUND_MIB,
            "within_bound": growth <= GROWTH_BOUND_MIB, "rss_trace": trace}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench/session.json")
    p.add_argument("--rate-steps", type=int, default=2000)
    p.add_argument("--long-steps", type=int, default=200_000)
    p.add_argument("--every", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.warmup = min(args.warmup, args.long_steps // 4)
    print(f"stoprt stream, demo network (mlp, 16x16), built-in digit stream, {args.threads} thread(s):")
    rates = [command_rate(learn, args.rate_steps, args.threads) for learn in (False, True)]
    for r in rates:
        print(f"  {'with' if r['learning'] else 'without'} learning: {r['steps_per_s']:.0f} steps/s "
              f"(real-time x{r['realtime_factor']:.1f} at 30 ms steps)")
    print(f"Long stream with learning: {args.long_steps} steps, RSS every {args.every} steps ...", flush=True)
    long = long_stream(args.long_steps, args.every, args.warmup, args.threads)
    print(f"  {long['steps']} steps, {long['updates']} updates, {long['steps_per_s']:.0f} steps/s, online accuracy "
          f"{100 * (long['online_accuracy'] or 0):.1f}%")
    print(f"  RSS after {long['warmup_steps']} warm-up steps {long['rss_after_warmup_mib']:.1f} MiB, growth since "
          f"{long['rss_growth_after_warmup_mib']:+.1f} MiB (bound {GROWTH_BOUND_MIB} MiB: "
          f"{'within' if long['within_bound'] else 'EXCEEDED'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "torch": torch.__version__},
                               "rates": rates, "long_stream": long}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
