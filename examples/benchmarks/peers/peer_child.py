"""One measurement in a fresh process; prints one JSON line. Started by ``run.py``, in the benchmark
environment for the peers (see ``bench_env.py``) and with the project's interpreter otherwise.

    python peer_child.py memory   --method sj-ottt --T 30 --batch 8 --size 32 --width 0.5
    python peer_child.py timing   --methods stop-wtl bptt sj-ottt --T 10 --batch 8 --size 32 --width 0.5
    python peer_child.py accuracy --method stop-wtl --data digits --epochs 3
    python peer_child.py latency  --size 32 --steps 2000
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/benchmarks: core_bench
import core_bench  # noqa: E402  (its memory probes and non-spiking floor, shared with this benchmark)
import peer_methods  # noqa: E402
import peer_nets  # noqa: E402

from stoprt.devices.cost.meters import SavedTensorsMeter  # noqa: E402
from stoprt.runtime.batchnorm import calibrate_batchnorm  # noqa: E402
from stoprt.runtime.datasets import load_builtin  # noqa: E402


def _sparse_input(T: int, batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random event frames ``[T, B, 2, size, size]`` (15% of pixels active) and labels ``[B]``."""
    gen = torch.Generator().manual_seed(seed)
    xs = (torch.rand(T, batch, 2, size, size, generator=gen) < 0.15).float()
    return xs, torch.randint(0, 10, (batch,), generator=gen)


