"""``stoprt profile``: measured memory, time and energy of training (STOP, BPTT) and inference vs T.

Each configuration (mode or backend x T) runs in a fresh subprocess
(``python -m stoprt.devices.cost.measure``, see there for the views) that prints one JSON row. A
configuration that runs out of memory, crashes, is killed or times out becomes a row saying so (with
what was measured until then), never a traceback here. Every row also carries the planner's
prediction (:mod:`stoprt.devices.cost.planner`) for the views it can be compared with:

* ``planned_saved_and_state_mib`` vs ``saved_and_state_peak_mib`` (exact, deterministic);
* ``planned_sample_peak_mib`` vs ``rss_peak_delta_mib`` (CPU live memory; glibc may hold more);
* ``planned_allocator_peak_mib`` vs ``allocator_peak_mib`` (CUDA).

STOP rows on CUDA also carry ``graph_pool_mib``: the private memory pool of the static step's CUDA
graphs (:func:`~stoprt.devices.cost.profile.graph_pool_note` says it in the table; on a CPU, that it
does not apply).

Writes ``profile.csv``, ``profile.json`` and ``profile.png`` (memory vs T) to the output folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from ...runtime.atomic import write_bytes
from .planner import MIB, MemoryPlanner

COLUMNS = ("model", "mode", "backend", "device", "T", "batch", "status", "error", "steps_done", "time_per_step_ms",
           "saved_for_backward_peak_mib", "state_mib", "saved_and_state_peak_mib", "planned_saved_and_state_mib",
           "rss_baseline_mib", "rss_peak_delta_mib", "planned_sample_peak_mib", "allocator_baseline_mib",
           "allocator_peak_mib", "allocator_reserved_peak_mib", "planned_allocator_peak_mib",
           "system_used_baseline_mib", "system_used_peak_delta_mib", "persistent_mib", "energy_per_step_mj",
           "power_rail", "limit_mib", "graph_pool_mib")


def configurations(model: str, modes: list[str], Ts: list[int], batch: int, *, infer: bool = False,
                   backends: list[str] | None = None, **common) -> list[dict]:
    """One config per (mode, T) for training, or per (backend, T) with ``infer``."""
    if batch < 1 or not Ts or min(Ts) < 1:
        raise ValueError(f"batch and every T must be at least 1 (got batch {batch}, T {Ts})")
    if infer:
        kinds = [("infer", b) for b in (backends or ["torch", "onnxruntime", "tensorrt"])]
    else:
        bad = [m for m in modes if m not in ("stop", "bptt")]
        if bad:
            raise ValueError(f"unknown mode {bad[0]!r}; training modes are stop and bptt (inference: --infer)")
        if backends and backends != ["torch"]:
            raise ValueError("training runs on torch; ONNX Runtime and TensorRT profile inference (--infer)")
        kinds = [(m, "torch") for m in modes]
    for _, b in kinds:
        if b not in ("torch", "onnxruntime", "tensorrt"):
            raise ValueError(f"unknown backend {b!r}; choose torch, onnxruntime or tensorrt")
    return [{"model": model, "mode": m, "backend": b, "T": T, "batch": batch, **common}
            for m, b in kinds for T in Ts]


def run_child(cfg: dict, timeout_s: float, command: list[str] | None = None, env: dict | None = None) -> dict:
    """Run one configuration in a fresh process; a failure becomes a row with a status and a reason.

    ``command`` replaces the child command line (tests use it to stand in for crashes); ``env`` adds
    environment variables (e.g. glibc's ``MALLOC_TRIM_THRESHOLD_``).
    """
    cmd = command or [sys.executable, "-m", "stoprt.devices.cost.measure", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    if proc.returncode == -9:
        return {"status": "killed", "error": "killed by SIGKILL (the kernel's out-of-memory killer, most likely)"}
    if proc.returncode < 0:
        return {"status": "crashed", "error": f"terminated by signal {-proc.returncode}: {last}"}
    return {"status": "error", "error": f"exit code {proc.returncode}: {last}"}


def _planned(planner: MemoryPlanner, cfg: dict, optimizer: str) -> dict:
    mode = cfg["mode"]
    if cfg["backend"] != "torch":  # ONNX Runtime / TensorRT arenas are not modelled
        return {}
    plan = planner.plan(mode, cfg["batch"], cfg["T"], optimizer=optimizer, device=cfg.get("device", "cpu"))
    out = {"planned_sample_peak_mib": plan.sample_peak / MIB,
           "planned_saved_and_state_mib": plan.saved_and_state / MIB if mode != "infer" else None}
    if cfg.get("device", "cpu").startswith("cuda"):
        out["planned_allocator_peak_mib"] = (plan.persistent + plan.sample_peak) / MIB
    return out


def run_profile(configs: list[dict], planner: MemoryPlanner | None = None, timeout_s: float = 600.0,
                echo=print, env: dict | None = None) -> list[dict]:
    """Measure every configuration in its own process; rows in order, with the planner's figures."""
    rows = []
    for cfg in configs:
        label = f"{cfg['mode'] if cfg['mode'] != 'infer' else 'infer/' + cfg['backend']} T={cfg['T']}"
        echo(f"  {label} ...", end=" ", flush=True)
        row = {k: cfg.get(k) for k in ("model", "mode", "backend", "T", "batch")}
        row["device"] = cfg.get("device", "cpu")
        row.update(run_child(cfg, timeout_s, env=env))
        if planner is not None:
            row.update(_planned(planner, cfg, cfg.get("optimizer", "adam")))
        echo(row["status"] if row["status"] != "ok" else f"{row.get('time_per_step_ms', 0):.1f} ms/step", flush=True)
        rows.append(row)
    return rows


def _fmt(value, spec: str | None = None) -> str:
    if value is None:
        return "-"
    return format(value, spec or (".1f" if abs(value) >= 10 else ".3g"))


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: one line per configuration, measured (planned) in MiB."""
    head = (f"{'mode':18s} {'T':>6s} {'status':8s} {'ms/step':>8s} {'saved+state (plan)':>20s} "
            f"{'RSS delta (plan)':>20s} {'alloc peak (plan)':>20s} {'system delta':>12s} {'mJ/step':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mode = r["mode"] if r["mode"] != "infer" else f"infer/{r['backend']}"
        pair = lambda a, b: f"{_fmt(r.get(a))} ({_fmt(r.get(b))})"  # noqa: E731
        lines.append(f"{mode:18s} {r['T']:>6d} {r['status']:8s} {_fmt(r.get('time_per_step_ms')):>8s} "
                     f"{pair('saved_and_state_peak_mib', 'planned_saved_and_state_mib'):>20s} "
                     f"{pair('rss_peak_delta_mib', 'planned_sample_peak_mib'):>20s} "
                     f"{pair('allocator_peak_mib', 'planned_allocator_peak_mib'):>20s} "
                     f"{_fmt(r.get('system_used_peak_delta_mib')):>12s} {_fmt(r.get('energy_per_step_mj'), '.2f'):>8s}")
        if r["status"] != "ok" and r.get("error"):
            lines.append(f"{'':18s} {'':>6s} -> {r['error']}")
    note = graph_pool_note(rows)
    return "\n".join(lines + ([note] if note else []))


def graph_pool_note(rows: list[dict]) -> str | None:
    """One line on the CUDA graphs' memory pool of the static STOP step (``graph_pool_mib``, read by
    :func:`~stoprt.devices.cost.measure.graph_pool_mib`), or that it does not apply; None without
    STOP rows."""
    stop = [r for r in rows if r["mode"] == "stop" and r["status"] == "ok"]
    if not stop:
        return None
    if not str(stop[0].get("device", "cpu")).startswith("cuda"):
        return "CUDA graph pool: does not apply (no CUDA graphs on a CPU; the static step runs directly)"
    pools = sorted({r["graph_pool_mib"] for r in stop if r.get("graph_pool_mib") is not None})
    if not pools:
        return "CUDA graph pool: none (the static STOP step was not captured here)"
    return (f"CUDA graph pool of the static STOP step (learning step, update, inference; batch "
            f"{stop[0]['batch']}): {' / '.join(f'{p:.1f}' for p in pools)} MiB")


def plot(rows: list[dict], title: str) -> bytes | None:
    """PNG of the memory views vs T, one line per mode/backend, planned figures dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    views = (("saved_and_state_peak_mib", "planned_saved_and_state_mib", "saved for backward + state"),
             ("rss_peak_delta_mib", "planned_sample_peak_mib", "process RSS peak - baseline"),
             ("allocator_peak_mib", "planned_allocator_peak_mib", "CUDA allocator peak"),
             ("system_used_peak_delta_mib", None, "system used - baseline"))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    series = sorted({(r["mode"], r["backend"]) for r in rows})
    Ts = sorted({r["T"] for r in rows})
    for ax, (key, planned, name) in zip(axes, views):
        drawn = False
        for mode, backend in series:
            label = mode.upper() if mode != "infer" else f"infer/{backend}"
            pts = [(r["T"], r[key]) for r in rows if (r["mode"], r["backend"]) == (mode, backend)
                   and r.get(key) is not None]
            if pts:
                line, = ax.plot(*zip(*sorted(pts)), marker="o", label=label)
                drawn = True
                plan = [(r["T"], r[planned]) for r in rows if planned and r.get(planned) is not None
                        and (r["mode"], r["backend"]) == (mode, backend)]
                if plan:
                    ax.plot(*zip(*sorted(plan)), linestyle="--", color=line.get_color(), label=f"{label} planned")
        ax.set_title(f"{name} (MiB)", fontsize=10)
        ax.set_xlabel("time steps T")
        if drawn:
            ax.set_xscale("log")
            ax.set_xticks(Ts, [str(t) for t in Ts])
            ax.minorticks_off()
            ax.legend(fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "not measured here", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def machine() -> dict:
    """Where the profile ran (the CUDA device name when torch sees one)."""
    import torch
    info = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "cuda_device": None}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def write_outputs(out_dir: Path, rows: list[dict], meta: dict) -> list[Path]:
    """profile.csv, profile.json and profile.png (if matplotlib is there), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    written = [out_dir / "profile.csv", out_dir / "profile.json"]
    write_bytes(written[0], text.getvalue().encode())
    write_bytes(written[1], (json.dumps({**meta, "rows": rows}, indent=2) + "\n").encode())
    png = plot(rows, meta.get("title", "stoprt profile"))
    if png is not None:
        written.append(out_dir / "profile.png")
        write_bytes(written[2], png)
    return written
