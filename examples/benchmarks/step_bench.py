"""Per-step cost of STOP at streaming batch sizes: eager and static learner against the plain-torch floor.

    python examples/benchmarks/step_bench.py                     # CPU, 1 thread -> docs/results/step/<machine>/
    python examples/benchmarks/step_bench.py --device cuda       # on a GPU (adds the CUDA-graphed floor)
    python examples/benchmarks/step_bench.py --quick --out runs/q   # smoke run (seconds)

Rows, per network (``mlp`` 2x16x16 as in the demo, ``dvs_gesture`` and ``vgg11`` at 2x32x32) and batch
(1 and 16), in microseconds per time step:

* ``eager_learn`` / ``eager_infer``: the reference learner (``compile="eager"``), STOP-WTL with a
  target / a step without one;
* ``eager_predict`` / ``static_predict``: ``STOP.infer`` (a sample that will not learn: the traces do
  not advance);
* ``static_learn`` / ``static_infer``: the static step (``compile="static"``; CUDA graphs on CUDA,
  with Adam ``capturable=True`` there, so that the update is a graph too, as ``stoprt stream`` makes
  it). Marked not available, with the reason, where this checkout's STOP has no ``compile`` argument;
* ``fused_learn`` / ``fused_infer`` / ``fused_predict``: the static step compiled by ``torch.compile``
  (``compile="fused"``; also CUDA graphs on CUDA), for the ``--fused-nets`` at the ``--fused-batches``
  only (each is a compile of seconds to a minute); marked not available where this checkout's STOP
  has no such mode;
* ``floor_fwd_bwd`` / ``floor_fwd``: the same synaptic ops, frozen BatchNorm and pooling with ReLU in
  place of every neuron, in torch's own layers (``core_bench.floor_stack``), forward+backward and
  forward alone (no_grad);
* ``floor_graph`` (CUDA only): that forward+backward captured once in a CUDA graph and replayed
  (its Adam step at the sample's end runs eagerly, outside the graph).

A sample is ``--T`` steps and its end (one Adam update for the learning rows and the floor's
forward+backward); its time / T is the time per step. Rows run interleaved ``--repeats`` times
after a warm-up; the median and the best are kept, and the first warm-up sample's seconds
(``first_sample_s``: building the program, capturing graphs, compiling). Also measured:

* memory flat in T under the static step (eager where static is absent): the CUDA allocator peak
  (``max_memory_allocated``) of one sample of T = 10, 100, 1000 steps; on CPU the bytes held
  between steps (state and traces, or the static program's buffers; exact) and the process RSS
  growth over the sample (coarse);
* ``stoprt stream --source builtin:digits --learn --threads 1`` steps/s (a subprocess, its --json
  summary), the time from the command's start to its first step (``first_step_s``, from the
  summary), and the command's wall time outside streaming (start-up and teardown);
* the stream loop's own cost: the same learner calls replayed bare, through :class:`StreamSession`
  over pre-binned steps, and through session + :class:`StreamPipeline` + the built-in source (the
  loop alone: learners and sources are built before the clock starts), in ``--overhead-processes``
  fresh processes (``stream_loop.py``; the median over them).

``vgg11`` runs at width ``--vgg-width`` (0.25 on CPU by default: 16-128 channels; 1.0 on CUDA).
The printed rows, the JSON and the Markdown page are ``step_report.py``'s.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_bench import floor_stack  # noqa: E402  (the one plain-torch floor builder)
from step_report import print_rows, save  # noqa: E402
from stream_loop import stream_overhead_processes, stream_rate  # noqa: E402

from stoprt.runtime import layers as L, models, stop as stop_module  # noqa: E402
from stoprt.runtime.stop import STOP  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NETS = {"mlp": {"size": 16, "classes": 10}, "dvs_gesture": {"size": 32, "classes": 11},
        "vgg11": {"size": 32, "classes": 10}}
ROWS = ("eager_learn", "eager_infer", "eager_predict", "static_learn", "static_infer", "static_predict",
        "fused_learn", "fused_infer", "fused_predict", "floor_fwd_bwd", "floor_fwd")
EXPECTED_MODES = {"static": ("static", "graphs"), "fused": ("fused", "fused_graphs")}  # learner.mode per row kind


def fused_unavailable() -> str | None:
    """Why the fused step cannot be measured here, or None."""
    if "fused" not in getattr(stop_module, "COMPILE_MODES", ()):
        return "this checkout's STOP has no compile='fused'"
    return None


def static_unavailable() -> str | None:
    """Why the static step cannot be measured here, or None when STOP takes ``compile=``."""
    if "compile" not in inspect.signature(STOP).parameters:
        return "this checkout's STOP has no compile= argument (static step not merged)"
    return None


def build_net(name: str, args, device: torch.device) -> L.Sequential:
    kw = dict(NETS[name], in_channels=2)
    if name == "vgg11":
        kw["width"] = args.vgg_width
    if args.quick:
        kw["size"] = min(kw["size"], 16)
        kw["width"] = 0.125 if name == "vgg11" else 0.25
    return models.build_model(name, **kw).to(device)


def learner(net: L.Sequential, mode: str, loss="ce") -> STOP:
    """STOP-WTL with Adam; the static learner on a GPU with ``capturable=True`` (as ``stoprt stream
    --device cuda`` makes it), so that its update is a graph too."""
    extra = {"compile": mode} if static_unavailable() is None else {}
    capturable = mode != "eager" and next(net.parameters()).is_cuda
    return STOP(net, torch.optim.Adam(net.parameters(), lr=1e-3, capturable=capturable), update="sample", loss=loss,
                **extra)


def held_tensors(lrn: STOP) -> list[torch.Tensor]:
    """What the learner keeps between steps: the static program's buffers, else the layers' state."""
    engine = getattr(lrn, "_static", None)
    return engine.state() if engine is not None else L.state_tensors(lrn.net)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graphed_floor(floor: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor):
    """``(static input, graph)``: one forward+backward of ``floor`` captured as a CUDA graph (the
    documented warm-up on a side stream first; gradients are created inside the capture)."""
    static_x = x0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            floor.zero_grad(set_to_none=True)
            F.cross_entropy(floor(static_x), y).backward()
    torch.cuda.current_stream().wait_stream(side)
    floor.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        F.cross_entropy(floor(static_x), y).backward()
    return static_x, graph


def runners(name: str, batch: int, args, device: torch.device) -> tuple[dict, dict]:
    """``({row: run one sample}, {row: why not available}, {row: its learner})`` for one network
    and batch size."""
    torch.manual_seed(0)
    net = build_net(name, args, device)
    shape = (batch, *net.input_shape)
    xs = [(torch.rand(shape, device=device) < 0.15).float() for _ in range(args.T)]
    y = torch.randint(0, NETS[name]["classes"], (batch,), device=device)
    floor = floor_stack(copy.deepcopy(net).cpu()).to(device)
    floor_opt = torch.optim.Adam(floor.parameters(), lr=1e-3)
    runs, missing = {}, {}
    modes = {"eager": learner(copy.deepcopy(net), "eager")}
    runs_on = {}
    why = static_unavailable()
    if why is None:
        try:
            modes["static"] = learner(copy.deepcopy(net), "static")
        except Exception as err:  # a refusal is a result: report it, time the rest
            why = f"STOP(compile='static') failed: {type(err).__name__}: {err}"
    if why is not None:
        missing["static_learn"] = missing["static_infer"] = missing["static_predict"] = why
    why = fused_unavailable()
    if why is None and (name not in args.fused_nets or batch not in args.fused_batches):
        why = "not run for this net and batch (--fused-nets, --fused-batches)"
    if why is None:
        modes["fused"] = learner(copy.deepcopy(net), "fused")
    else:
        missing["fused_learn"] = missing["fused_infer"] = missing["fused_predict"] = why
    for mode, lrn in modes.items():
        def learn(lrn=lrn):
            for x in xs:
                lrn.step(x, y)
            lrn.end_sample()

        def infer(lrn=lrn):
            for x in xs:
                lrn.step(x)
            lrn.end_sample()
        runs[f"{mode}_learn"], runs[f"{mode}_infer"] = learn, infer
        runs_on[f"{mode}_learn"] = runs_on[f"{mode}_infer"] = lrn
        if hasattr(lrn, "infer"):
            def predict(lrn=lrn):
                for x in xs:
                    lrn.infer(x)
                lrn.end_sample()
            runs[f"{mode}_predict"], runs_on[f"{mode}_predict"] = predict, lrn
        else:
            missing[f"{mode}_predict"] = "this checkout's STOP has no infer()"

    def floor_fwd_bwd():
        for x in xs:
            F.cross_entropy(floor(x), y).backward()
        floor_opt.step()
        floor_opt.zero_grad(set_to_none=True)

    def floor_fwd():
        with torch.no_grad():
            for x in xs:
                floor(x)
    runs["floor_fwd_bwd"], runs["floor_fwd"] = floor_fwd_bwd, floor_fwd
    if device.type == "cuda":
        g_floor = copy.deepcopy(floor)
        g_opt = torch.optim.Adam(g_floor.parameters(), lr=1e-3)
        try:
            static_x, graph = graphed_floor(g_floor, xs[0], y)
        except Exception as err:  # reported as a row that is not available
            missing["floor_graph"] = f"capture failed: {type(err).__name__}: {err}"
        else:
            def floor_graph():
                for x in xs:
                    static_x.copy_(x)
                    graph.replay()
                g_opt.step()  # eager, on the gradients the graph wrote (they keep their addresses)
            runs["floor_graph"] = floor_graph
    return runs, missing, runs_on


def time_rows(runs: dict, missing: dict, args, device: torch.device) -> tuple[dict[str, list[float]], dict]:
    """Seconds per step of each row, ``repeats`` interleaved samples after warm-up samples, and the
    seconds of each row's first sample. A row that raises is dropped into ``missing`` with the error;
    the others go on."""
    first = {}
    for k, fn in list(runs.items()):
        try:
            for i in range(1 if args.quick else 2):
                t0 = time.perf_counter()
                fn()
                sync(device)
                if i == 0:
                    first[k] = time.perf_counter() - t0
        except Exception as err:
            missing[k] = f"{type(err).__name__}: {err}"
            del runs[k]
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) / args.T)
    return times, first


def step_table(args, device: torch.device) -> list[dict]:
    rows = []
    for name in args.nets:
        for batch in args.batches:
            runs, missing, runs_on = runners(name, batch, args, device)
            times, first = time_rows(runs, missing, args, device)
            for row in (*ROWS, *(("floor_graph",) if device.type == "cuda" else ())):
                entry = {"net": name, "batch": batch, "row": row, "available": row in times}
                if row in times:
                    entry.update(median_us=1e6 * statistics.median(times[row]), best_us=1e6 * min(times[row]),
                                 first_sample_s=first[row])
                    if row in runs_on:  # how the learner ran in the end (a fallback shows here)
                        entry["mode"] = runs_on[row].mode if hasattr(runs_on[row], "mode") else "eager"
                        expected = EXPECTED_MODES.get(row.split("_")[0])
                        if expected and entry["mode"] not in expected:
                            entry["note"] = f"fell back to {entry['mode']}"
                        pool = getattr(runs_on[row], "graph_pool_bytes", lambda: None)()
                        if pool is not None:
                            entry["graph_pool_mib"] = pool / 2**20
                else:
                    entry["why"] = missing.get(row, "not measured")
                rows.append(entry)
            add_ratios(rows[-len(ROWS) - (device.type == "cuda"):])
            print_rows(rows[-len(ROWS) - (device.type == "cuda"):], flush=True)
    return rows


def add_ratios(group: list[dict]) -> None:
    """Each STOP row over its floor (learn over forward+backward, infer over forward; medians)."""
    by = {r["row"]: r for r in group if r["available"]}
    for r in group:
        if not r["available"] or r["row"].startswith("floor"):
            continue
        base = "floor_fwd_bwd" if r["row"].endswith("learn") else "floor_fwd"
        if base in by:  # medians, and bests (the least disturbed runs: steadier on a loaded machine)
            r["over_floor"] = r["median_us"] / by[base]["median_us"]
            r["over_floor_best"] = r["best_us"] / by[base]["best_us"]
        if r["row"].endswith("learn") and "floor_graph" in by:
            r["over_floor_graph"] = r["median_us"] / by["floor_graph"]["median_us"]
            r["over_floor_graph_best"] = r["best_us"] / by["floor_graph"]["best_us"]


def memory_in_T(args, device: torch.device) -> dict:
    """One sample of T steps for each T: CUDA allocator peak, or held state bytes and RSS on CPU."""
    mode = "static" if static_unavailable() is None else "eager"
    torch.manual_seed(0)
    net = build_net(args.memory_net, args, device)
    lrn = learner(net, mode)
    y = torch.randint(0, NETS[args.memory_net]["classes"], (1,), device=device)
    frames = [(torch.rand((1, *net.input_shape), device=device) < 0.15).float() for _ in range(8)]

    def sample(T: int) -> int:
        held = 0
        for t in range(T):
            lrn.step(frames[t % len(frames)], y)
            if t == T - 1:  # what the network holds between steps, each storage once
                held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                            for t in held_tensors(lrn)}.values())
        lrn.end_sample()
        sync(device)
        return held

    sample(3)  # warm-up: optimizer state, capture, first-use allocations
    out = {"net": args.memory_net, "batch": 1, "learner": getattr(lrn, "mode", mode), "rows": []}
    proc = psutil.Process()
    for T in args.memory_Ts:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = proc.memory_info().rss
        held = sample(T)
        row = {"T": T, "held_state_bytes": held, "rss_growth_mib": (proc.memory_info().rss - rss0) / 2**20}
        if device.type == "cuda":
            row["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["rows"].append(row)
    key = "cuda_peak_allocated_mib" if device.type == "cuda" else "held_state_bytes"
    vals = [r[key] for r in out["rows"]]
    out.update(measure=key, spread=max(vals) / min(vals) - 1 if min(vals) > 0 else float("nan"))
    return out


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": list(os.getloadavg())}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    slug = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or f"{cpu} {info['cores']}c").lower()).strip("-")
    info["name"] = ("cuda-" if device.type == "cuda" else "cpu-") + slug
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="default docs/results/step/<machine>/")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--T", type=int, default=20, help="steps per timed sample")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--vgg-width", type=float, default=None, help="default 0.25 on CPU, 1.0 on CUDA")
    p.add_argument("--fused-nets", nargs="*", default=["mlp", "dvs_gesture"], choices=list(NETS),
                   help="nets with fused rows (each a torch.compile)")
    p.add_argument("--fused-batches", type=int, nargs="*", default=[1])
    p.add_argument("--memory-net", default="dvs_gesture", choices=list(NETS))
    p.add_argument("--memory-Ts", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--stream-source", default="builtin:digits")
    p.add_argument("--stream-steps", type=int, default=None)
    p.add_argument("--stream-timeout", type=float, default=600)
    p.add_argument("--overhead-samples", type=int, default=20)
    p.add_argument("--overhead-repeats", type=int, default=15)
    p.add_argument("--overhead-processes", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("step_bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.vgg_width is None:
        args.vgg_width = 1.0 if device.type == "cuda" else 0.25
    if args.quick:
        args.T, args.repeats, args.memory_Ts, args.memory_net = 3, 1, [3, 6, 12], "mlp"
        args.stream_source, args.stream_steps, args.overhead_samples, args.overhead_repeats = \
            "builtin:digits:5", 40, 3, 1
        args.overhead_processes, args.fused_nets = 1, ["mlp"]
    info = machine(device)
    out = Path(args.out or ROOT / "docs" / "results" / "step" / info["name"])
    why = static_unavailable()
    print(f"step_bench on {info['name']} (torch {info['torch']}, {args.threads} thread(s))"
          + (f"; static rows n/a: {why}" if why else ""), flush=True)
    result = {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "out"}}
    out.mkdir(parents=True, exist_ok=True)
    result["steps"] = step_table(args, device)
    save(result, out)  # after every stage: a run cut short keeps what it measured
    print("memory over one sample:", flush=True)
    result["memory"] = memory_in_T(args, device)
    save(result, out)
    for r in result["memory"]["rows"]:
        print(f"  T={r['T']:5d}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in r.items() if k != "T"), flush=True)
    print(f"  spread of {result['memory']['measure']}: {100 * result['memory']['spread']:.2f}% (target within 2%)")
    result["stream"] = stream_rate(args, device)
    save(result, out)
    s = result["stream"]
    print(f"stream: {s.get('steps_per_s', float('nan')):.0f} steps/s, first step after "
          f"{s.get('first_step_s') or float('nan'):.2f} s, outside streaming {s.get('startup_s', float('nan')):.2f} s"
          + (f" (failed: {s['error']})" if "error" in s else ""), flush=True)
    if device.type == "cpu":
        o = result["stream_overhead"] = stream_overhead_processes(args)
        print(f"stream loop: bare {o['bare_wall_us_per_step']:.1f} us/step (CPU {o['bare_cpu_us_per_step']:.1f}), "
              f"session {100 * o['session_overhead_wall']:+.1f}% (CPU {100 * o['session_overhead_cpu']:+.1f}%), "
              f"session + pipeline {100 * o['session_pipeline_overhead_wall']:+.1f}% "
              f"(CPU {100 * o['session_pipeline_overhead_cpu']:+.1f}%) (target <= +10%)")
    save(result, out)
    print(f"wrote {out / 'step_bench.json'} and {out / 'step_bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
