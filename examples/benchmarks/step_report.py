"""How ``step_bench.py`` reports: its rows as printed lines, and the result as a Markdown page and JSON
(``step_bench.md`` and ``step_bench.json`` in the output folder)."""

from __future__ import annotations

import json
from pathlib import Path

from stoprt.runtime.atomic import write_text


def print_rows(group: list[dict], flush: bool = False) -> None:
    for r in group:
        head = f"  {r['net']:11s} b{r['batch']:<3d} {r['row']:14s} {r.get('mode', ''):7s}"
        if not r["available"]:
            print(f"{head} n/a ({r['why']})", flush=flush)
            continue
        ratio = f"  {r['over_floor']:5.2f}x floor (best {r['over_floor_best']:5.2f}x)" if "over_floor" in r else ""
        ratio += f"  {r['over_floor_graph']:6.2f}x graphed floor" if "over_floor_graph" in r else ""
        print(f"{head} {r['median_us']:10.1f} us (best {r['best_us']:9.1f}){ratio}", flush=flush)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# STOP step benchmark: {m['name']}", "",
             f"CPU {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch thread(s)), torch {m['torch']}"
             + (f", GPU {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else "")
             + f"; load average at start {m['load_average_at_start'][0]:.1f}.", "",
             f"Microseconds per time step (median of {result['config']['repeats']} interleaved samples of "
             f"T={result['config']['T']}, and the best); ratios over the plain-torch floor, median / best; "
             "learn rows over the floor's forward+backward, infer rows over its forward.", "",
             "| net | batch | row | mode | median us | best us | over floor | over graphed floor | first sample s |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.2f} / {r[key + '_best']:.2f}" if key in r else ""
    for r in result["steps"]:
        if r["available"]:
            lines.append(f"| {r['net']} | {r['batch']} | {r['row']} | {r.get('mode', '')} | {r['median_us']:.1f} | "
                         f"{r['best_us']:.1f} | {ratio(r, 'over_floor')} | {ratio(r, 'over_floor_graph')} | "
                         f"{r.get('first_sample_s', float('nan')):.2f} |")
        else:
            lines.append(f"| {r['net']} | {r['batch']} | {r['row']} | | n/a | n/a | {r['why']} | | |")
    mem = result.get("memory") or {"rows": []}
    if mem["rows"]:
        lines += ["", f"Memory over one sample ({mem['net']}, batch 1, {mem['learner']} learner): "
                  f"spread of {mem['measure']} {100 * mem['spread']:.2f}%", "", "| T | " + " | ".join(
                      k for k in mem["rows"][0] if k != "T") + " |", "|---" * len(mem["rows"][0]) + "|"]
        lines += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
                  for r in mem["rows"]]
    s = result.get("stream")
    if s:
        lines += ["", f"`{s['command']}`: " + (f"{s['steps_per_s']:.0f} steps/s over {s['steps']} steps, first "
                                              f"step {s['first_step_s']:.2f} s after the command started; "
                                              f"{s['startup_s']:.2f} s of its wall time outside streaming (start-up "
                                              f"and teardown; the command used {s['command_cpu_s']:.1f} s of CPU)"
                                              if "error" not in s else f"failed: {s['error']}")]
    o = result.get("stream_overhead")
    if o:
        per = o.get("processes", [])
        lines += ["", f"Stream loop ({o['steps']} steps, mlp, CPU), us per step, wall (CPU time of all threads): the "
                  f"best of {o.get('repeats', '?')} runs in each of {len(per) or 1} processes; in a process, an "
                  "overhead is the median over its runs of the variant's time over the bare run next to it, and the "
                  "table gives the median over the processes"
                  + (" (session + pipeline per process: " + ", ".join(
                      f"{100 * r['session_pipeline_overhead_wall']:+.1f}%" for r in per) + ")" if per else "") + ":", "",
                  "| bare learner calls | session | session + pipeline + built-in source |", "|---|---|---|",
                  "| " + " | ".join(f"{o[f'{k}_wall_us_per_step']:.1f} ({o[f'{k}_cpu_us_per_step']:.1f})"
                                   + ("" if k == "bare" else f"; {100 * o[f'{k}_overhead_wall']:+.1f}% "
                                      f"({100 * o[f'{k}_overhead_cpu']:+.1f}%)")
                                   for k in ("bare", "session", "session_pipeline")) + " |"]
    return "\n".join(lines) + "\n"


def save(result: dict, out: Path) -> None:
    write_text(out / "step_bench.json", json.dumps(result, indent=2))
    write_text(out / "step_bench.md", markdown(result))
