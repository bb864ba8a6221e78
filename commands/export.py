"""The ``stoprt export`` subcommand: a trained model as an ONNX step graph, a TensorRT engine, a NIR
graph or a deployment bundle.

    stoprt export runs/x/checkpoint.pt --to onnx model.onnx [--opset 20] [--params-as-inputs]
    stoprt export model.stoprt --to tensorrt model.engine [--batch 4] [--fp16] [--workspace-mib 256]
    stoprt export runs/x/checkpoint.pt --to bundle deploy/ [--archive]
    stoprt export runs/x/checkpoint.pt --to onnx-learn learn/ [--optimizer sgd] [--lr 0.05]
        [--momentum 0.9] [--weight-decay 0] [--loss ce|mse] [--update sample|step|K] [--archive]
    stoprt export model.stoprt --to nir model.nir [--allow-reset-change]

CHECKPOINT is a training checkpoint, a stoprt model file or a bundle. ``onnx-learn`` writes a
learning bundle: a bundle that also carries STOP's learning-step and update graphs, the parameters
they start from and the optimizer and schedule (:mod:`stoprt.export.learning`), from which
``stoprt stream --backend onnxruntime --learn`` learns without torch. Nothing heavy is imported
until the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import nonnegative_float, positive_float, positive_int, update_schedule
from ..export.signatures import OPTIMIZERS

TARGETS = ("onnx", "tensorrt", "nir", "bundle", "onnx-learn")
SUFFIXES = {"onnx": ".onnx", "tensorrt": ".engine", "nir": ".nir", "bundle": "", "onnx-learn": ""}
BUNDLES = ("bundle", "onnx-learn")  # directories (or .tar with --archive)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export`` to the top-level CLI's subparsers; returns its parser."""
    p = subparsers.add_parser(
        "export", help="export a model: ONNX step graph, TensorRT engine, NIR or a deployment bundle",
        description="Export one time step of a trained network (state as explicit inputs/outputs) for "
                    "ONNX Runtime or TensorRT, write it as NIR, or write a checked deployment bundle.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="training checkpoint, model file or bundle")
    p.add_argument("--to", required=True, choices=TARGETS, help="what to write")
    p.add_argument("out", metavar="OUT", help="output file (bundle: directory, or .tar with --archive)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset: 18, 19 or 20 (default 20)")
    p.add_argument("--params-as-inputs", action="store_true",
                   help="parameters as graph inputs, updatable on the device without a rebuild")
    p.add_argument("--batch", type=positive_int, default=None, help="TensorRT: largest batch of the engine (default 1)")
    p.add_argument("--fp16", action="store_true", help="TensorRT: allow FP16 kernels")
    p.add_argument("--workspace-mib", type=positive_int, default=None,
                   help="TensorRT: builder workspace limit in MiB (default 1024; ~256 on 4 GB boards)")
    p.add_argument("--refit", action="store_true", help="TensorRT: build a refittable engine")
    p.add_argument("--archive", action="store_true", help="bundle: write one .tar file instead of a directory")
    p.add_argument("--no-onnx", action="store_true", help="bundle: model file only, no step graph")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="onnx-learn: the update graph's optimizer "
                   "(default sgd)")
    p.add_argument("--lr", type=positive_float, default=None, help="onnx-learn: default learning rate (default 0.05)")
    p.add_argument("--momentum", type=nonnegative_float, default=None, help="onnx-learn: SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=None, help="onnx-learn: weight decay (default 0)")
    p.add_argument("--loss", choices=("ce", "mse"), default=None, help="onnx-learn: loss of the learning step (default ce)")
    p.add_argument("--update", type=update_schedule, default=None,
                   help="onnx-learn: update schedule: sample, step, or every K labelled steps (default sample)")
    p.add_argument("--allow-reset-change", action="store_true",
                   help="nir: write soft-reset LIF neurons (what `stoprt train` makes) as NIR's hard reset to "
                        "v_reset=0; after each spike the NIR neuron restarts from 0 instead of keeping the "
                        "excess over threshold, so strongly driven neurons fire less often than in stoprt")
    p.set_defaults(func=run_export)
    return p


LEARN_OPTIONS = ("optimizer", "lr", "momentum", "weight_decay", "loss", "update")  # LearningOptions' fields


def _check_options(args: argparse.Namespace) -> None:
    trt_only = {"--batch": args.batch is not None, "--fp16": args.fp16,
                "--workspace-mib": args.workspace_mib is not None, "--refit": args.refit}
    bundle_only = {"--archive": args.archive, "--no-onnx": args.no_onnx}
    onnx_opts = {"--opset": args.opset is not None, "--params-as-inputs": args.params_as_inputs}
    nir_only = {"--allow-reset-change": args.allow_reset_change}
    learn_only = {f"--{k.replace('_', '-')}": getattr(args, k) is not None for k in LEARN_OPTIONS}
    allowed = {"onnx": onnx_opts, "tensorrt": {**onnx_opts, **trt_only}, "bundle": {**onnx_opts, **bundle_only},
               "nir": nir_only, "onnx-learn": {"--opset": True, **bundle_only, **learn_only}}[args.to]
    given = {**onnx_opts, **trt_only, **bundle_only, **nir_only, **learn_only}
    stray = [name for name, on in given.items() if on and name not in allowed]
    if stray:
        raise ValueError(f"{', '.join(stray)} does not apply to --to {args.to}")
    out = Path(args.out)
    if args.to not in BUNDLES and out.is_dir():  # a bundle is a directory; the others are one file
        raise ValueError(f"{out} is a directory: give a file name for the {args.to} output, "
                         f"e.g. {out / ('model' + SUFFIXES[args.to])}")


def run_export(args: argparse.Namespace) -> int:
    """Export as asked; exit code 0. Errors (bad input, a missing optional backend such as TensorRT or
    NIR, TensorRT build failures) are raised and reported by ``stoprt.cli.main`` in one line."""
    _check_options(args)
    from ..export.loading import load_network
    out = Path(args.out)
    if args.to == "tensorrt":
        from ..export.tensorrt import import_tensorrt
        import_tensorrt()  # fail before the (slow) ONNX export when TensorRT is missing
    if args.to == "nir":
        export_nir = _nir_exporter()
    loaded = load_network(args.checkpoint, builtin=False)
    net, spec = loaded.net, loaded.input_spec
    opset = args.opset if args.opset is not None else 20
    if args.to == "onnx":
        from ..export.onnx_step import export_step
        sig = export_step(net, out, opset=opset, params_as_inputs=args.params_as_inputs, input_spec=spec)
        _report(out, f"ONNX step graph (opset {opset}, {len(sig.state)} state tensors"
                     f"{', parameters as inputs' if sig.params_as_inputs else ''})")
    elif args.to == "tensorrt":
        from ..export.onnx_step import export_step
        from ..export.tensorrt import build_engine
        graph = out.with_suffix(".onnx")
        if graph == out:
            raise ValueError(f"give the engine a name not ending in .onnx (the step graph goes to {graph})")
        export_step(net, graph, opset=opset, params_as_inputs=args.params_as_inputs, input_spec=spec)
        build_engine(graph, out, max_batch=args.batch or 1, fp16=args.fp16,
                     workspace_mib=args.workspace_mib or 1024, refit=args.refit)
        _report(out, f"TensorRT engine (batch <= {args.batch or 1}{', FP16' if args.fp16 else ''}"
                     f"{', refittable' if args.refit else ''}); step graph {graph}")
    elif args.to == "bundle":
        from ..export.bundle import write_bundle
        write_bundle(out, net, spec, onnx=not args.no_onnx, opset=opset,
                     params_as_inputs=args.params_as_inputs, archive=args.archive)
        _report(out, "deployment bundle" + (" archive" if args.archive else ""))
    elif args.to == "onnx-learn":
        from ..export.bundle import write_bundle
        from ..export.learning import LearningOptions
        options = LearningOptions(**{k: getattr(args, k) for k in LEARN_OPTIONS if getattr(args, k) is not None})
        write_bundle(out, net, spec, onnx=not args.no_onnx, opset=opset, archive=args.archive, learning=options)
        _report(out, f"learning bundle{' archive' if args.archive else ''} ({options.optimizer}, lr {options.lr}, "
                     f"momentum {options.momentum}, weight decay {options.weight_decay}, loss {options.loss}, "
                     f"update per {options.update})")
    else:
        export_nir(net, out, allow_reset_change=args.allow_reset_change)
        _report(out, "NIR graph")
    return 0


def _nir_exporter():
    try:
        from ..export.importers.nir import export_nir
    except ModuleNotFoundError as err:
        if err.name in ("stoprt.export.importers", "stoprt.export.importers.nir"):
            raise ImportError("NIR export is not available in this stoprt (stoprt.export.importers.nir "
                              "is missing)") from err
        raise
    return export_nir


def _report(out: Path, what: str) -> None:
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
    print(f"stoprt export: wrote {what} to {out} ({size / 2**20:.1f} MiB)")
