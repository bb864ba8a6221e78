"""Argument types shared by every ``stoprt`` subcommand (standard library only, so any layer's CLI
module may use it without importing torch).

Ranges are checked when the command line is parsed, so a bad value is refused in one line before
anything heavy runs (``--width 0`` would otherwise train a dead network, ``--size 0`` fall back to a
default). Every subcommand takes its argument types from here.

The top-level parser (:class:`stoprt.cli.Parser`) turns a refused value into one line on stderr,
``stoprt SUBCOMMAND: error: argument --X: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable

def _number(kind: type, low: float, inclusive: bool, what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1, True, "an integer >= 1")
nonnegative_int = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a finite number > 0")
nonnegative_float = _number(float, 0.0, True, "a finite number >= 0")


def int_list(item: Callable[[str], int] = positive_int) -> Callable[[str], list[int]]:
    """A comma-separated list, each value checked by ``item`` (``--T 10,100,1000``)."""
    def parse(text: str) -> list[int]:
        values = [item(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values
    return parse


def update_schedule(text: str) -> str | int:
    """A STOP update schedule: ``sample``, ``step``, or every K labelled steps (an integer >= 1)."""
    text = text.strip()
    if text in ("sample", "step"):
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected sample, step or an integer >= 1, got {text!r}") from None


_DEVICE = re.compile(r"cuda(?::(\d+))?")


def torch_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; a CUDA device must exist here (checked without building anything)."""
    text = text.strip()
    if text == "cpu":
        return text
    match = _DEVICE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    import torch  # only for a CUDA device: parsing stays cheap otherwise
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available ({why}); use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return text


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options ``demo`` and ``train`` share: sample shape, seed, device, threads, progress."""
    p.add_argument("--T", type=positive_int, default=10, help="time steps per sample (default 10)")
    p.add_argument("--size", type=positive_int, default=16, help="input side in pixels (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` when ``n`` is given (torch is imported only here)."""
    import torch
    if n:
        torch.set_num_threads(n)


def warn(command: str, message: str) -> None:
    """One warning line on stderr, in the CLI's format."""
    print(f"stoprt {command}: warning: {message}", file=sys.stderr)
