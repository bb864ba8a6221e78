"""The ``stoprt info`` subcommand: the detected device and a telemetry snapshot.

The top-level CLI calls :func:`register`. Nothing heavy is imported here at module level: torch
is only imported by detection, and only when describing the real machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``info`` to the top-level CLI's subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "info", help="describe this device (board, JetPack, memory) and read its telemetry",
        description="Detect the device (Jetson board and JetPack, CUDA GPU, or CPU) and print it "
                    "with a snapshot of GPU load, power rails and system memory.")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None,
                        help="also write the device and snapshot as JSON to PATH")
    parser.add_argument("--root", metavar="DIR", default="/",
                        help="read system files under DIR instead of / (a fake tree, for tests)")
    parser.set_defaults(func=run_info)
    return parser


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
    from .detect import detect
    from .telemetry import snapshot

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
