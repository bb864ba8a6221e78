"""Decoding speed of the event-file readers in :mod:`stoprt.runtime.formats`.

Writes one random recording per writer into a temporary folder (plus a burst-structured EVT 3.0 file
whose rows become vector words), reads each back with its reader and reports decoded events per second
(best of ``--repeat`` runs). Also times the real recordings in ``../shared/fixtures/dvs`` when present,
and AEDAT 4.0 through the optional ``aedat`` package when it is installed. Prints a table and writes
JSON to ``--out`` (default ``runs/bench/readers.json``). Not a test: numbers depend on the machine.

    python examples/benchmarks/readers_bench.py --events 2000000 --out runs/bench/readers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stoprt.runtime.events import EVENT_DTYPE
from stoprt.runtime.formats import WRITERS, read_events
from stoprt.runtime.formats.aedat4 import check_available

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "dvs"
# writer name -> (file name, writer keyword arguments, sensor width, height, max timestamp or None)
SYNTHETIC: dict[str, tuple[str, dict[str, Any], int, int, int | None]] = {
    "nmnist": ("random.bin", {}, 34, 34, (1 << 23) - 1),
    "aedat2": ("random_aedat2.aedat", {}, 128, 128, None),
    "aedat3": ("random_aedat3.aedat", {}, 128, 128, None),
    "evt2": ("random_evt2.raw", {"width": 640, "height": 480}, 640, 480, None),
    "evt3": ("random_evt3.raw", {"width": 1280, "height": 720}, 1280, 720, None),
    "dat": ("random.dat", {"width": 304, "height": 240}, 304, 240, None),
}


def random_events(n: int, width: int, height: int, t_max: int | None, rng: np.random.Generator) -> np.ndarray:
    """``n`` events at about one per microsecond (or spread below ``t_max``), uniform coordinates."""
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    steps = rng.integers(0, 3, n) if t_max is None else None
    ev["t"] = np.cumsum(steps) if steps is not None else np.sort(rng.integers(0, t_max, n))
    ev["x"] = rng.integers(0, width, n)
    ev["y"] = rng.integers(0, height, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


def row_bursts(n: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Events in bursts on one row at one time, as an EVT 3.0 sensor sends them (vector words)."""
    per = 16
    m = n // per
    ev = np.zeros(m * per, dtype=EVENT_DTYPE)
    ev["t"] = np.repeat(np.cumsum(rng.integers(0, 8, m)), per)
    ev["y"] = np.repeat(rng.integers(0, height, m), per)
    ev["p"] = np.repeat(rng.integers(0, 2, m), per)
    start = rng.integers(0, width - 5 * per, m)
    cols = np.sort(rng.integers(0, 4 * per, (m, per)), axis=1) + np.arange(per)  # strictly increasing
    ev["x"] = (start[:, None] + cols).reshape(-1)
    return ev


def best_time(fn: Callable[[], Any], repeat: int, min_time: float = 0.2) -> tuple[float, Any]:
    """Best seconds per call over ``repeat`` rounds (each round loops until ``min_time``)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        calls, start = 0, time.perf_counter()
        while True:
            out = fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = min(best, elapsed / calls)
    return best, out


def measure(name: str, fmt: str, path: Path, repeat: int, chunk_size: int, **kwargs: Any) -> dict[str, Any]:
    seconds, events = best_time(lambda: read_events(path, format=fmt, chunk_size=chunk_size, **kwargs), repeat)
    size = path.stat().st_size
    return {"name": name, "format": fmt, "file": path.name, "events": int(len(events)), "bytes": size,
            "seconds": seconds, "events_per_s": len(events) / seconds, "mb_per_s": size / seconds / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=2_000_000, help="events per synthetic file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=1 << 20, help="bytes read at a time")
    ap.add_argument("--out", default="runs/bench/readers.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, (fname, kwargs, w, h, t_max) in SYNTHETIC.items():
            n = min(args.events, 1_000_000) if fmt == "nmnist" else args.events
            ev = random_events(n, w, h, t_max, rng)
            path = Path(tmp) / fname
            start = time.perf_counter()
            with WRITERS[fmt](path, **kwargs) as writer:
                writer.write(ev)
            write_s = time.perf_counter() - start
            res = measure(f"{fmt} (synthetic)", fmt, path, args.repeat, args.chunk_size)
            res["write_events_per_s"] = n / write_s
            results.append(res)
        bursts = row_bursts(args.events, 1280, 720, rng)
        path = Path(tmp) / "bursts_evt3.raw"
        with WRITERS["evt3"](path) as writer:
            writer.write(bursts)
        results.append(measure("evt3 (synthetic row bursts, vectors)", "evt3", path, args.repeat, args.chunk_size))
        if FIXTURES.is_dir():
            for fname, fmt, extra in (("sample_nmnist.bin", "nmnist", {}), ("sample_ncars.dat", "dat", {}),
                                      ("evt3_sample.raw", "evt3", {})):
                if (FIXTURES / fname).exists():
                    results.append(measure(f"{fname} (fixture)", fmt, FIXTURES / fname, args.repeat,
                                           args.chunk_size, **extra))
            if (FIXTURES / "sample.aedat4").exists() and check_available():
                results.append(measure("sample.aedat4 (fixture, via aedat)", "aedat4", FIXTURES / "sample.aedat4",
                                       args.repeat, args.chunk_size))
    report = {"machine": {"python": platform.python_version(), "numpy": np.__version__,
                          "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
              "events_per_synthetic_file": args.events, "chunk_size": args.chunk_size,
              "aedat_installed": check_available(), "results": results}
    print(f"{'reader':44s} {'events':>10s} {'Mev/s':>8s} {'MB/s':>8s}")
    for r in results:
        print(f"{r['name']:44s} {r['events']:>10d} {r['events_per_s'] / 1e6:>8.1f} {r['mb_per_s']:>8.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
