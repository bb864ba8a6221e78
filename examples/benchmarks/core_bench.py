"""Core benchmark: STOP vs BPTT memory and time on a VGG-11-style network, and the STOP variants'
accuracy on the emulated digits. Prints tables and writes JSON, CSV and a PNG plot.

    python examples/benchmarks/core_bench.py --out runs/bench          # the full run (~10 min, 2 cores)
    python examples/benchmarks/core_bench.py --quick --out runs/quick  # a small smoke run

Memory: each (method, T) runs in a fresh subprocess. Two views: the peak of bytes autograd saves for
backward (exact, noise-free; parameters excluded) and the process RSS peak (sampled every 1 ms) minus
the RSS after a warm-up sample and ``malloc_trim``, with glibc returning large blocks at once.
Time: per training time step, measured side by side in one run. The floor is a plain non-spiking
forward+backward of the same convolutional stack (ReLU instead of LIF), once per step.
"""

from __future__ import annotations

import argparse
import csv
import os
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from stoprt.devices.cost.meters import RSSPeak, SavedTensorsMeter, release_free_memory
from stoprt.runtime import layers as L, models
from stoprt.runtime.bptt import BPTT
from stoprt.runtime.stop import STOP
from stoprt.runtime.train import TrainConfig, train


def vgg(args) -> L.Sequential:
    return models.vgg11(in_channels=2, size=args.size, classes=10, width=args.width)


def floor_stack(net: L.Sequential) -> nn.Sequential:
    """The same convolutions, BN (frozen), pools and dropout as ``net`` in plain torch layers, with ReLU
    for every neuron layer (no stoprt op)."""
    layers = []
    for m in net:
        if isinstance(m, L.Neuron):
            layers.append(nn.ReLU())
        elif isinstance(m, L.Conv2d):
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=m.bias is not None)
            conv.load_state_dict(m.state_dict())
            layers.append(conv)
        elif isinstance(m, L.Linear):
            lin = nn.Linear(m.in_features, m.out_features)
            lin.load_state_dict(m.state_dict())
            layers.append(lin)
        elif isinstance(m, L.BatchNorm2d):
            layers.append(nn.BatchNorm2d(m.num_features).eval())
        elif isinstance(m, L.AvgPool2d):  # torch's own: the floor uses none of stoprt's ops
            layers.append(nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                       m.divisor_override))
        elif isinstance(m, L.Dropout):
            layers.append(nn.Dropout(m.p))
        elif type(m).__module__.startswith("torch.nn"):  # Flatten, AdaptiveAvgPool2d: torch's own
            layers.append(m)
        else:
            raise TypeError(f"floor_stack: no plain-torch counterpart for {type(m).__name__}")
    return nn.Sequential(*layers)


def make_learner(method: str, net):
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    return STOP(net, opt, update="sample") if method == "stop" else BPTT(net, opt)


def run_sample(learner, xs, y) -> None:
    for x in xs:
        learner.step(x, y)
    learner.end_sample()


def measure_memory(args) -> dict:
    """In this (fresh) process: memory of one training sample of T steps."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    net = vgg(args)
    learner = make_learner(args.method, net)
    xs = [(torch.rand(args.batch, 2, args.size, args.size) < 0.15).float() for _ in range(args.T)]
    y = torch.randint(0, 10, (args.batch,))
    run_sample(learner, xs[:3], y)  # warm up: optimizer state, thread pools, first-use allocations
    release_free_memory()
    baseline = psutil.Process().memory_info().rss
    meter = SavedTensorsMeter(net)
    sampler = RSSPeak()
    sampler.start()
    start = time.perf_counter()
    with meter:
        for x in xs:
            learner.step(x, y)
            if args.method == "stop":
                meter.new_step()  # each STOP step's graph is freed by its backward
    state_bytes = sum(t.numel() * t.element_size() for t in L.state_tensors(net))
    learner.end_sample()
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    return {"method": args.method, "T": args.T, "batch": args.batch,
            "saved_for_backward_mib": meter.peak_saved / 2**20,
            "rss_delta_mib": max(peak - baseline, 0) / 2**20,
            "state_and_traces_mib": state_bytes / 2**20,
            "seconds_per_step": seconds / args.T}


def memory_sweep(args) -> list[dict]:
    rows = []
    for method in ("stop", "bptt"):
        for T in args.Ts:
            cmd = [sys.executable, __file__, "--child-memory", "--method", method, "--T", str(T),
                   "--batch", str(args.batch), "--size", str(args.size), "--width", str(args.width),
                   "--threads", str(args.threads)]
            # Large blocks straight from mmap: freed tensors go back to the OS at once, so the RSS
            # view tracks live memory instead of glibc's retained heap (the CPU counterpart of a
            # CUDA allocator's peak).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {method:4s} T={T:4d}: saved-for-backward {row['saved_for_backward_mib']:9.1f} MiB, "
                  f"RSS delta {row['rss_delta_mib']:9.1f} MiB, {1e3 * row['seconds_per_step']:7.1f} ms/step",
                  flush=True)
    return rows


def time_per_step(args) -> dict:
    """STOP, BPTT and the non-spiking floor per training step, interleaved in one process."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    T = args.time_T
    xs = [(torch.rand(args.batch, 2, args.size, args.size) < 0.15).float() for _ in range(T)]
    y = torch.randint(0, 10, (args.batch,))
    stop_net, bptt_net = vgg(args), vgg(args)
    stop, bptt = make_learner("stop", stop_net), make_learner("bptt", bptt_net)
    floor = floor_stack(stop_net)
    floor_opt = torch.optim.SGD(floor.parameters(), lr=1e-3)

    def floor_sample():
        for x in xs:
            nn.functional.cross_entropy(floor(x), y).backward()
        floor_opt.step()
        floor_opt.zero_grad(set_to_none=True)

    runs = {"stop": lambda: run_sample(stop, xs, y), "bptt": lambda: run_sample(bptt, xs, y),
            "floor": floor_sample}
    for fn in runs.values():
        fn()  # warm up
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):  # interleaved, best of n: the least disturbed run of each
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / T)
    return {"T": T, "batch": args.batch, "ms_per_step": {k: 1e3 * v for k, v in best.items()},
            "stop_over_floor": best["stop"] / best["floor"], "bptt_over_floor": best["bptt"] / best["floor"]}


