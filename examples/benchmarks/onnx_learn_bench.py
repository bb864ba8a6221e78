"""The ONNX learning graphs against eager STOP: parity over 200 steps and time per learning step.

For each net (``mlp``, ``dvs_gesture``, ``vgg11`` at width 0.25, ``resnet18`` at width 0.125; 2-channel
event frames): export the learning and update graphs (SGD, momentum, weight decay), then

* **parity**: eager STOP (torch SGD) and :class:`~stoprt.export.ort_learner.OrtLearner` learn from the
  same random frames and labels for ``--steps`` steps, updating per sample and per step; reported:
  the largest parameter difference, steps whose outputs differ, and threshold ties (a LIF layer whose
  spikes differ where eager's |U - th| is below 1e-5: float32 summation order, see
  ``tests/test_onnx_learn.py``); and the same run of eager STOP against itself with one threshold moved
  by one float32 ulp (``eager_vs_eager_1ulp``): how far a rounding-level difference grows in this run,
  the bar no two float32 implementations (ORT's kernels sum in another order than torch's) can beat;
* **time per learning step** at batch 1 and 16, 1 thread: ORT (IO-bound graph), torch eager STOP and
  the static torch step (``compile="static"``), each timed in the same process, so ratios compare.

Results go to ``docs/results/onnx-learn/<machine>/onnx_learn.json`` (atomically) and are printed.
Run: ``python examples/benchmarks/onnx_learn_bench.py [--nets mlp dvs_gesture] [--steps 200]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stoprt.export.onnx_learn import export_learn_step
from stoprt.export.onnx_update import export_update
from stoprt.export.ort_learner import OrtLearner
from stoprt.runtime import layers as L
from stoprt.runtime import models
from stoprt.runtime.atomic import write_text
from stoprt.runtime.stop import STOP

NETS = {"mlp": dict(size=32), "dvs_gesture": dict(size=32, width=0.25),
        "vgg11": dict(in_channels=2, size=16, width=0.25), "resnet18": dict(in_channels=2, size=16, width=0.125)}
LR, MOMENTUM, DECAY, T = 0.02, 0.9, 1e-3, 10


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = models.build_model(name, **NETS[name])
    L.freeze_batchnorm(net)
    with torch.no_grad():
        net(torch.zeros(2, *net.input_shape))
        for m in net.modules():
            if isinstance(m, (L.Linear, L.Conv2d)):
                m.weight.mul_(3.0)  # a net that spikes from the first sample on
            if isinstance(m, L.Dropout):
                m.eval()  # the graph runs dropout off (deploy)
    L.reset_state(net)
    return net


def frames(rng, shape, batch):
    return (rng.random((batch, *shape)) < 0.3).astype(np.float32) * 2.0, rng.integers(0, 10, batch)


def _nudged(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with one threshold of its first LIF moved up by one float32 ulp."""
    lif = next(m for m in net.modules() if isinstance(m, L.LIF))
    with torch.no_grad():
        th = lif.threshold.view(-1)
        th[0] = torch.nextafter(th[0], torch.tensor(float("inf")))
    return net


def _spike_gap(net: torch.nn.Module, spikes: dict[str, np.ndarray]) -> float | None:
    """None when every LIF of ``net`` (eager) spiked as ``spikes`` (by layer path); else the largest
    |U - th| of eager at the differing neurons of the first layer that differs."""
    for path, m in net.named_modules():
        if isinstance(m, L.LIF):
            s_e = m.s.detach().numpy()
            if not np.array_equal(s_e, spikes[path]):
                return float((m.u - m.threshold).detach().abs().numpy()[s_e != spikes[path]].max())
    return None


