"""``stoprt demo``: stream a built-in event source through a network that learns in place."""

from __future__ import annotations

import argparse

from ..cli_args import add_run_options, positive_float, positive_int, set_threads


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``demo`` to the top-level CLI's subparsers; returns its parser."""
    demo = sub.add_parser("demo", help="stream a built-in event source through a network that learns in place")
    demo.add_argument("--data", choices=("digits", "gestures"), default="digits",
                      help="emulated DVS digits (default) or synthetic gestures")
    demo.add_argument("--model", default="mlp", help="mlp (default), dvs_gesture, vgg11, resnet18")
    demo.add_argument("--passes", type=positive_int, default=2, help="passes over the training stream (default 2)")
    demo.add_argument("--lr", type=positive_float, default=1e-3)
    demo.add_argument("--max-samples", type=positive_int, default=None, help="stream only this many samples per pass")
    demo.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    add_run_options(demo)
    demo.set_defaults(func=run_demo)
    return demo


def run_demo(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    from ..runtime.demo import format_summary, run_demo as run
    summary = run(data=args.data, model=args.model, T=args.T, size=args.size, passes=args.passes,
                  lr=args.lr, seed=args.seed, device=args.device, max_samples=args.max_samples,
                  json_path=args.json, progress=not args.quiet)
    print("stoprt demo: streaming in-situ learning (STOP-WTL, one time step at a time)")
    print(format_summary(summary))
    if args.json:
        print(f"  summary written to {args.json}")
    return 0