def accuracy_variants(args) -> list[dict]:
    rows = []
    torch.set_num_threads(args.threads)
    for method, learn in (("stop", "w"), ("stop", "wt"), ("stop", "wl"), ("stop", "wtl"), ("bptt", "wtl")):
        cfg = TrainConfig(model=args.acc_model, data="digits", method=method, learn=learn, size=args.acc_size,
                          T=10, epochs=args.acc_epochs, batch_size=16, lr=args.acc_lr, seed=0, progress=False)
        t0 = time.perf_counter()
        result = train(cfg)
        name = "BPTT" if method == "bptt" else f"STOP-{learn.upper()}"
        row = {"variant": name, "model": args.acc_model, "epochs": args.acc_epochs,
               "test_acc": result["final_test_acc"], "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"  {name:9s}: held-out accuracy {100 * row['test_acc']:.1f}% ({row['seconds']:.0f} s)", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, title in (("saved_for_backward_mib", axes[0], "saved for backward (MiB)"),
                           ("rss_delta_mib", axes[1], "RSS peak - baseline (MiB)")):
        for method in ("stop", "bptt"):
            pts = [(r["T"], r[key]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method.upper())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("time steps T")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("VGG-11-style training memory vs T (one sample)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--Ts", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--time-T", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--acc-model", default="dvs_gesture")
    p.add_argument("--acc-size", type=int, default=16)
    p.add_argument("--acc-epochs", type=int, default=3)
    p.add_argument("--acc-lr", type=float, default=3e-3)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        print(json.dumps(measure_memory(args)))
        return
    if args.quick:
        args.batch, args.size, args.width, args.Ts, args.repeats = 4, 16, 0.25, [5, 15], 2
        args.acc_model, args.acc_epochs = "mlp", 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"VGG-11-style network, input 2x{args.size}x{args.size}, width x{args.width}, batch {args.batch}, "
          f"{args.threads} thread(s)")
    print("Memory of one training sample (fresh subprocess each):")
    mem = memory_sweep(args)
    stop = {r["T"]: r for r in mem if r["method"] == "stop"}
    lo, hi = min(stop), max(stop)
    growth = {k: stop[hi][k] / stop[lo][k] - 1 for k in ("saved_for_backward_mib", "rss_delta_mib")}
    print(f"  STOP growth T={lo}->{hi}: saved-for-backward {100 * growth['saved_for_backward_mib']:+.1f}%, "
          f"RSS delta {100 * growth['rss_delta_mib']:+.1f}% (target: within 5%)")
    print("Time per training step (best of interleaved runs):")
    timing = time_per_step(args)
    ms = timing["ms_per_step"]
    print(f"  STOP {ms['stop']:.1f} ms, BPTT {ms['bptt']:.1f} ms, non-spiking floor {ms['floor']:.1f} ms: "
          f"STOP/floor {timing['stop_over_floor']:.2f}x (target <= 1.3x), BPTT/floor {timing['bptt_over_floor']:.2f}x")
    acc = []
    if not args.skip_accuracy:
        print(f"Accuracy on the emulated digits ({args.acc_model}, {args.acc_epochs} epochs, same data and seed):")
        acc = accuracy_variants(args)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": psutil.cpu_count(), "threads": args.threads, "torch": torch.__version__},
              "config": {k: v for k, v in vars(args).items() if k not in ("child_memory", "method", "T")},
              "memory": mem, "stop_memory_growth": growth, "timing": timing, "accuracy": acc}
    (out / "core_bench.json").write_text(json.dumps(result, indent=2))
    with (out / "core_memory.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(mem[0]))
        w.writeheader()
        w.writerows(mem)
    plotted = plot(mem, out / "core_memory.png")
    print(f"Wrote {out / 'core_bench.json'}, {out / 'core_memory.csv'}" + (f", {out / 'core_memory.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
