"""Summarise a CUDA ``stoprt profile`` run: allocator peak vs the planner, reserved vs allocated, STOP's
growth with T and BPTT's cost over STOP. Used by gpu_profile.sh; runs anywhere (no torch needed).

    python examples/device/gpu_profile_summary.py runs/gpu_profile/<machine>/profile.json OUT.json --machine NAME
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The planner's assumption for reserved-but-free allocator blocks (stoprt.devices.cost.planner).
ASSUMED_RESERVED_SLACK = 0.10


def _fmt(value, spec: str, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    text = format(value, spec.rstrip("%")) + ("%" if spec.endswith("%") else "")
    return text.rjust(width)


def summarise(profile: dict, machine: str) -> dict:
    rows = profile["rows"]
    lines, checks = [], []
    print(f"{machine}: {profile.get('title', '')}")
    print(f"  {'mode':5s} {'T':>4s} {'status':8s} {'alloc peak':>11s} {'planned':>9s} {'error':>7s} "
          f"{'reserved':>9s} {'res/alloc':>9s} {'ms/step':>8s}")
    for r in rows:
        alloc, planned, reserved = r.get("allocator_peak_mib"), r.get("planned_allocator_peak_mib"), r.get(
            "allocator_reserved_peak_mib")
        err = (planned / alloc - 1) if alloc and planned else None
        ratio = (reserved / alloc) if alloc and reserved else None
        entry = {"mode": r["mode"], "T": r["T"], "status": r["status"], "error": r.get("error"),
                 "allocator_peak_mib": alloc, "planned_allocator_peak_mib": planned, "planner_error": err,
                 "reserved_peak_mib": reserved, "reserved_over_allocated": ratio,
                 "time_per_step_ms": r.get("time_per_step_ms"), "steps_done": r.get("steps_done")}
        lines.append(entry)
        print(f"  {r['mode']:5s} {r['T']:>4d} {r['status']:8s} {_fmt(alloc, '.1f', 11)} {_fmt(planned, '.1f', 9)} "
              f"{_fmt(None if err is None else 100 * err, '+.1f%', 7)} {_fmt(reserved, '.1f', 9)} "
              f"{_fmt(ratio, '.2f', 9)} {_fmt(r.get('time_per_step_ms'), '.2f', 8)}")
        if r["status"] != "ok":
            print(f"        -> {r.get('error')}")
    ok = [e for e in lines if e["status"] == "ok" and e["allocator_peak_mib"]]
    stop = sorted((e["T"], e["allocator_peak_mib"]) for e in ok if e["mode"] == "stop")
    if len(stop) >= 2:
        growth = stop[-1][1] / stop[0][1] - 1
        checks.append({"check": "STOP allocator peak growth", "from_T": stop[0][0], "to_T": stop[-1][0],
                       "growth": growth, "within_5pct": abs(growth) <= 0.05})
    errors = [abs(e["planner_error"]) for e in ok if e["planner_error"] is not None]
    if errors:
        checks.append({"check": "planner vs allocator peak", "worst_abs_error": max(errors),
                       "within_20pct": max(errors) <= 0.20})
    ratios = [e["reserved_over_allocated"] for e in ok if e["reserved_over_allocated"]]
    if ratios:
        checks.append({"check": "reserved over allocated", "worst": max(ratios),
                       "assumed": 1 + ASSUMED_RESERVED_SLACK, "assumption_holds": max(ratios) <= 1 + ASSUMED_RESERVED_SLACK})
    for c in checks:
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))
    return {"machine": machine, "title": profile.get("title"), "host": profile.get("machine"), "rows": lines,
            "checks": checks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path, help="profile.json written by stoprt profile")
    p.add_argument("out", type=Path, help="summary JSON to write")
    p.add_argument("--machine", default="unknown GPU", help="the machine's name (nvidia-smi)")
    args = p.parse_args()
    try:
        profile = json.loads(args.profile.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"gpu_profile_summary: cannot read {args.profile}: {err}", file=sys.stderr)
        return 2
    summary = summarise(profile, args.machine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
