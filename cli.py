"""The ``stoprt`` command line: demo, train, stream, export, import, info, profile, plan.

Each subcommand imports what it needs when it runs, so ``stoprt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from .cli_args import nonnegative_int, positive_float, positive_int, torch_device

# Imports of stoprt's packages (and so of torch) happen inside main(), where Ctrl-C is handled.
EXIT_USAGE = 2          # bad arguments or input: one line on stderr
EXIT_INTERRUPTED = 130  # SIGINT, the shell's 128 + 2
EXIT_CODES = """exit codes:
  0    done (plan: the configuration fits)
  1    plan: it does not fit
  2    bad arguments or input: one line on stderr names the problem (-v for the traceback)
  130  interrupted (Ctrl-C / SIGINT), at startup or while running (stream checkpoints first)
"""


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are one line (no usage block) with exit code 2.

    Subcommands' parsers are made by ``add_subparsers`` with this same class.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    p.add_argument("--T", type=positive_int, default=10, help="time steps per sample (default 10)")
    p.add_argument("--size", type=positive_int, default=16, help="input side in pixels (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .devices.cli import register as register_devices
    from .export.cli import register as register_export
    from .runtime.stream_cli import register as register_stream
    from .export.importers.cli import register as register_import

    parser = Parser(prog="stoprt", description="On-device learning runtime for spiking neural networks (STOP: "
                    "weights, thresholds and leaks, bounded memory).", epilog=EXIT_CODES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"stoprt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log warnings and details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="stream a built-in event source through a network that learns in place")
    demo.add_argument("--data", choices=("digits", "gestures"), default="digits",
                      help="emulated DVS digits (default) or synthetic gestures")
    demo.add_argument("--model", default="mlp", help="mlp (default), dvs_gesture, vgg11, resnet18")
    demo.add_argument("--passes", type=positive_int, default=2, help="passes over the training stream (default 2)")
    demo.add_argument("--lr", type=positive_float, default=1e-3)
    demo.add_argument("--max-samples", type=positive_int, default=None, help="stream only this many samples per pass")
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
    train.add_argument("--lr", type=positive_float, default=1e-3)
    train.add_argument("--epochs", type=positive_int, default=3)
    train.add_argument("--batch-size", type=positive_int, default=16)
    train.add_argument("--width", type=positive_float, default=1.0, help="channel width multiplier")
    train.add_argument("--readout", action="store_true", help="non-spiking leaky readout head")
    train.add_argument("--n-train", type=positive_int, default=None, help="use the first N samples (quick runs)")
    train.add_argument("--n-test", type=positive_int, default=None)
    train.add_argument("--out", metavar="DIR", help="checkpoint and metrics folder")
    train.add_argument("--checkpoint-every", type=nonnegative_int, default=0, metavar="N",
                       help="also checkpoint every N batches (default: each epoch)")
    train.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint")
    _add_common(train)
    train.set_defaults(func=_run_train)

    register_stream(sub)
    register_devices(sub)
    register_export(sub)
    register_import(sub)
    return parser


def _user_error(err: BaseException) -> bool:
    """Whether ``err`` is bad input or a missing optional part (one line), not a bug (traceback).

    Every stoprt error about input (formats, checkpoints, bundles, graphs, wiring, conversions) is a
    ``ValueError``; files give ``OSError``; a missing optional backend gives ``ImportError``. The few
    that are not are checked by class, from modules already imported (an error of a class whose module
    never loaded cannot occur).
    """
    if isinstance(err, (ValueError, OSError, ImportError)):
        return True
    others = (("stoprt.export.tensorrt", "TensorRTError"), ("stoprt.devices.boards", "UnknownBoardError"),
              ("stoprt.devices.backends", "BackendUnavailable"), ("stoprt.devices.workloads", "RunnerUnavailable"))
    return any(isinstance(err, getattr(sys.modules[mod], name)) for mod, name in others if mod in sys.modules)


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split()) or type(err).__name__
    return text if isinstance(err, (ValueError, ImportError, KeyError)) else f"{type(err).__name__}: {text}"


def _sigint_handler(name: list[str]):
    """Ctrl-C raises KeyboardInterrupt, except inside an import: there it would leave modules half made
    (later failing with unrelated errors, or swallowed by a library's bare ``except``), so the process
    ends at once; nothing of the user's is written while imports run."""
    def handle(signum, frame) -> None:
        while frame is not None:
            if frame.f_code.co_filename.startswith("<frozen importlib"):
                sys.stdout.flush()
                print(f"{name[0]}: interrupted", file=sys.stderr, flush=True)
                os._exit(EXIT_INTERRUPTED)
            frame = frame.f_back
        raise KeyboardInterrupt
    return handle


def main(argv: list[str] | None = None) -> int:
    """Run one ``stoprt`` command; returns its exit code (see ``EXIT_CODES``).

    The one place that maps failures to exit codes: bad arguments exit 2 from the parser; bad input
    (:func:`_user_error`) prints one line and exits 2 (``-v``: the traceback); Ctrl-C at any point,
    imports and startup included, prints one line and exits 130. Anything else is a bug and keeps
    its traceback.
    """
    name, verbose = ["stoprt"], False
    own_handler = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own_handler:
        signal.signal(signal.SIGINT, _sigint_handler(name))
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        name[0], verbose = f"stoprt {args.command}" if args.command else "stoprt", args.verbose
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args)
    except SystemExit as exc:  # the parser's own exits (--help, --version, a bad argument): return the code
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{name[0]}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if verbose or not _user_error(err):
            raise
        print(f"{name[0]}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if own_handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
