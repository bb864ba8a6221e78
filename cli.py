"""The ``stoprt`` command line: demo, train, stream, export, import, info, profile, plan.

Each subcommand imports what it needs when it runs, so ``stoprt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _set_threads(n: int | None) -> None:
    import torch
    if n:
        torch.set_num_threads(n)


def _run_demo(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    from .runtime.demo import format_summary, run_demo
    summary = run_demo(data=args.data, model=args.model, T=args.T, size=args.size, passes=args.passes,
                       lr=args.lr, seed=args.seed, device=args.device, max_samples=args.max_samples,
                       json_path=args.json, progress=not args.quiet)
    print("stoprt demo: streaming in-situ learning (STOP-WTL, one time step at a time)")
    print(format_summary(summary))
    if args.json:
        print(f"  summary written to {args.json}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    from .runtime.train import TrainConfig, train
    cfg = TrainConfig(model=args.model, data=args.data, method=args.method, learn=args.learn,
                      update=args.update, loss=args.loss, optimizer=args.optimizer, lr=args.lr,
                      epochs=args.epochs, batch_size=args.batch_size, T=args.T, size=args.size,
                      width=args.width, readout=args.readout, seed=args.seed, device=args.device,
                      n_train=args.n_train, n_test=args.n_test, out_dir=args.out,
                      checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    result = train(cfg, resume=args.resume)
    if result["world_size"] > 1:
        import torch.distributed as dist
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    name = f"{args.method.upper()}" + (f"-{args.learn.upper()}" if args.method == "stop" else "")
    print(f"stoprt train: {args.model} on {args.data} with {name}, {result['world_size']} process(es)")
    for h in result["history"]:
        print(f"  epoch {h['epoch']}: train {100 * h['train_acc']:.1f}%  test {100 * h['test_acc']:.1f}%  "
              f"{h['steps_per_s']:.0f} steps/s  peak RSS {h['peak_rss_mib']:.0f} MiB")
    if args.out:
        print(f"  checkpoint, metrics.csv, metrics.json and result.json in {args.out}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--T", type=int, default=10, help="time steps per sample (default 10)")
    p.add_argument("--size", type=int, default=16, help="input side in pixels (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .devices.cli import register as register_devices
    from .export.cli import register as register_export
    from .runtime.stream_cli import register as register_stream
    from .export.importers.cli import register as register_import

    parser = argparse.ArgumentParser(prog="stoprt", description="On-device learning runtime for spiking "
                                     "neural networks (STOP: weights, thresholds and leaks, bounded memory).")
    parser.add_argument("--version", action="version", version=f"stoprt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log warnings and details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="stream a built-in event source through a network that learns in place")
    demo.add_argument("--data", choices=("digits", "gestures"), default="digits",
                      help="emulated DVS digits (default) or synthetic gestures")
    demo.add_argument("--model", default="mlp", help="mlp (default), dvs_gesture, vgg11, resnet18")
    demo.add_argument("--passes", type=int, default=2, help="passes over the training stream (default 2)")
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument("--max-samples", type=int, default=None, help="stream only this many samples per pass")
    demo.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    _add_common(demo)
    demo.set_defaults(func=_run_demo)

    train = sub.add_parser("train", help="train a model offline with STOP or BPTT (torchrun for several processes)")
    train.add_argument("--model", default="mlp", help="mlp, dvs_gesture, vgg11, resnet18 (default mlp)")
    train.add_argument("--data", default="digits", help="digits, gestures, or a dataset folder")
    train.add_argument("--method", choices=("stop", "bptt"), default="stop")
    train.add_argument("--learn", choices=("w", "wt", "wl", "wtl"), default="wtl", help="STOP variant")
    train.add_argument("--update", default="sample", help="STOP schedule: sample, step, or every k steps (k)")
    train.add_argument("--loss", choices=("ce", "mse"), default="ce")
    train.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    train.add_argument("--readout", action="store_true", help="non-spiking leaky readout head")
    train.add_argument("--n-train", type=int, default=None, help="use the first N samples (quick runs)")
    train.add_argument("--n-test", type=int, default=None)
    train.add_argument("--out", metavar="DIR", help="checkpoint and metrics folder")
    train.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                       help="also checkpoint every N batches (default: each epoch)")
    train.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint")
    _add_common(train)
    train.set_defaults(func=_run_train)

    register_stream(sub)
    register_devices(sub)
    register_export(sub)
    register_import(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("stoprt: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        # Bad input: say what is wrong, no traceback (use --verbose for the full error).
        if args.verbose:
            raise
        print(f"stoprt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