def parity(name: str, learn, upd, update: str, steps: int) -> dict:
    """ORT against eager STOP; and, as the run's own float32 sensitivity, eager STOP against itself
    with one threshold moved by one ulp (a difference the size of one rounding error)."""
    net, twin = build(name), _nudged(build(name))
    stop, stop_twin = (STOP(n, torch.optim.SGD(n.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY),
                            update=update, compile="eager") for n in (net, twin))
    ort = OrtLearner(learn, upd, net.state_dict(), lr=LR, update=update)
    lifs = [path for path, m in net.named_modules() if isinstance(m, L.LIF)]
    rng = np.random.default_rng(2)
    differ = ties = spikes_differ = twin_differ = 0
    first = first_twin = None
    for t in range(steps):
        x, y = frames(rng, net.input_shape, 3)
        out_e = stop.step(torch.from_numpy(x), torch.from_numpy(y)).numpy()
        out_o = ort.step(x, y)
        stop_twin.step(torch.from_numpy(x), torch.from_numpy(y))
        differ += int(not np.allclose(out_e, out_o, rtol=1e-5, atol=1e-5))
        state = ort.state()
        gap = _spike_gap(net, {path: state[f"state.{path}.s"] for path in lifs})
        if gap is not None:
            ties += int(gap < 1e-5)
            spikes_differ += 1
            first = t if first is None else first
        modules = dict(twin.named_modules())
        if _spike_gap(net, {path: modules[path].s.detach().numpy() for path in lifs}) is not None:
            twin_differ += 1
            first_twin = t if first_twin is None else first_twin
        if (t + 1) % T == 0:
            for learner in (stop, ort, stop_twin):
                learner.end_sample()
    got, theirs = ort.parameters(), twin.state_dict()
    diff = max(float(np.abs(got[k] - p.numpy()).max()) for k, p in net.state_dict().items() if k in got)
    twin_diff = max(float((theirs[k] - p).abs().max()) for k, p in net.state_dict().items() if k in got)
    return {"update": update, "steps": steps, "max_param_diff": diff, "steps_outputs_differ": differ,
            "threshold_ties": ties, "steps_spikes_differ": spikes_differ, "first_step_spikes_differ": first,
            "updates": ort.updates,
            "eager_vs_eager_1ulp": {"max_param_diff": twin_diff, "steps_spikes_differ": twin_differ,
                                    "first_step_spikes_differ": first_twin}}


def step_time(step, batch: int, shape, reps: int) -> float:
    rng = np.random.default_rng(0)
    data = [frames(rng, shape, batch) for _ in range(8)]
    for x, y in data[:3]:
        step(x, y)
    start = time.perf_counter()
    for i in range(reps):
        step(*data[i % 8])
    return (time.perf_counter() - start) / reps * 1e6


def timing(name: str, learn, upd, batch: int, reps: int) -> dict:
    out = {}
    ort_net = build(name)
    ort = OrtLearner(learn, upd, ort_net.state_dict(), lr=LR, update=10 ** 9)  # steps only, no update
    out["ort_us"] = step_time(ort.step, batch, ort_net.input_shape, reps)
    for mode in ("eager", "static"):
        net = build(name)
        stop = STOP(net, torch.optim.SGD(net.parameters(), lr=LR), update=10 ** 9, compile=mode)
        out[f"torch_{mode}_us"] = step_time(lambda x, y: stop.step(torch.from_numpy(x), torch.from_numpy(y)),
                                            batch, net.input_shape, reps)
    out["ort_over_eager"] = out["ort_us"] / out["torch_eager_us"]
    return out


def _cpu_name() -> str:
    """``amd-epyc`` from /proc/cpuinfo's first model name (two words), else the machine type."""
    try:
        model = next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
        return "-".join(model.split(":", 1)[1].split()[:2]).lower()
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", default=None, help="result folder (default docs/results/onnx-learn/<machine>)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = f"cpu-{_cpu_name()}-{os.cpu_count()}c"
    results = {"machine": platform.platform(), "cpu": platform.processor(), "threads": 1,
               "note": "shared, loaded machine: compare ratios within one run", "nets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets:
            net = build(name)
            t0 = time.process_time()
            learn, upd = Path(tmp, f"{name}.onnx"), Path(tmp, f"{name}-update.onnx")
            sig = export_learn_step(net, learn)
            export_update(net, [[n, dict(sig.params)[n]] for n in sig.learned], upd, momentum=MOMENTUM,
                          weight_decay=DECAY)
            entry = {"config": NETS[name], "export_cpu_s": time.process_time() - t0,
                     "parity": [parity(name, learn, upd, u, args.steps) for u in ("sample", "step")],
                     "step_time": {str(b): timing(name, learn, upd, b, args.reps) for b in (1, 16)}}
            results["nets"][name] = entry
            print(name, json.dumps(entry), flush=True)
    folder = Path(args.out or Path(__file__).resolve().parents[2] / "docs/results/onnx-learn" / machine)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "onnx_learn.json", json.dumps(results, indent=2))
    print("wrote", folder / "onnx_learn.json")


if __name__ == "__main__":
    main()
