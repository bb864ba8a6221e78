"""The device subcommands: ``stoprt info``, ``stoprt profile`` and ``stoprt plan``.

* ``info``: the detected device and a telemetry snapshot;
* ``profile``: measured memory (allocator, process, system, autograd views), time and energy per step
  vs T, each configuration in a fresh process (:mod:`stoprt.devices.cost.profile`);
* ``plan``: whether a configuration fits a board, and the largest batch and T that do
  (:mod:`stoprt.devices.cost.planner`, :mod:`stoprt.devices.cost.fit`).

The top-level CLI calls :func:`register`. Nothing heavy is imported here at module level: torch
is only imported when a subcommand runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_args import int_list, positive_float, positive_int, torch_device


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``info``, ``profile`` and ``plan`` to the top-level CLI's subparsers; returns info's parser."""
    parser = subparsers.add_parser(
        "info", help="describe this device (board, JetPack, memory) and read its telemetry",
        description="Detect the device (Jetson board and JetPack, CUDA GPU, or CPU) and print it "
                    "with a snapshot of GPU load, power rails and system memory.")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None,
                        help="also write the device and snapshot as JSON to PATH")
    parser.add_argument("--root", metavar="DIR", default="/",
                        help="read system files under DIR instead of / (a fake tree, for tests)")
    parser.set_defaults(func=run_info)
    _register_profile(subparsers)
    _register_plan(subparsers)
    return parser


