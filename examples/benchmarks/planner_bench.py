"""Planner benchmark: the analytic memory model (stoprt.devices.cost.planner) against measured peaks on CPU.

    python examples/benchmarks/planner_bench.py --out runs/planner            # full run (~15 min, 2 cores)
    python examples/benchmarks/planner_bench.py --quick --out runs/planner-q  # smaller sizes (~3 min)

For mlp, dvs_gesture and vgg11 (small width), STOP and BPTT, two T each, every configuration runs in a
fresh process (``stoprt profile``'s child) twice:

* with glibc's default malloc, whose dynamic mmap threshold keeps freed tensor memory in the heap (the
  process RSS then exceeds what is live);
* with ``MALLOC_MMAP_THRESHOLD_`` fixed at its default 128 KiB (dynamic adjustment off): large tensors
  are mmapped and returned on free, so the RSS delta is the live memory, the CPU counterpart of the
  CUDA allocator's ``max_memory_allocated``.

The planner is compared with the exact autograd view (saved for backward + state) and with both RSS
deltas; the target is within 20% of the exact view and of the live RSS delta. Also prints the measured
process overhead (RSS baseline less parameters and optimizer state) next to the planner's constant.
Writes ``planner_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from stoprt.devices.cost.workloads import load_workload
from stoprt.devices.cost.planner import CPU_RUNTIME_OVERHEAD_MIB, MIB, MemoryPlanner
from stoprt.devices.cost.profile import configurations, run_profile

LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
FULL = [("mlp", 32, 4.0, 64), ("dvs_gesture", 64, 1.0, 32), ("vgg11", 64, 0.25, 16)]
QUICK = [("mlp", 16, 4.0, 32), ("dvs_gesture", 32, 1.0, 16), ("vgg11", 32, 0.25, 8)]


def _err(planned: float | None, measured: float | None) -> float | None:
    if planned is None or not measured:
        return None
    return (planned - measured) / measured


def bench_case(model: str, size: int, width: float, batch: int, Ts: list[int], threads: int | None) -> list[dict]:
    net, _ = load_workload(model, size, width)
    planner = MemoryPlanner(net)
    common = {"size": size, "width": width, **({"threads": threads} if threads else {})}
    configs = configurations(model, ["stop", "bptt"], Ts, batch, **common)
    quiet = lambda *a, **k: None  # noqa: E731
    default = run_profile(configs, planner, echo=quiet)
    live = run_profile(configs, planner, echo=quiet, env=LIVE_ENV)
    rows = []
    for d, v in zip(default, live):
        plan = planner.plan(d["mode"], batch, d["T"])
        row = {"model": model, "size": size, "width": width, "batch": batch, "mode": d["mode"], "T": d["T"],
               "status": d["status"] if d["status"] == v["status"] else f"{d['status']}/{v['status']}",
               "exact_mib": v.get("saved_and_state_peak_mib"), "planned_exact_mib": plan.saved_and_state / MIB,
               "rss_live_mib": v.get("rss_peak_delta_mib"), "rss_default_mib": d.get("rss_peak_delta_mib"),
               "planned_peak_mib": plan.sample_peak / MIB, "ms_per_step": d.get("time_per_step_ms"),
               "overhead_mib": (d["rss_baseline_mib"] - d["persistent_mib"]) if d.get("rss_baseline_mib") else None,
               "plan": {k: val / MIB for k, val in plan.to_dict().items() if isinstance(val, int) and k not in ("batch", "T")}}
        row["exact_err"] = _err(row["planned_exact_mib"], row["exact_mib"])
        row["live_err"] = _err(row["planned_peak_mib"], row["rss_live_mib"])
        row["default_err"] = _err(row["planned_peak_mib"], row["rss_default_mib"])
        rows.append(row)
        pct = lambda e: "   -  " if e is None else f"{100 * e:+5.1f}%"  # noqa: E731
        print(f"  {model:11s} {d['mode']:4s} T={d['T']:<4d} {row['status']:4s} "
              f"exact {row['exact_mib'] or 0:8.1f} vs {row['planned_exact_mib']:8.1f} {pct(row['exact_err'])} | "
              f"RSS live {row['rss_live_mib'] or 0:8.1f} default {row['rss_default_mib'] or 0:8.1f} vs planned "
              f"{row['planned_peak_mib']:8.1f}: {pct(row['live_err'])} / {pct(row['default_err'])} | "
              f"{row['ms_per_step'] or 0:7.1f} ms/step", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/planner")
    p.add_argument("--quick", action="store_true", help="smaller inputs and T, for a smoke run")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default torch's)")
    args = p.parse_args()
    cases, Ts = (QUICK, [5, 10]) if args.quick else (FULL, [10, 30])
    print(f"Planner vs measured peaks on CPU (MiB; error = planned / measured - 1); T = {Ts}")
    rows = [r for case in cases for r in bench_case(*case, Ts, args.threads)]
    ok = [r for r in rows if r["status"] == "ok"]
    worst = {k: max((abs(r[k]) for r in ok if r[k] is not None), default=None)
             for k in ("exact_err", "live_err", "default_err")}
    overheads = [r["overhead_mib"] for r in ok if r["overhead_mib"] is not None]
    print(f"Worst error: exact view {100 * worst['exact_err']:.1f}%, live RSS {100 * worst['live_err']:.1f}% "
          f"(target: within 20%); default-malloc RSS {100 * worst['default_err']:.1f}% (glibc keeps freed memory)")
    print(f"Process overhead measured {min(overheads):.0f}-{max(overheads):.0f} MiB "
          f"(median {statistics.median(overheads):.0f}); planner uses {CPU_RUNTIME_OVERHEAD_MIB:.0f} MiB")
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "argv": sys.argv[1:]},
              "Ts": Ts, "rows": rows, "worst_abs_error": worst, "within_20pct": {
                  "exact": worst["exact_err"] is not None and worst["exact_err"] <= 0.2,
                  "live_rss": worst["live_err"] is not None and worst["live_err"] <= 0.2},
              "overhead_mib": {"measured": overheads, "planner": CPU_RUNTIME_OVERHEAD_MIB}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "planner_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out / 'planner_bench.json'}")


if __name__ == "__main__":
    main()
