"""Torch-free learning stream: `stoprt stream --backend onnxruntime --learn` with the demo MLP, 1 thread.

Issue 13's targets: RSS at most 150 MiB and at least 3,000 steps/s. The learning bundle of the demo
MLP (``mlp``, 16x16 input, hidden 256) is exported and the built-in digits rendered into the cache in
one subprocess (torch); then the stream runs in a fresh subprocess in which
``import torch`` fails (a meta-path blocker), and its ``--json`` summary (steps/s of the process, peak
RSS) is read. The same stream with the torch backend (STOP in torch, 1 thread) runs beside it for
the ratio. This process never imports torch: a child's peak RSS (``ru_maxrss``) starts from its
parent's at the fork, so a parent holding torch would inflate it. Results: ``OUT/onnx_learn_stream.json``.

On a shared machine the wall-clock rate mostly measures the other processes: the torch-free stream
runs ``--repeats`` times and the median and best rates are kept, with the steps per CPU second of
the stream loop (its process time, so closer to what the loop costs) and the load average around
the runs.

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
write_bundle(sys.argv[1], build_model("mlp", size=16), {"dt_us": 30_000}, learning=LearningOptions(lr=0.01))
"""


def _run(argv: list[str], blocked: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.json"
        cmd = [sys.executable, "-c", BLOCKED] if blocked else [sys.executable, "-m", "stoprt.cli"]
        subprocess.run(cmd + argv + ["--json", str(out), "--quiet", "--threads", "1"], check=True,
                       capture_output=True, text=True)
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/onnx-learn")
    p.add_argument("--samples", type=int, default=400, help="built-in digits streamed (about 10.7 steps each)")
    p.add_argument("--repeats", type=int, default=5, help="runs of the torch-free stream (median and best kept)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        subprocess.run([sys.executable, "-c", PREPARE, str(bundle), str(args.samples)], check=True)
        stream = ["stream", "--source", f"builtin:digits:{args.samples}", "--model", str(bundle), "--learn"]
        load0 = os.getloadavg()[0]
        runs = [_run(stream + ["--backend", "onnxruntime"], blocked=True) for _ in range(args.repeats)]
        eager = _run(stream, blocked=False)
        load1 = os.getloadavg()[0]
    keys = ("steps", "updates", "steps_per_s", "peak_rss_mib", "accuracy")
    rates = [r["steps_per_s"] for r in runs]
    median = statistics.median(rates)
    ort = {**{k: runs[0][k] for k in keys}, "steps_per_s": median, "steps_per_s_best": max(rates),
           "steps_per_s_runs": rates, "steps_per_cpu_s_runs": [r["steps"] / r["cpu_s"] for r in runs],
           "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
    result = {"model": "mlp (2x16x16 -> 256 -> 10), SGD lr 0.01 momentum 0.9, update per sample",
              "samples": args.samples, "threads": 1, "load_average_1min": [load0, load1],
              "onnxruntime_torch_free": ort,
              "torch_stop_adam": {k: eager[k] for k in keys},
              "targets": {"peak_rss_mib_max": 150, "steps_per_s_min": 3000},
              "met": {"rss": ort["peak_rss_mib"] <= 150, "steps_per_s": median >= 3000,
                      "steps_per_s_best_run": max(rates) >= 3000}}
    (out / "onnx_learn_stream.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