def _words(text: str) -> list[str]:
    """A comma-separated list of names (``--mode stop,bptt``)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="mlp, dvs_gesture, vgg11, resnet18, or a stoprt train checkpoint")
    p.add_argument("--size", type=positive_int, default=None, help="input side in pixels (default 32; a checkpoint's own)")
    p.add_argument("--width", type=positive_float, default=None, help="channel width multiplier (default 1)")
    p.add_argument("--channels", type=positive_int, default=2, help="input channels (default 2: event polarities; not for a checkpoint)")
    p.add_argument("--classes", type=positive_int, default=None, help="output classes (default: the model's; not for a checkpoint)")
    p.add_argument("--optimizer", choices=("adam", "sgd", "sgd-momentum"), default="adam")


def _register_profile(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="measure training / inference memory, time and energy per step vs T",
        description="Run each configuration in a fresh process and report the allocator (CUDA), process "
                    "(RSS delta from a warmed-up baseline), system (MemTotal - MemAvailable) and exact "
                    "autograd (saved for backward + state) memory views, time and energy per step, next "
                    "to the planner's prediction. Writes profile.csv, profile.json and profile.png.")
    _add_model_args(p)
    p.add_argument("--mode", type=_words, default=["stop", "bptt"], help="training modes (default stop,bptt)")
    p.add_argument("--T", type=int_list(), default=[10, 100, 1000], help="time steps per sample (default 10,100,1000)")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--device", type=torch_device, default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--infer", action="store_true",
                   help="profile streaming inference instead of training, per --backend")
    p.add_argument("--backend", type=_words, default=None,
                   help="inference backends (default torch,onnxruntime,tensorrt; unavailable ones are skipped)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads in each run")
    p.add_argument("--limit-mib", type=positive_float, default=None,
                   help="cap the host memory a run may allocate beyond its baseline (RLIMIT_DATA), as on a "
                        "smaller device (default on CPU: 90%% of MemAvailable, so a run that does not fit fails "
                        "cleanly)")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per configuration (default 600)")
    p.add_argument("--out", type=Path, default=Path("runs/profile"), help="output folder (default runs/profile)")
    p.set_defaults(func=run_profile)


def _register_plan(subparsers) -> None:
    from ..devices.boards import board_keys
    p = subparsers.add_parser(
        "plan", help="does a model fit a board? headroom and the largest batch and T for STOP and BPTT",
        description="Predict training (STOP, BPTT) and inference memory analytically and compare it with a "
                    "board's usable memory. Exit code 0 if the configuration fits, 1 if not.")
    _add_model_args(p)
    p.add_argument("--device", default="orin-nano-4gb", help=f"board or cpu: {', '.join(['cpu', *board_keys()])}")
    p.add_argument("--mode", choices=("stop", "bptt", "infer"), default="stop")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--T", type=positive_int, default=100)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--json", metavar="PATH", type=Path, default=None, help="also write the report as JSON")
    p.set_defaults(func=run_plan)


def _network(args: argparse.Namespace):
    from ..devices.cost.workloads import load_workload
    return load_workload(args.model, args.size, args.width, args.channels, args.classes)


def run_profile(args: argparse.Namespace) -> int:
    """Measure every (mode or backend) x T configuration; print the table, write the files."""
    from ..devices.cost.planner import MemoryPlanner
    from ..devices.cost.profile import configurations, format_table, machine, run_profile as measure_all, write_outputs

    net, desc = _network(args)
    common = {k: v for k, v in (("size", args.size), ("width", args.width), ("channels", args.channels),
                                ("classes", args.classes), ("optimizer", args.optimizer), ("device", args.device),
                                ("threads", args.threads), ("limit_mib", args.limit_mib)) if v is not None}
    configs = configurations(args.model, args.mode, args.T, args.batch, infer=args.infer, backends=args.backend,
                             **common)
    planner = MemoryPlanner(net)
    shape = "x".join(map(str, net.input_shape))
    title = f"{desc['name']} {shape}, batch {args.batch}, {args.device}"
    print(f"stoprt profile: {title} ({len(configs)} configurations, each in a fresh process)")
    rows = measure_all(configs, planner, timeout_s=args.timeout)
    print(format_table(rows))
    meta = {"title": title, "model": desc, "input_shape": list(net.input_shape), "machine": machine(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}}
    written = write_outputs(args.out, rows, meta)
    print("wrote " + ", ".join(map(str, written)))
    # Running out of memory is a measurement (where the board's limit lies); an error, a crash or a
    # timeout in every row means nothing was measured, which a script must not take for success.
    failed = [r for r in rows if r["status"] in ("error", "crashed", "timeout")]
    if rows and len(failed) == len(rows):
        print(f"stoprt profile: no configuration could be measured ({len(rows)} failed; the first: "
              f"{failed[0]['status']}, {failed[0].get('error') or 'no message'})", file=sys.stderr)
        return 1
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """Print (and optionally write) the fit report; 0 if the configuration fits, 1 if not."""
    from ..devices.cost.fit import budget_for, fit_report, format_report
    from ..devices.cost.planner import MemoryPlanner

    budget = budget_for(args.device)  # before building the model: a bad key fails fast
    if args.batch < 1 or args.T < 1:
        raise ValueError(f"--batch and --T must be at least 1, got {args.batch} and {args.T}")
    net, desc = _network(args)
    report = fit_report(MemoryPlanner(net), budget, args.mode, args.batch, args.T,
                        dtype=args.dtype, optimizer=args.optimizer)
    shape = "x".join(map(str, net.input_shape))
    print(format_report(report, f"{desc['name']} ({shape}, {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M "
                                f"parameters, {args.dtype}, {args.optimizer})"))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": desc, **report}, indent=2) + "\n", encoding="utf-8")
    return 0 if report["fit"]["fits"] else 1


def _format_snapshot(snap: dict) -> str:
    def fmt(value, unit: str) -> str:
        return "n/a" if value is None else f"{value:.1f} {unit}"

    lines = ["Telemetry:",
             f"  GPU load:    {fmt(snap['gpu_load_pct'], '%')} at {fmt(snap['gpu_freq_mhz'], 'MHz')}",
             f"  system used: {fmt(snap['mem_system_used_mib'], 'MiB')} "
             f"of {fmt(snap['mem_total_mib'], 'MiB')}"]
    rails = snap["power_rails"]
    if not rails:
        lines.append("  power:       no readable rails")
    for label, rail in rails.items():
        lines.append(f"  {label}: {fmt(rail['power_mw'], 'mW')}")
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    """Print the device description and snapshot; write JSON if ``args.json``. Exit code."""
    # Imported here so that building the CLI parser stays cheap.
    from ..devices.detect import detect
    from ..devices.telemetry import snapshot

    root = Path(args.root)
    if not root.is_dir():
        print(f"stoprt info: --root {root} is not a directory", file=sys.stderr)
        return 2
    info = detect(root)
    snap = snapshot(root)
    print(info.describe())
    print(_format_snapshot(snap))
    if args.json is not None:
        out = Path(args.json)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"device": info.to_dict(), "telemetry": snap},
                                            indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"stoprt info: cannot write {out}: {exc}", file=sys.stderr)
            return 1
    return 0
