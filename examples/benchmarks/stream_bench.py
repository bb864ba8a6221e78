"""Throughput of the streaming input path: :class:`~stoprt.runtime.stream.Binner` and the pipeline.

* ``binner_throughput``: events per second through ``Binner.push`` on a synthetic stream held in
  memory (packets of ``packet_events``), for a given configuration (denoise, hot pixels, ROI, ...);
* ``fixture_throughput``: the same on a real recording from ``../shared/fixtures/dvs`` (the packets are
  read first with :class:`FileSource`, so only binning is timed), plus the end-to-end rate of
  ``FileSource`` + ``Binner``;
* ``pipeline_throughput``: steps and events per second through :class:`StreamPipeline` (producer
  thread, bounded queue, a consumer that only takes the steps) and its real-time factor.

``stream_benchmarks()`` runs the standard set and returns the JSON-ready report. Not a test: the
numbers depend on the machine.

    python examples/benchmarks/stream_bench.py --events 2000000 --out runs/bench/stream.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stoprt.runtime.events import EVENT_DTYPE
from stoprt.runtime.formats import AEDAT3Writer
from stoprt.runtime.stream import Binner, FileSource, StreamPipeline

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "dvs"


def synthetic_stream(n: int, sensor: tuple[int, int], rate_hz: float = 2e6, seed: int = 0) -> np.ndarray:
    """``n`` events at about ``rate_hz``, uniform over the sensor, half ON."""
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["t"] = np.cumsum(rng.exponential(1e6 / rate_hz, n)).astype(np.int64)
    ev["x"], ev["y"], ev["p"] = rng.integers(0, sensor[0], n), rng.integers(0, sensor[1], n), rng.integers(0, 2, n)
    return ev


def _time_binner(packets: list[np.ndarray], repeat: int, **binner_kwargs: Any) -> tuple[float, dict]:
    """Best seconds over ``repeat`` runs of a fresh binner over all packets, and its last stats."""
    best, stats = float("inf"), {}
    for _ in range(repeat):
        binner = Binner(**binner_kwargs)
        start = time.perf_counter()
        for packet in packets:
            binner.push(packet)
        binner.flush()
        best = min(best, time.perf_counter() - start)
        stats = binner.stats
    return best, stats


def binner_throughput(name: str = "synthetic", n_events: int = 1_000_000, sensor: tuple[int, int] = (128, 128),
                      packet_events: int = 2000, repeat: int = 3, seed: int = 0, **binner_kwargs: Any) -> dict:
    """Events/s through ``Binner.push`` on a synthetic in-memory stream (``binner_kwargs`` configure it)."""
    ev = synthetic_stream(n_events, sensor, seed=seed)
    packets = [ev[i:i + packet_events] for i in range(0, len(ev), packet_events)]
    seconds, stats = _time_binner(packets, repeat, sensor_size=sensor, **binner_kwargs)
    return {"name": name, "events": n_events, "sensor": list(sensor), "packet_events": packet_events,
            "config": {k: (v if isinstance(v, (int, float, str, type(None))) else str(v))
                       for k, v in binner_kwargs.items()},
            "seconds": seconds, "events_per_s": n_events / seconds, "steps": stats["steps"],
            "steps_per_s": stats["steps"] / seconds, "binned_fraction": stats["events_binned"] / n_events}


def fixture_throughput(path: Path, repeat: int = 3, packet_us: int = 1000, sensor_size: tuple[int, int] | None = None,
                       **binner_kwargs: Any) -> dict:
    """Binning rate on a real recording, and the end-to-end FileSource + Binner rate (``sensor_size``
    for formats that do not state it)."""
    with FileSource(path, packet_us=packet_us, sensor_size=sensor_size) as source:
        sensor = source.sensor_size
        packets = list(source)
    n = int(sum(len(p) for p in packets))
    seconds, stats = _time_binner(packets, repeat, sensor_size=sensor, **binner_kwargs)
    start = time.perf_counter()
    with FileSource(path, packet_us=packet_us, sensor_size=sensor_size) as source:
        binner = Binner(sensor, **binner_kwargs)
        for packet in source:
            binner.push(packet)
        binner.flush()
    e2e = time.perf_counter() - start
    return {"name": f"{path.name} (fixture)", "events": n, "sensor": list(sensor), "packet_us": packet_us,
            "config": {k: str(v) for k, v in binner_kwargs.items()}, "seconds": seconds,
            "events_per_s": n / seconds, "steps": stats["steps"], "end_to_end_events_per_s": n / e2e}


def pipeline_throughput(n_events: int = 1_000_000, sensor: tuple[int, int] = (128, 128), dt_us: int = 1000,
                        out_size: int = 32, max_queue_steps: int = 8, seed: int = 0) -> dict:
    """StreamPipeline over a synthetic AEDAT 3.1 file, the consumer only taking steps (back-pressure)."""
    ev = synthetic_stream(n_events, sensor, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stream.aedat"
        with AEDAT3Writer(path, width=sensor[0], height=sensor[1]) as writer:
            writer.write(ev)
        pipe = StreamPipeline(FileSource(path, packet_us=dt_us), Binner(sensor, out_size, dt_us=dt_us),
                              max_queue_steps=max_queue_steps)
        start = time.perf_counter()
        with pipe:
            steps = sum(1 for _ in pipe)
        seconds = time.perf_counter() - start
    stats = pipe.stats
    return {"name": "pipeline (FileSource -> Binner -> queue)", "events": n_events, "sensor": list(sensor),
            "dt_us": dt_us, "steps": steps, "seconds": seconds, "events_per_s": n_events / seconds,
            "steps_per_s": steps / seconds, "realtime_factor": stats["realtime_factor"],
            "queue_peak": stats["queue_peak"], "steps_dropped": stats["steps_dropped"]}


def stream_benchmarks(n_events: int = 1_000_000, repeat: int = 3) -> dict:
    """The standard set (synthetic configurations, fixtures when present, the pipeline) as a report."""
    small, hd = (128, 128), (1280, 720)
    results = [
        binner_throughput("128x128 -> 32x32, dt 1 ms", n_events, small, repeat=repeat, out_size=32, dt_us=1000),
        binner_throughput("128x128 -> 32x32, dt 1 ms, denoise 5 ms", n_events, small, repeat=repeat, out_size=32,
                          dt_us=1000, denoise_us=5000),
        binner_throughput("128x128 -> 32x32, dt 1 ms, hot pixels auto", n_events, small, repeat=repeat,
                          out_size=32, dt_us=1000, hot_pixels="auto"),
        binner_throughput("128x128 full, count 5000 ev/step", n_events, small, repeat=repeat, mode="count",
                          events_per_step=5000),
        binner_throughput("1280x720 -> 64x36, dt 10 ms, ROI", n_events, hd, repeat=repeat, out_size=(64, 36),
                          dt_us=10_000, roi=(0, 0, 1280, 720)),
        binner_throughput("1280x720 -> 64x36, dt 10 ms, denoise 5 ms", n_events, hd, repeat=repeat,
                          out_size=(64, 36), dt_us=10_000, denoise_us=5000),
    ]
    if FIXTURES.is_dir():
        for fname, kwargs in (("evt3_sample.raw", {"out_size": (64, 36), "dt_us": 10_000}),
                              ("sample_nmnist.bin", {"dt_us": 10_000, "sensor_size": (34, 34)}),
                              ("sample_ncars.dat", {"dt_us": 10_000, "sensor_size": (304, 240)})):
            path = FIXTURES / fname
            if path.exists():
                results.append(fixture_throughput(path, repeat, **kwargs))
    results.append(pipeline_throughput(n_events))
    return {"machine": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                        "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
            "events_per_synthetic_stream": n_events, "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="events per synthetic stream")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="runs/bench/stream.json")
    args = ap.parse_args(argv)
    report = stream_benchmarks(args.events, args.repeat)
    print(f"{'configuration':52s} {'events':>9s} {'Mev/s':>7s} {'steps/s':>9s}")
    for r in report["results"]:
        steps = f"{r['steps_per_s']:>9.0f}" if "steps_per_s" in r else f"{'':>9s}"
        print(f"{r['name']:52s} {r['events']:>9d} {r['events_per_s'] / 1e6:>7.2f} {steps}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
