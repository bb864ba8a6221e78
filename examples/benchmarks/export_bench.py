"""Per-step inference latency of the export backends, export time and file sizes.

For the demo network (MLP, 2x16x16 input) and VGG-11 (width 1, 2x32x32), at batch 1 on the CPU:

* torch eager: the stoprt layers themselves (:class:`~stoprt.export.runners.TorchStepRunner`);
* torch.compile: the same pure step function that is exported, compiled with inductor (its compile
  time is reported; a failure is reported instead of a number);
* ONNX Runtime: :class:`~stoprt.export.ort_runner.OrtStepRunner` with IO binding and ping-pong state
  (also with a plain ``run`` per step, and with spinning threads).

Latency is the median (and 90th percentile) over ``--steps`` streamed steps after a warm-up, the
best of ``--rounds`` rounds that interleave the backends. Also:
export time of the ONNX step graph (both flavours), and the sizes of the graph, the model file and a
bundle. Prints a table and writes JSON to ``--out`` (default ``runs/bench/export.json``). Not a
test: numbers depend on the machine and on what else runs on it.

    python examples/benchmarks/export_bench.py --threads 1 --out runs/bench/export.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from stoprt.export.bundle import write_bundle
from stoprt.export.model_file import save_model
from stoprt.export.onnx_step import StepFunction, export_step
from stoprt.export.ort_runner import OrtStepRunner
from stoprt.export.runners import TorchStepRunner
from stoprt.runtime import models

NETWORKS = {"mlp (demo)": ("mlp", dict(in_channels=2, size=16, classes=10)),
            "vgg11 (width 1)": ("vgg11", dict(in_channels=2, size=32, classes=10, width=1.0))}


def latency(step: Callable[[torch.Tensor], object], x_seq: torch.Tensor, warmup: int) -> dict:
    """Median and p90 milliseconds per step over ``x_seq`` (one step per frame)."""
    for x in x_seq[:warmup]:
        step(x)
    times = []
    for x in x_seq:
        t0 = time.perf_counter()
        step(x)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))]}


def compiled_step(net: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[Callable, float]:
    """The exported step function under torch.compile, fed its own state; returns (step, compile s)."""
    fn = StepFunction(net)
    compiled = torch.compile(fn)
    state = fn.initial_state(1, input_shape)

    def step(x):
        nonlocal state
        y, *state = compiled(x, *state)
        return y

    t0 = time.perf_counter()
    with torch.no_grad():
        step(torch.zeros(1, *input_shape))
    return torch.no_grad()(step), time.perf_counter() - t0


def bench_network(label: str, name: str, kwargs: dict, args, workdir: Path) -> dict:
    torch.manual_seed(0)
    net = models.build_model(name, **kwargs).eval()
    shape = tuple(net.input_shape)
    x_seq = torch.randint(0, 3, (args.steps, 1, *shape)).float()  # event counts, batch 1
    row: dict = {"network": label, "parameters": sum(p.numel() for p in net.parameters())}

    for flavour, pai in (("initializers", False), ("params_as_inputs", True)):
        path = workdir / f"{name}-{flavour}.onnx"
        t0 = time.perf_counter()
        export_step(net, path, params_as_inputs=pai)
        row[f"export_s_{flavour}"] = time.perf_counter() - t0
        row[f"onnx_mib_{flavour}"] = path.stat().st_size / 2**20
    row["model_file_mib"] = save_model(workdir / f"{name}.stoprt", net).stat().st_size / 2**20
    t0 = time.perf_counter()
    bundle = write_bundle(workdir / f"{name}-bundle", net)
    row["bundle_s"] = time.perf_counter() - t0
    row["bundle_mib"] = sum(p.stat().st_size for p in bundle.iterdir()) / 2**20

    backends: dict[str, Callable] = {"torch_eager": TorchStepRunner(net).step}
    try:
        step, seconds = compiled_step(net, shape)
        backends["torch_compile"] = step
        row["torch_compile_s"] = seconds
    except Exception as err:  # inductor needs a C++ compiler and may not support every op
        row["torch_compile"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    graph = workdir / f"{name}-initializers.onnx"
    for key, options in (("onnxruntime", {}), ("onnxruntime_plain_run", {"io_binding": False}),
                         ("onnxruntime_spinning", {"spinning": True})):
        runner = OrtStepRunner(graph, threads=args.threads, providers=["CPUExecutionProvider"], **options)
        backends[key] = runner.step
    # Rounds interleave the backends, and each keeps its best round: a load spike from another
    # process then costs one round of one backend, not the comparison.
    for _ in range(args.rounds):
        for key, step in backends.items():
            measured = latency(step, x_seq, args.warmup)
            if key not in row or measured["median_ms"] < row[key]["median_ms"]:
                row[key] = measured
    if "torch_compile_s" in row:
        row["torch_compile"]["compile_s"] = row.pop("torch_compile_s")
    return row


def format_row(row: dict) -> str:
    def ms(entry: dict) -> str:
        return entry["error"][:60] if "error" in entry else f"{entry['median_ms']:7.3f} ms (p90 {entry['p90_ms']:.3f})"

    lines = [f"{row['network']}: {row['parameters']:,} parameters",
             f"  torch eager          {ms(row['torch_eager'])}",
             f"  torch.compile        {ms(row['torch_compile'])}"
             + (f", compiled in {row['torch_compile']['compile_s']:.1f} s" if "compile_s" in row["torch_compile"] else ""),
             f"  ONNX Runtime         {ms(row['onnxruntime'])}",
             f"    plain run          {ms(row['onnxruntime_plain_run'])}",
             f"    spinning threads   {ms(row['onnxruntime_spinning'])}",
             f"  export: {row['export_s_initializers']:.1f} s ({row['onnx_mib_initializers']:.2f} MiB), "
             f"params as inputs {row['export_s_params_as_inputs']:.1f} s ({row['onnx_mib_params_as_inputs']:.3f} MiB); "
             f"model file {row['model_file_mib']:.2f} MiB; bundle {row['bundle_mib']:.2f} MiB in {row['bundle_s']:.1f} s"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per backend (default 300)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime intra-op threads (default 1: on a shared 2-core "
                             "machine two OpenMP threads stall each other)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/export.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stoprt-export-bench-") as tmp:
        for label, (name, kwargs) in NETWORKS.items():
            rows.append(bench_network(label, name, kwargs, args, Path(tmp)))
            print(format_row(rows[-1]), flush=True)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
              "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
              "threads": args.threads, "batch": 1, "steps": args.steps, "rounds": args.rounds, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
