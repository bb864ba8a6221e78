"""Torch-free learning stream: `stoprt stream --backend onnxruntime --learn` with the demo MLP, 1 thread.

Issue 13's targets: RSS at most 150 MiB and at least 3,000 steps/s. The learning bundle of the demo
MLP (``mlp``, 16x16 input, hidden 256) is exported and the built-in digits rendered into the cache in
one subprocess (torch); then the stream runs in a fresh subprocess in which
``import torch`` fails (a meta-path blocker), and its ``--json`` summary (steps/s of the process, peak
RSS) is read. The same stream with the torch backend (STOP in torch, 1 thread) runs beside it for
the ratio. Both learn with the torch stream's default optimizer, Adam with lr 1e-3 (torch's betas
and eps, no weight decay; the bundle's update graph has the same defaults), so their accuracies
compare (an earlier version gave the bundle SGD at lr 0.01: the torch-free stream stayed at
chance). This process never imports torch: a child's peak RSS (``ru_maxrss``) starts from its
parent's at the fork, so a parent holding torch would inflate it. Results: ``OUT/onnx_learn_stream.json``.

On a shared machine the wall-clock rate mostly measures the other processes: the torch-free stream
runs ``--repeats`` times and the median and best rates are kept, with the steps per CPU second of
the stream loop (its process time, so closer to what the loop costs) and the load average around
the runs. ``--baseline DIR`` runs an earlier stoprt's torch-free stream alternately with this one's,
under the same conditions, and records the ratios.

    python examples/benchmarks/onnx_learn_stream_bench.py --out docs/results/onnx-learn --samples 400
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LR = 1e-3  # the torch stream's default (commands/stream.py); passed to both streams explicitly

BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
from stoprt.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""
PREPARE = """
import sys, torch
from stoprt.export.bundle import write_bundle
from stoprt.export.learning import LearningOptions
from stoprt.runtime.models import build_model
from stoprt.runtime.stream.builtin import BuiltinStream
torch.manual_seed(0)
BuiltinStream("digits", n_samples=int(sys.argv[2]))
write_bundle(sys.argv[1], build_model("mlp", size=16), {"dt_us": 30_000},
             learning=LearningOptions(optimizer="adam", lr=float(sys.argv[3])))
"""


def _run(argv: list[str], blocked: bool, pythonpath: str | None = None) -> dict:
    env = None if pythonpath is None else {**os.environ, "PYTHONPATH": pythonpath}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.json"
        cmd = [sys.executable, "-c", BLOCKED] if blocked else [sys.executable, "-m", "stoprt.cli"]
        subprocess.run(cmd + argv + ["--json", str(out), "--quiet", "--threads", "1"], check=True,
                       capture_output=True, text=True, env=env)
        return json.loads(out.read_text())


def _summary(runs: list[dict]) -> dict:
    """Median and best of the runs' rates (wall clock and per CPU second), the highest peak RSS."""
    rates = [r["steps_per_s"] for r in runs]
    per_cpu = [r["steps"] / r["cpu_s"] for r in runs]
    return {**{k: runs[0][k] for k in ("steps", "updates", "accuracy")},
            "accuracy_runs": sorted({r["accuracy"] for r in runs}), "steps_per_s": statistics.median(rates),
            "steps_per_s_best": max(rates), "steps_per_s_runs": rates,
            "steps_per_cpu_s": statistics.median(per_cpu), "steps_per_cpu_s_runs": per_cpu,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def _commit(folder: str) -> str | None:
    done = subprocess.run(["git", "-C", str(Path(folder) / "stoprt"), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/onnx-learn")
    p.add_argument("--samples", type=int, default=400, help="built-in digits streamed (about 10.7 steps each)")
    p.add_argument("--repeats", type=int, default=5, help="runs of the torch-free stream (median and best kept)")
    p.add_argument("--baseline", metavar="DIR", help="a folder whose stoprt package is an earlier version "
                   "(DIR/stoprt: a checkout): its torch-free stream runs alternately with this one's")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        subprocess.run([sys.executable, "-c", PREPARE, str(bundle), str(args.samples), str(LR)], check=True)
        stream = ["stream", "--source", f"builtin:digits:{args.samples}", "--model", str(bundle), "--learn",
                  "--lr", str(LR)]
        ort_stream = stream + ["--backend", "onnxruntime"]
        load0 = os.getloadavg()[0]
        runs, base_runs = [], []
        for _ in range(args.repeats):
            runs.append(_run(ort_stream, blocked=True))
            if args.baseline:
                base_runs.append(_run(ort_stream, blocked=True, pythonpath=args.baseline))
        eager = _run(stream, blocked=False)
        load1 = os.getloadavg()[0]
    ort = _summary(runs)
    result = {"model": "mlp (2x16x16 -> 256 -> 10), update per sample",
              "optimizer": {"both_streams": "adam", "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                            "weight_decay": 0.0},
              "samples": args.samples, "threads": 1, "repeats": args.repeats,
              "load_average_1min": [load0, load1],
              "onnxruntime_torch_free": ort,
              "torch_stop_adam": {k: eager[k] for k in ("steps", "updates", "steps_per_s", "peak_rss_mib", "accuracy")},
              "targets": {"peak_rss_mib_max": 150, "steps_per_s_min": 3000},
              "met": {"rss": ort["peak_rss_mib"] <= 150, "steps_per_s": ort["steps_per_s"] >= 3000,
                      "steps_per_s_best_run": ort["steps_per_s_best"] >= 3000}}
    if base_runs:
        base = _summary(base_runs)
        result["baseline"] = {"commit": _commit(args.baseline), **base}
        result["speedup_over_baseline"] = {k: ort[k] / base[k] for k in ("steps_per_s", "steps_per_cpu_s")}
    (out / "onnx_learn_stream.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
