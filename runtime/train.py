"""Offline training with STOP (any variant) or BPTT, on one process or data-parallel under torchrun.

Data parallelism: each process takes its shard of every epoch and gradients are averaged across
processes (``all_reduce``) once before each optimizer update. ``DistributedDataParallel``'s wrapper is
not used: its reducer fires on every ``backward``, which STOP calls once per time step, and the layers'
per-step state lives in the modules; averaging at the update is the same arithmetic with T times less
communication. Process group: gloo on CPU, nccl on CUDA.

Exact resume: the sample order of an epoch is a function of (seed, epoch) alone, and a checkpoint
holds the data position (epoch, batches done, the epoch's running counts), the learner's counters,
the metrics history and the RNG states (torch, CUDA, numpy, Python). A run interrupted after a
checkpoint and resumed from it therefore equals the uninterrupted run bit for bit (parameters,
optimizer state, metrics; only the timing columns differ, as they do between any two runs).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from . import models
from .atomic import atomic_path, remove_stale_temporaries, write_text
from .batchnorm import calibrate_batchnorm
from .bptt import BPTT
from .checkpoint import check_finite, load_checkpoint, save_checkpoint
from .learner import Learner
from .progress import ProgressBar
from .usage import peak_rss_mib
from .stop import STOP

LEARN_CODES = {"w": ("weight",), "wt": ("weight", "threshold"), "wl": ("weight", "leak"),
               "wtl": ("weight", "threshold", "leak")}


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in checkpoints and metrics)."""

    model: str = "dvs_gesture"
    data: str = "digits"
    method: str = "stop"            # "stop" or "bptt"
    learn: str = "wtl"              # STOP variant: w, wt, wl, wtl
    update: str = "sample"          # STOP schedule: sample, step, or an integer k
    loss: str = "ce"
    optimizer: str = "adam"         # adam or sgd
    lr: float = 1e-3
    epochs: int = 3
    batch_size: int = 16
    T: int = 10
    size: int = 32
    width: float = 1.0
    readout: bool = False
    seed: int = 0
    device: str = "cpu"
    n_train: int | None = None      # use only the first n samples of a split (quick runs)
    n_test: int | None = None
    out_dir: str | None = None
    checkpoint_every: int = 0       # batches between checkpoints; 0: at the end of each epoch
    calibrate_bn: int = 4           # training batches to estimate frozen BatchNorm statistics from
    progress: bool = True
    model_kwargs: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.method not in ("stop", "bptt"):
            raise ValueError(f"method must be 'stop' or 'bptt', got {self.method!r}")
        if self.learn not in LEARN_CODES:
            raise ValueError(f"learn must be one of {sorted(LEARN_CODES)}, got {self.learn!r}")
        if self.T < 1:
            raise ValueError(f"T must be at least 1, got {self.T}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        # The CLI refuses these at parse time (stoprt.cli_args); API callers get the same checks here.
        for name in ("size", "n_train", "n_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name in ("lr", "width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def update_schedule(self) -> str | int:
        return int(self.update) if str(self.update).isdigit() else self.update


def load_data(cfg: TrainConfig, split: str):
    """A dataset of (frames [T, C, H, W], label): a built-in source or a dataset folder."""
    from .datasets import EventFrames, load_builtin  # imported here: only training generates data
    if cfg.data in ("digits", "gestures"):
        data = load_builtin(cfg.data, split=split, T=cfg.T, size=cfg.size, seed=cfg.seed)
    else:
        from .folders import load_folder
        data = load_folder(cfg.data, split=split, T=cfg.T, size=cfg.size)
    n = cfg.n_train if split == "train" else cfg.n_test
    if n is None or n >= len(data):
        return data
    # A prefix of the fixed split, so quick runs never mix training and test samples.
    if isinstance(data, EventFrames):
        return EventFrames(data.frames[:n], data.labels[:n], data.class_names)
    data.files = data.files[:n]
    return data


def build(cfg: TrainConfig, input_shape: tuple[int, ...], classes: int) -> tuple[torch.nn.Module, Learner]:
    """The model and its learner for ``cfg``."""
    torch.manual_seed(cfg.seed)
    net = models.build_model(cfg.model, in_channels=input_shape[0], size=input_shape[-1],
                             classes=classes, width=cfg.width, readout=cfg.readout, **cfg.model_kwargs)
    net.to(cfg.device)
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    optimizer = opt_cls(net.parameters(), lr=cfg.lr)
    if cfg.method == "stop":
        learner = STOP(net, optimizer, learn=LEARN_CODES[cfg.learn], update=cfg.update_schedule(), loss=cfg.loss)
    else:
        learner = BPTT(net, optimizer, loss=cfg.loss)
    return net, learner


def run_sample(learner: Learner, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Stream one batch of samples ``x`` [B, T, ...] step by step through the learner."""
    for x_t in x.transpose(0, 1):
        learner.step(x_t, y)
    return learner.end_sample()


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # torch._dynamo (imported by the first optimizer) imports torch.distributed._shard, which
        # keeps ten references to the process group that exists at that moment. That group then
        # outlives destroy_process_group: gloo's worker threads ran into interpreter shutdown and
        # aborted the process (SIGABRT, 3 runs in 38 on a loaded 2-core machine). Imported first, it
        # holds nothing, and destroy_process_group joins the workers.
        import torch._dynamo  # noqa: F401
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _average_gradients(world: int):
    def sync(params: list[torch.Tensor]) -> None:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world
    return sync


def _sum_across(values: list[float], world: int, device: str) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def evaluate(learner: Learner, loader: DataLoader, device: str, world: int = 1) -> float:
    """Held-out accuracy (summed over processes when data-parallel)."""
    correct = total = 0
    for x, y in loader:
        pred = learner.predict(x.to(device).transpose(0, 1))
        correct += int((pred.cpu() == y).sum())
        total += len(y)
    correct, total = _sum_across([correct, total], world, device)
    return correct / max(total, 1)


def _ranks_in_sync(net: torch.nn.Module) -> bool:
    """Whether every process ends with identical parameters (they must, with averaged gradients)."""
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))


class _EpochOrder(Sampler):
    """This process's sample order in one epoch (``DistributedSampler``: shuffled by seed + epoch,
    sharded when data-parallel), starting after the samples a resumed run has already learned."""

    def __init__(self, base: DistributedSampler) -> None:
        self.base, self.skip = base, 0

    def start(self, epoch: int, skip: int) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)


def _rng_states() -> dict:
    """Every RNG a training step may draw from (numpy's key array as a list: checkpoints hold no numpy)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"].cpu())  # a checkpoint loaded onto CUDA moved it there
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def _restore(path: str, cfg: TrainConfig, net, learner: Learner) -> dict:
    """Load a checkpoint into ``net`` and ``learner``; returns it (position, history, RNG states)."""
    state = load_checkpoint(path, map_location=cfg.device)
    check_finite(state["model_state"], path)
    net.load_state_dict(state["model_state"])
    learner.optimizer.load_state_dict(state["optimizer_state"])
    for key, value in (state.get("stats") or {}).items():
        setattr(learner.stats, key, value)
    return state


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Train per ``cfg``; returns the final metrics and the per-epoch history."""
    cfg.validate()
    rank, world = _distributed()
    train_set, test_set = load_data(cfg, "train"), load_data(cfg, "test")
    net, learner = build(cfg, train_set.input_shape, train_set.num_classes)
    if cfg.calibrate_bn and not resume:
        calibrate_batchnorm(net, (x.to(cfg.device).transpose(0, 1) for x, _ in
                                  itertools.islice(DataLoader(train_set, cfg.batch_size), cfg.calibrate_bn)))
    state = _restore(resume, cfg, net, learner) if resume else {}
    start_epoch = int(state.get("epoch", 0))
    position = state.get("position") or {}  # mid-epoch: batches done and the epoch's running counts
    history: list[dict] = list(state.get("history") or [])
    if world > 1:
        for t in list(net.parameters()) + list(net.buffers()):
            dist.broadcast(t.data, 0)
        learner.grad_sync = _average_gradients(world)
    order = _EpochOrder(DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed))
    # The loader's own generator only seeds workers; with it, iterating draws nothing from torch's RNG.
    train_loader = DataLoader(train_set, cfg.batch_size, sampler=order,
                              generator=torch.Generator().manual_seed(cfg.seed), drop_last=False)
    test_sampler = DistributedSampler(test_set, world, rank, shuffle=False) if world > 1 else None
    test_loader = DataLoader(test_set, cfg.batch_size, sampler=test_sampler)
    out_dir = Path(cfg.out_dir) if cfg.out_dir and rank == 0 else None
    if out_dir:
        for name in ("checkpoint.pt", "metrics.csv", "metrics.json", "result.json"):
            remove_stale_temporaries(out_dir / name)
    if state.get("rng"):
        _set_rng_states(state["rng"])
    for epoch in range(start_epoch, cfg.epochs):
        done = int(position.get("batch", 0)) if epoch == start_epoch else 0
        order.start(epoch, done * cfg.batch_size)
        net.train()
        bar = ProgressBar(len(train_loader), f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and rank == 0)
        correct, seen, seconds0 = (position["correct"], position["seen"], position["seconds"]) if done else (0, 0, 0.0)
        steps0 = position["steps0"] if done else learner.stats.steps
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(train_loader, start=done):
            x, y = x.to(cfg.device), y.to(cfg.device)
            pred = run_sample(learner, x, y)
            correct += int((pred == y).sum())
            seen += len(y)
            bar.update(1, acc=correct / seen, loss=learner.stats.last_loss)
            if out_dir and cfg.checkpoint_every and (i + 1) % cfg.checkpoint_every == 0:
                _save(out_dir / "checkpoint.pt", cfg, net, learner, epoch, train_set, history,
                      {"batch": i + 1, "correct": correct, "seen": seen, "steps0": steps0,
                       "seconds": seconds0 + time.perf_counter() - t0})
        bar.close()
        seconds = seconds0 + time.perf_counter() - t0
        steps = learner.stats.steps - steps0
        correct, seen = _sum_across([correct, seen], world, cfg.device)
        record = {"epoch": epoch + 1, "train_acc": correct / max(seen, 1),
                  "test_acc": evaluate(learner, test_loader, cfg.device, world),
                  "last_loss": learner.stats.last_loss, "seconds": seconds,
                  "steps_per_s": steps / seconds if seconds > 0 else 0.0,
                  "updates": learner.stats.updates, "rejected_updates": learner.stats.rejected_updates,
                  "peak_rss_mib": peak_rss_mib()}
        history.append(record)
        if out_dir:
            _save(out_dir / "checkpoint.pt", cfg, net, learner, epoch + 1, train_set, history, None)
            write_metrics(out_dir, history)
    result = {"config": asdict(cfg), "world_size": world, "history": history,
              "ranks_in_sync": _ranks_in_sync(net) if world > 1 else None,
              "final_test_acc": history[-1]["test_acc"] if history else None}
    if out_dir:
        write_text(out_dir / "result.json", json.dumps(result, indent=2))
    return result


def _save(path: Path, cfg: TrainConfig, net, learner: Learner, epoch: int, data, history: list[dict],
          position: dict | None) -> None:
    """``epoch``: epochs completed; ``position``: where in the next epoch (None: at its start)."""
    save_checkpoint(path, {
        "model": {"name": cfg.model, "kwargs": {"in_channels": data.input_shape[0], "size": data.input_shape[-1],
                                                "classes": data.num_classes, "width": cfg.width,
                                                "readout": cfg.readout, **cfg.model_kwargs}},
        "input_spec": {"source": cfg.data, "T": cfg.T, "shape": list(data.input_shape)},
        "model_state": net.state_dict(), "optimizer_state": learner.optimizer.state_dict(),
        "epoch": epoch, "position": position, "history": history, "rng": _rng_states(),
        "stats": learner.stats.as_dict(), "config": asdict(cfg),
    })


def write_metrics(out_dir: Path, history: list[dict]) -> None:
    """Per-epoch metrics as ``metrics.csv`` and ``metrics.json`` (each replaced atomically)."""
    with atomic_path(out_dir / "metrics.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    write_text(out_dir / "metrics.json", json.dumps(history, indent=2))
