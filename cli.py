"""The ``stoprt`` command line: demo, train, stream, export, import, info, profile, plan, fleet.

The subcommands live in :mod:`stoprt.commands` (one module per command or group); this module builds
the parser from them and maps failures to exit codes. Each subcommand imports what it needs when it
runs, so ``stoprt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

# Imports of stoprt's packages (and so of torch) happen inside main(), where Ctrl-C is handled.
EXIT_USAGE = 2          # bad arguments or input: one line on stderr
EXIT_INTERRUPTED = 130  # SIGINT, the shell's 128 + 2
EXIT_CODES = """exit codes:
  0    done (plan: the configuration fits)
  1    plan: it does not fit; profile: no configuration could be measured; fleet register: a key
       was refused
  2    bad arguments or input: one line on stderr names the problem (-v for the traceback)
  130  interrupted (Ctrl-C / SIGINT), at startup or while running (stream checkpoints first)
"""


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are one line (no usage block) with exit code 2.

    Subcommands' parsers are made by ``add_subparsers`` with this same class.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import demo, device, export, fleet, import_, stream, train

    parser = Parser(prog="stoprt", description="On-device learning runtime for spiking neural networks (STOP: "
                    "weights, thresholds and leaks, bounded memory).", epilog=EXIT_CODES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"stoprt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log warnings and details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for command in (demo, train, stream, device, export, import_, fleet):
        command.register(sub)
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
              ("stoprt.devices.backends", "BackendUnavailable"), ("stoprt.devices.cost.measure", "RunnerUnavailable"))
    return any(isinstance(err, getattr(sys.modules[mod], name)) for mod, name in others if mod in sys.modules)


def _one_line(err: BaseException) -> str:
    if isinstance(err, ImportError) and err.name == "torch":  # the edge install: ONNX Runtime, no torch
        return ("this needs PyTorch, which is not installed: pip install 'stoprt[torch]' (on a Jetson, "
                "NVIDIA's torch wheel for its JetPack), or stream a learning bundle with --backend onnxruntime")
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
