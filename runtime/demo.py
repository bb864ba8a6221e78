"""The streaming in-situ learning demo: STOP-WTL on a built-in event stream, one step at a time.

Samples of the training split arrive one after another (batch 1), each as T event frames; the network
learns from every sample as it streams past (an update at each sample's end), as it would on a
device. Held-out accuracy is measured before and after, with the same network.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import models
from .datasets import load_builtin
from .progress import ProgressBar
from .stop import STOP
from .train import evaluate
from .usage import peak_rss_mib

CHANCE = {"digits": 0.1, "gestures": 1 / 8}


def run_demo(data: str = "digits", model: str = "mlp", T: int = 10, size: int = 16, passes: int = 1,
             lr: float = 1e-3, seed: int = 0, device: str = "cpu", max_samples: int | None = None,
             json_path: str | None = None, progress: bool = True) -> dict:
    """Run the demo; returns (and optionally writes as JSON) its summary."""
    torch.manual_seed(seed)
    train_set = load_builtin(data, "train", T=T, size=size, seed=seed)
    test_set = load_builtin(data, "test", T=T, size=size, seed=seed)
    net = models.build_model(model, in_channels=train_set.input_shape[0], size=size,
                             classes=train_set.num_classes).to(device)
    learner = STOP(net, torch.optim.Adam(net.parameters(), lr=lr),
                   learn=("weight", "threshold", "leak"), update="sample")
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=64)
    rss_before = peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    acc_before = evaluate(learner, test_loader, device)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    if max_samples is not None:
        order = order[:max_samples]
    bar = ProgressBar(passes * len(order), f"streaming {data}", enabled=progress)
    correct = seen = 0
    start = time.perf_counter()
    for _ in range(passes):
        for index in order.tolist():
            frames, label = train_set[index]
            y = torch.tensor([label], device=device)
            for x_t in frames.to(device):           # one time step at a time, as from a sensor
                learner.step(x_t.unsqueeze(0), target=y)
            correct += int(learner.end_sample().item() == label)
            seen += 1
            bar.update(1, online_acc=correct / seen)
    seconds = time.perf_counter() - start
    bar.close()
    acc_after = evaluate(learner, test_loader, device)

    summary = {
        "data": data, "model": model, "method": "STOP-WTL", "T": T, "input_shape": list(train_set.input_shape),
        "train_samples_streamed": seen, "test_samples": len(test_set),
        "chance_accuracy": CHANCE.get(data), "accuracy_before": acc_before, "accuracy_after": acc_after,
        "online_accuracy": correct / max(seen, 1), "steps": learner.stats.steps - 0,
        "stream_seconds": seconds, "steps_per_s": seen * T / seconds if seconds > 0 else 0.0,
        "updates": learner.stats.updates, "rejected_updates": learner.stats.rejected_updates,
        "peak_rss_mib": peak_rss_mib(), "rss_before_stream_mib": rss_before,
        "peak_cuda_allocated_mib": (torch.cuda.max_memory_allocated() / 2**20
                                    if device.startswith("cuda") else None),
        "device": device, "torch_threads": torch.get_num_threads(),
    }
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(s: dict) -> str:
    """The summary as a short readable table."""
    rows = [
        ("data / model", f"{s['data']} / {s['model']} ({s['method']}, T={s['T']}, input {s['input_shape']})"),
        ("held-out accuracy", f"{100 * s['accuracy_before']:.1f}% before -> {100 * s['accuracy_after']:.1f}% after"
                              f" (chance {100 * s['chance_accuracy']:.1f}%, {s['test_samples']} samples)"),
        ("online accuracy", f"{100 * s['online_accuracy']:.1f}% over {s['train_samples_streamed']} streamed samples"),
        ("speed", f"{s['steps_per_s']:.0f} steps/s ({s['stream_seconds']:.1f} s streaming, "
                  f"{s['updates']} updates, {s['rejected_updates']} refused)"),
        ("peak memory", f"{s['peak_rss_mib']:.0f} MiB RSS (process peak; {s['rss_before_stream_mib']:.0f} MiB "
                        "before streaming)" + (f", {s['peak_cuda_allocated_mib']:.1f} MiB CUDA allocated"
                                               if s["peak_cuda_allocated_mib"] is not None else "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