def held_tensors(net: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a network's modules keep between steps: stoprt's state and traces (attributes),
    snnTorch's membranes (attributes or buffers), SpikingJelly's memories (``_memories``), and the
    BatchNorm statistics every method has alike. Parameters are not among them."""
    out = []
    for m in net.modules():
        values = [*vars(m).values(), *m._buffers.values(), *getattr(m, "_memories", {}).values()]
        out += [v for v in values if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)]
    return out


def memory(a) -> dict:
    """Memory of one training sample of T steps of the VGG network (this process is fresh)."""
    torch.set_num_threads(a.threads)
    method = peer_methods.make(a.method, peer_nets.reference("vgg11", a.size, 10, a.width, a.seed))
    xs, y = _sparse_input(a.T, a.batch, a.size, a.seed)
    method.train_sample(xs[:3], y)  # warm up: optimizer state, thread pools, first-use allocations
    core_bench.release_free_memory()
    baseline = psutil.Process().memory_info().rss
    # Saved for backward, and with the state the modules keep (each storage once): what training holds.
    meter = SavedTensorsMeter(method.net, state=held_tensors)
    # Not counted either: the input sample, which exists before training and is the same for every
    # method. (A layer that saves its input x_t = xs[t] pins the storage of the whole sequence.)
    meter.persistent.add(xs.untyped_storage().data_ptr())
    if a.method in peer_methods.ONLINE:
        # each step's graph is freed by that step's backward: count one step's at a time
        method.net.register_forward_pre_hook(lambda *_: meter.new_step())
    method.net.register_forward_hook(lambda *_: meter.snapshot())  # a step's graph is complete here
    sampler = core_bench.RSSPeak()
    sampler.start()
    start = time.perf_counter()
    with meter:
        method.train_sample(xs, y)
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    return {"method": a.method, "T": a.T, "batch": a.batch, "saved_for_backward_mib": meter.peak_saved / 2**20,
            "held_mib": meter.peak_total / 2**20, "state_mib": meter.state_at_peak / 2**20,
            "rss_delta_mib": max(peak - baseline, 0) / 2**20, "seconds_per_step": seconds / a.T}


def timing(a) -> dict:
    """Training time per step of every method and the non-spiking floor, interleaved, best of n."""
    torch.set_num_threads(a.threads)
    xs, y = _sparse_input(a.T, a.batch, a.size, a.seed)
    runs = {}
    for name in a.methods:
        method = peer_methods.make(name, peer_nets.reference("vgg11", a.size, 10, a.width, a.seed))
        runs[name] = lambda m=method: m.train_sample(xs, y)
    floor = core_bench.floor_stack(peer_nets.reference("vgg11", a.size, 10, a.width, a.seed))
    floor_opt = torch.optim.Adam(floor.parameters(), lr=1e-3)

    def floor_sample() -> None:
        for x in xs:
            F.cross_entropy(floor(x), y).backward()
        floor_opt.step()
        floor_opt.zero_grad(set_to_none=True)

    runs["floor"] = floor_sample
    for fn in runs.values():
        fn()  # warm up
    best = {k: float("inf") for k in runs}
    for _ in range(a.repeats):  # interleaved, best of n: the least disturbed run of each
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / a.T)
    return {"T": a.T, "batch": a.batch, "repeats": a.repeats, "ms_per_step": {k: 1e3 * v for k, v in best.items()}}


def accuracy(a) -> dict:
    """Train ``a.method`` on a built-in dataset for ``a.epochs``; held-out accuracy after each epoch."""
    torch.set_num_threads(a.threads)
    train = load_builtin(a.data, "train", T=a.T, size=a.size, seed=a.seed, n_samples=a.n_train)
    test = load_builtin(a.data, "test", T=a.T, size=a.size, seed=a.seed, n_samples=a.n_test)
    ref = peer_nets.reference(a.model, a.size, train.num_classes, a.width, a.seed)
    # frozen BatchNorm statistics from the first batches, as stoprt's trainer does; the peers copy them
    calibrate_batchnorm(ref, (x.transpose(0, 1) for x, _ in itertools.islice(DataLoader(train, a.batch), 4)))
    method = peer_methods.make(a.method, ref, a.lr)
    torch.manual_seed(a.seed)  # the same dropout-mask stream start for every method
    loader = DataLoader(train, a.batch, shuffle=True, generator=torch.Generator().manual_seed(a.seed))
    history = []
    for epoch in range(a.epochs):
        t0, correct = time.perf_counter(), 0
        for x, y in loader:
            correct += int((method.train_sample(x.transpose(0, 1), y) == y).sum())
        seconds = time.perf_counter() - t0
        pred = torch.cat([method.predict(x.transpose(0, 1)) for x, _ in DataLoader(test, 64)])
        history.append({"epoch": epoch + 1, "train_acc": correct / len(train),
                        "test_acc": float((pred == test.labels).float().mean()), "train_seconds": seconds})
    per_class = {name: float((pred[test.labels == k] == k).float().mean())
                 for k, name in enumerate(test.class_names) if bool((test.labels == k).any())} if history else {}
    return {"method": a.method, "data": a.data, "model": a.model, "size": a.size, "T": a.T, "epochs": a.epochs,
            "n_train": len(train), "n_test": len(test), "test_acc": history[-1]["test_acc"] if history else None,
            "per_class_acc": per_class, "history": history}


def _ort_backend(ref, threads: int, folder: str):
    """stoprt's ONNX step export run by ONNX Runtime on the CPU, or the reason it cannot run."""
    try:
        from stoprt.export.onnx_step import export_step
        from stoprt.export.ort_runner import OrtStepRunner
    except ImportError as err:
        return None, f"stoprt's ONNX step export is not available ({err})"
    path = Path(folder) / "step.onnx"
    export_step(ref, path)
    runner = OrtStepRunner(path, providers=["CPUExecutionProvider"], threads=threads)
    return runner, None


def latency(a) -> dict:
    """Streaming inference at batch 1: per-step latency of every backend, interleaved rounds."""
    torch.set_num_threads(a.threads)
    ref = peer_nets.reference(a.model, a.size, 10, a.width, a.seed).eval()
    gen = torch.Generator().manual_seed(a.seed)
    xs = [(torch.rand(1, 2, a.size, a.size, generator=gen) < 0.15).float() for _ in range(a.steps)]
    from stoprt.export.runners import TorchStepRunner
    backends, notes = {"stoprt-torch": TorchStepRunner(ref)}, {}
    folder = tempfile.TemporaryDirectory()
    ort, why = _ort_backend(ref, a.threads, folder.name)
    if ort is None:
        notes["stoprt-ort"] = why
    else:
        backends["stoprt-ort"] = ort
    for name, lib in (("snntorch", "snntorch"), ("spikingjelly", "sj_single")):
        why = "peers not run" if a.stoprt_only else peer_methods.available(
            "snntorch-bptt" if lib == "snntorch" else "sj-bptt")
        if why:
            notes[name] = why
            continue
        net = peer_nets.set_training(peer_nets.convert(ref, lib), False)
        backends[name] = _TorchPeer(net, lib)
    inputs = {k: [x.numpy() for x in xs] if k == "stoprt-ort" else xs for k in backends}
    outputs, times = {}, {k: [] for k in backends}
    with torch.no_grad():
        for k, b in backends.items():  # warm up, and keep the outputs of one full pass for the agreement check
            b.reset()
            outputs[k] = torch.cat([torch.as_tensor(b.step(x)) for x in inputs[k]])
        per_round = max(1, a.steps // a.rounds)
        for r in range(a.rounds):
            for k, b in backends.items():
                b.reset()
                for x in inputs[k][r * per_round:(r + 1) * per_round]:
                    t0 = time.perf_counter_ns()
                    b.step(x)
                    times[k].append(time.perf_counter_ns() - t0)
    folder.cleanup()
    ref_out = outputs["stoprt-torch"]
    result = {}
    for k, ts in times.items():
        us = sorted(t / 1e3 for t in ts)
        result[k] = {"median_us": statistics.median(us), "p99_us": us[min(len(us) - 1, int(0.99 * len(us)))],
                     "mean_us": statistics.fmean(us), "steps": len(us),
                     "same_output_as_stoprt_torch": float((outputs[k] == ref_out).float().mean()),
                     "output_spikes": int(outputs[k].sum())}
    return {"model": a.model, "size": a.size, "width": a.width, "threads": a.threads, "backends": result,
            "skipped": notes}


class _TorchPeer:
    """A converted peer network behind the step-runner interface (``step``, ``reset``)."""

    def __init__(self, net, lib: str) -> None:
        self.net, self.lib = net, lib

    def step(self, x):
        return self.net(x)

    def reset(self) -> None:
        peer_nets.reset(self.net, self.lib)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=("memory", "timing", "accuracy", "latency"))
    p.add_argument("--method", choices=peer_methods.METHODS)
    p.add_argument("--methods", nargs="+", choices=peer_methods.METHODS, default=[])
    p.add_argument("--model", default="dvs_gesture")
    p.add_argument("--data", default="digits")
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--stoprt-only", action="store_true", help="latency: leave the peers out")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    return p


def main() -> None:
    a = parser().parse_args()
    task = {"memory": memory, "timing": timing, "accuracy": accuracy, "latency": latency}[a.task]
    print(json.dumps(task(a)))


if __name__ == "__main__":
    main()
