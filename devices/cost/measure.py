"""Measuring one profile configuration in this process: the child side of ``stoprt profile``.

Run as ``python -m stoprt.devices.cost.measure '<json config>'``; prints one JSON row on stdout. Each
configuration gets a fresh process because RSS peaks and allocator caches never shrink back cleanly.

Views, each taken around one sample of T steps after a warm-up sample (optimizer state, thread pools
and first-use allocations exist by then):

* allocator (CUDA only): ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``;
* process: RSS sampled every millisecond in a thread (:class:`~stoprt.devices.cost.meters.RSSPeak`), minus the RSS just before the sample, taken
  after ``gc`` and glibc's ``malloc_trim(0)`` (which hand memory freed earlier back to the OS);
* system: MemTotal - MemAvailable, sampled by :class:`~stoprt.devices.sampler.TelemetrySampler`
  (which also integrates power rails into energy where they are readable);
* exact autograd view: distinct storages saved for backward together with the layers' state tensors
  (:class:`~stoprt.devices.cost.meters.SavedTensorsMeter`). Deterministic, so it is what the planner is
  tested against.

The meters themselves are in :mod:`stoprt.devices.cost.meters`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import resource
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import Tensor, nn

from ..backends import SYSTEM_USED
from ..sampler import TelemetrySampler
from ..sysfs import read_system_memory
from ...export.runners import TorchStepRunner, make_runner
from .meters import RSSPeak, SavedTensorsMeter, release_free_memory
from .workloads import load_workload

MIB = 2**20
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


class RunnerUnavailable(RuntimeError):
    """An inference backend that cannot run here; the message says why (the row is "skipped")."""


def inference_runner(cfg: dict, net: nn.Module):
    """The step runner of ``cfg["backend"]`` (default torch); raises RunnerUnavailable."""
    backend = cfg.get("backend", "torch")
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise RunnerUnavailable("tensorrt is not importable here")
    return make_runner(backend, net, cfg.get("device", "cpu"), threads=cfg.get("threads"))


def _frames(batch: int, shape: tuple[int, ...], device: torch.device, seed: int):
    """Sparse random spike frames; each step gets its own copy, as frames of a stream would arrive."""
    g = torch.Generator().manual_seed(seed)
    pool = [(torch.rand(batch, *shape, generator=g) < 0.15).float().to(device) for _ in range(4)]
    step = 0
    while True:
        yield pool[step % len(pool)].clone()
        step += 1


def _limit_memory(limit_mib: float | None, device: torch.device) -> float | None:
    """Cap further host allocations at ``limit_mib`` beyond the current data size (RLIMIT_DATA), to see
    how a configuration behaves with less memory. On CPU the cap defaults to 90% of MemAvailable, so a
    run that does not fit fails its allocation cleanly instead of waking the kernel's OOM killer (which
    may pick another process). Returns the cap applied."""
    if not limit_mib and device.type == "cpu":
        available = read_system_memory().available_mib
        limit_mib = None if available is None else 0.9 * available
    if not limit_mib:
        return None
    status = Path("/proc/self/status").read_text()
    now = int(re.search(r"VmData:\s+(\d+) kB", status).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (now + int(limit_mib * MIB), resource.RLIM_INFINITY))
    return limit_mib


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or any(m in str(err).lower() for m in _OOM_MARKERS)


def _learner(cfg: dict, net: nn.Module, meter: SavedTensorsMeter):
    from ...runtime.bptt import BPTT
    from ...runtime.stop import STOP
    params = [p for p in net.parameters() if p.requires_grad]
    name = cfg.get("optimizer", "adam")
    if name == "adam":
        opt = torch.optim.Adam(params, lr=1e-4)
    else:
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9 if name == "sgd-momentum" else 0.0)
    if cfg["mode"] == "stop":
        return STOP(net, opt, update="sample", loss=meter.loss())
    return BPTT(net, opt, loss=meter.loss())


def _cuda_peaks(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"allocator_peak_mib": None, "allocator_reserved_peak_mib": None}
    torch.cuda.synchronize(device)
    return {"allocator_peak_mib": torch.cuda.max_memory_allocated(device) / MIB,
            "allocator_reserved_peak_mib": torch.cuda.max_memory_reserved(device) / MIB}


def _sample(step, end, frames, T: int, row: dict) -> None:
    row["steps_done"] = 0
    for _ in range(T):
        step(next(frames))
        row["steps_done"] += 1
    end()


def _timed_pass(run, device: torch.device, row: dict) -> None:
    """Time, energy, system and allocator views of one sample; filled in even if it fails."""
    telemetry = TelemetrySampler(["sysfs"], interval_s=0.05).start()
    t0 = time.perf_counter()
    try:
        run()
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, summary, done = time.perf_counter() - t0, telemetry.stop(), row["steps_done"]
        row["time_per_step_ms"] = 1e3 * seconds / done if done else None
        peak = summary.figures[SYSTEM_USED].peak if SYSTEM_USED in summary.figures else None
        base = row["system_used_baseline_mib"]
        row["system_used_peak_delta_mib"] = None if peak is None or base is None else peak - base
        energy = summary.total_energy_j
        row["energy_per_step_mj"] = None if energy is None or not done else 1e3 * energy / done
        row["power_rail"] = summary.total_rail
        row.update(_cuda_peaks(device))


def _memory_pass(run, meter: SavedTensorsMeter, row: dict, exact: bool) -> None:
    """Process view (1 ms RSS thread) and the exact autograd view of one sample."""
    release_free_memory()
    base = psutil.Process().memory_info().rss
    row["rss_baseline_mib"] = base / MIB
    rss = RSSPeak()
    rss.start()
    meter.reset()
    try:
        with meter:
            run()
    finally:
        row["rss_peak_delta_mib"] = max(rss.stop() - base, 0) / MIB
        if exact:
            row.update(saved_for_backward_peak_mib=meter.peak_saved / MIB,
                       saved_and_state_peak_mib=meter.peak_total / MIB, state_mib=meter.state_at_peak / MIB)


def measure(cfg: dict) -> dict:
    """Run one configuration here and return its row (``status`` "ok", or "oom" with partial views).

    Two passes of one sample each after the warm-up: a timed one with only the coarse telemetry
    sampler (time, energy, system and allocator views), then one with the 1 ms RSS thread and the
    saved-tensor hooks (process and exact views), so the measuring threads do not slow the timing.
    """
    torch.manual_seed(cfg.get("seed", 0))
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg.get("device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device here")
    net, _ = load_workload(cfg["model"], cfg.get("size"), cfg.get("width"), cfg.get("channels", 2),
                          cfg.get("classes"))
    net.to(device)
    mode, T, batch = cfg["mode"], cfg["T"], cfg["batch"]
    frames = _frames(batch, net.input_shape, device, cfg.get("seed", 0))
    meter = SavedTensorsMeter(net)
    learner, torch_backend = None, True
    if mode == "infer":
        runner = inference_runner(cfg, net)
        torch_backend = isinstance(runner, TorchStepRunner)

        def step(x):
            runner.step(x)
            if torch_backend:
                meter.snapshot()  # the state the layers keep (nothing is saved for backward)

        end = runner.reset
    else:
        learner = _learner(cfg, net, meter)
        y = torch.randint(0, 2, (batch,), device=device)

        def step(x):
            if mode == "stop":
                meter.new_step()  # the previous step's graph was freed by its backward
            learner.step(x, y)

        end = learner.end_sample
    row = {"status": "ok", "error": None, "steps_done": 0}
    _sample(step, end, frames, min(T, 3), row)  # warm-up: optimizer state, thread pools, first use
    row["persistent_mib"] = sum(t.numel() * t.element_size() for t in _persistent_tensors(net, learner)) / MIB
    release_free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    row["allocator_baseline_mib"] = torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else None
    row["system_used_baseline_mib"] = read_system_memory().used_mib
    rss_base = psutil.Process().memory_info().rss
    row["limit_mib"] = _limit_memory(cfg.get("limit_mib"), device)
    run = lambda: _sample(step, end, frames, T, row)  # noqa: E731
    try:
        _timed_pass(run, device, row)
        _memory_pass(run, meter, row, exact=torch_backend)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        row.update(status="oom", error=f"at step {row['steps_done'] + 1} of {T}: {str(err).splitlines()[0][:300]}")
        if "rss_peak_delta_mib" not in row:  # failed in the timed pass: the process's lifetime peak
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            row.update(rss_baseline_mib=rss_base / MIB, rss_peak_delta_mib=max(peak - rss_base, 0) / MIB)
    if mode == "stop" and row["status"] == "ok":  # after the passes: its memory is not in their views
        row["graph_pool_mib"] = graph_pool_mib(cfg, net, device)
    return row


def graph_pool_mib(cfg: dict, net: nn.Module, device: torch.device) -> float | None:
    """Device memory the static STOP step's CUDA graphs reserve in their private pool (learning step,
    update, inference step), for this network and batch; None on a CPU, which has no graphs.

    Read from a learner of its own, after one sample: the row's learner runs eager (its loss is the
    saved-tensor meter's, which the static step cannot differentiate).
    """
    if device.type != "cuda":
        return None
    import copy  # noqa: PLC0415
    from ...runtime.stop import STOP  # noqa: PLC0415
    twin = copy.deepcopy(net)
    params = [p for p in twin.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=1e-4, capturable=True) if cfg.get("optimizer", "adam") == "adam" else
           torch.optim.SGD(params, lr=1e-4, momentum=0.9 if cfg.get("optimizer") == "sgd-momentum" else 0.0))
    learner = STOP(twin, opt, update="sample")
    frames = _frames(cfg["batch"], net.input_shape, device, cfg.get("seed", 0))
    y = torch.randint(0, 2, (cfg["batch"],), device=device)
    for _ in range(3):
        learner.step(next(frames), y)
    learner.end_sample()
    pool = learner.graph_pool_bytes()
    return None if pool is None else pool / MIB


def _persistent_tensors(net: nn.Module, learner) -> list[Tensor]:
    tensors = list(net.parameters()) + list(net.buffers())
    if learner is not None:
        for state in learner.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return tensors


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m stoprt.devices.cost.measure '<json config>'", file=sys.stderr)
        return 2
    try:
        row = measure(json.loads(argv[0]))
    except RunnerUnavailable as err:
        row = {"status": "skipped", "error": str(err)}
    except ValueError as err:
        row = {"status": "error", "error": str(err)}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
