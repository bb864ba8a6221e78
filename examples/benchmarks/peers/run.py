"""stoprt against the SNN libraries users pick today (snnTorch, SpikingJelly), on one machine, in one run.

    python examples/benchmarks/peers/run.py --out docs/results            # everything (~25-35 min, 2 cores)
    python examples/benchmarks/peers/run.py --out docs/results --report-only   # rebuild the page from the JSON
    python examples/benchmarks/peers/run.py --quick --no-peers --out runs/peers-quick   # smoke run

Measurements, each side by side on the same network, data and initial weights:

1. memory: peak training memory of one sample vs T (VGG-11 style), each (method, T) in a fresh process;
2. timing: training time per step, all methods interleaved in one process, vs a non-spiking floor;
3. accuracy: held-out accuracy after the same epochs on the built-in digits and gestures;
4. latency: streaming inference per step at batch 1 (stoprt torch and ONNX Runtime vs the peers).

The peers run in a separate environment this script creates at ``runs/bench-env`` (see
``bench_env.py``; reused while its recipe holds). Raw results go to ``<out>/peers/*.json``; the page
``<out>.md`` (``docs/results.md`` for ``--out docs/results``) and its plots are generated from them
by ``peer_report.py``, so ``--report-only`` rebuilds the page without measuring. The raw files live in
the subfolder ``<out>/peers`` so that other benchmarks' results can share ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from stoprt.runtime import atomic

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_env  # noqa: E402
import peer_methods  # noqa: E402
import peer_report  # noqa: E402

SECTIONS = ("memory", "timing", "accuracy", "latency")
ALL = peer_methods.METHODS
TRAIN_METHODS = ("stop-w", "stop-wtl", "bptt", "snntorch-bptt", "sj-bptt", "sj-ottt")


def _write_json(path: Path, data) -> None:
    atomic.write_text(path, json.dumps(data, indent=2) + "\n")


class Runner:
    """Starts measurement processes: stoprt's methods with this interpreter, the peers' in the
    bench env; records failures instead of stopping the run."""

    def __init__(self, peer_python: Path | None, threads: int, log) -> None:
        self.peer_python, self.threads, self.log = peer_python, threads, log

    def python_for(self, methods) -> str | None:
        if any(m in peer_methods.LIBRARY for m in methods):
            return str(self.peer_python) if self.peer_python else None
        return sys.executable

    def child(self, python: str, task: str, args: list, timeout: float, threads: int | None = None) -> dict:
        """Run ``peer_child.py task args`` and return its JSON line, or ``{"error": why}``."""
        cmd = [python, str(HERE / "peer_child.py"), task, "--threads", str(threads or self.threads), *map(str, args)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish within {timeout:.0f} s"}
        if out.returncode != 0:
            tail = [ln for ln in out.stderr.strip().splitlines() if "Triton" not in ln][-3:]
            return {"error": " | ".join(tail) or f"exit code {out.returncode}"}
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {"error": f"no result line in the output: {out.stdout.strip()[-300:]!r}"}


def run_memory(r: Runner, c: dict) -> dict:
    rows = []
    cap = c["cap_mib"]
    for method in c["methods"]:
        python = r.python_for([method])
        measured: list[dict] = []
        for T in c["Ts"]:
            base = {"method": method, "T": T, "batch": c["batch"]}
            if python is None:
                rows.append({**base, "skipped": "peer environment unavailable"})
                continue
            predicted = _predict_rss(measured, T)
            if predicted is not None and predicted > cap:
                rows.append({**base, "skipped": f"predicted RSS ~{predicted:.0f} MiB exceeds the cap {cap:.0f} MiB"})
                r.log(f"  {method:14s} T={T:4d}: skipped (predicted ~{predicted:.0f} MiB > cap {cap:.0f} MiB)")
                continue
            row = r.child(python, "memory", ["--method", method, "--T", T, "--batch", c["batch"], "--size", c["size"],
                                             "--width", c["width"]], timeout=c["timeout"])
            row = {**base, **row}
            rows.append(row)
            if "error" in row:
                r.log(f"  {method:14s} T={T:4d}: FAILED {row['error']}")
                continue
            measured.append(row)
            r.log(f"  {method:14s} T={T:4d}: held {row['held_mib']:8.1f} MiB, "
                  f"saved-for-backward {row['saved_for_backward_mib']:8.1f} MiB, "
                  f"RSS delta {row['rss_delta_mib']:8.1f} MiB, {1e3 * row['seconds_per_step']:6.1f} ms/step")
    return {"config": c, "rows": rows}


def _predict_rss(measured: list[dict], T: int) -> float | None:
    """RSS delta expected at T from the smaller Ts measured: a line through the last two (memory
    grows at most linearly in T), or proportional to T from a single one."""
    if not measured:
        return None
    last = measured[-1]
    if len(measured) == 1:
        return last["rss_delta_mib"] * T / last["T"]
    prev = measured[-2]
    slope = max(0.0, (last["rss_delta_mib"] - prev["rss_delta_mib"]) / (last["T"] - prev["T"]))
    return last["rss_delta_mib"] + slope * (T - last["T"])


def run_timing(r: Runner, c: dict) -> dict:
    methods = [m for m in c["methods"] if r.python_for([m])]
    if not methods:
        return {"config": c, "methods": [], "results": [], "skipped": "no method can run (peer environment unavailable)"}
    python = r.python_for(methods)
    results = []
    for cfg in c["configs"]:
        args = ["--methods", *methods, "--T", c["T"], "--repeats", c["repeats"], "--batch", cfg["batch"],
                "--size", cfg["size"], "--width", cfg["width"]]
        load = os.getloadavg()[0]
        res = {**cfg, "load_before": load, **r.child(python, "timing", args, timeout=c["timeout"])}
        res["load_after"] = os.getloadavg()[0]
        results.append(res)
        if "error" in res:
            r.log(f"  {cfg['name']}: FAILED {res['error']}")
        else:
            ms = res["ms_per_step"]
            r.log(f"  {cfg['name']}: " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()) + " ms/step")
    return {"config": c, "methods": methods, "results": results}


def run_accuracy(r: Runner, c: dict) -> dict:
    rows = []
    for data in c["datasets"]:
        for method in c["methods"]:
            python = r.python_for([method])
            base = {"method": method, "data": data}
            if python is None:
                rows.append({**base, "skipped": "peer environment unavailable"})
                continue
            args = ["--method", method, "--data", data, "--model", c["model"], "--size", c["size"],
                    "--width", c["width"], "--T", c["T"], "--epochs", c["epochs"], "--batch", c["batch"],
                    "--lr", c["lr"], "--seed", c["seed"]]
            for key in ("n_train", "n_test"):
                if c.get(key):
                    args += [f"--{key.replace('_', '-')}", c[key]]
            t0 = time.perf_counter()
            row = {**base, **r.child(python, "accuracy", args, timeout=c["timeout"], threads=c["threads"]),
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            r.log(f"  {data:8s} {method:14s}: " + (f"FAILED {row['error']}" if "error" in row else
                                                    f"{100 * row['test_acc']:5.1f}% ({row['seconds']:.0f} s)"))
    return {"config": c, "rows": rows}


def run_latency(r: Runner, c: dict) -> dict:
    python = r.python_for(["snntorch-bptt", "sj-bptt"])
    args = ["--model", c["model"], "--size", c["size"], "--width", c["width"], "--steps", c["steps"],
            "--rounds", c["rounds"]] + ([] if python else ["--stoprt-only"])
    python = python or sys.executable
    res = r.child(python, "latency", args, timeout=c["timeout"], threads=c["threads"])
    if "error" in res:
        r.log(f"  FAILED {res['error']}")
    else:
        for k, v in res["backends"].items():
            r.log(f"  {k:14s}: median {v['median_us']:8.1f} us/step, p99 {v['p99_us']:8.1f} us")
        for k, why in res["skipped"].items():
            r.log(f"  {k:14s}: skipped ({why})")
    return {"config": c, **res}


def configs(a) -> dict:
    """What each section measures (the full run, or the tiny --quick one)."""
    q = a.quick
    return {
        "memory": {"model": "vgg11", "size": 16 if q else 32, "width": 0.25 if q else 0.5, "batch": 2 if q else 8,
                   "Ts": [3, 6] if q else [10, 30, 100, 300], "methods": ["stop-w", "stop-wtl", "bptt"] if q else list(TRAIN_METHODS),
                   "cap_mib": a.mem_cap_mib, "timeout": 900},
        "timing": {"model": "vgg11", "T": 3 if q else 10, "repeats": 1 if q else 7, "timeout": 1200,
                   "methods": ["stop-w", "stop-wtl", "bptt"] if q else list(TRAIN_METHODS),
                   "configs": [{"name": "small", "size": 16, "width": 0.25, "batch": 2}] if q else
                   [{"name": "small", "size": 32, "width": 0.5, "batch": 8},
                    {"name": "large", "size": 32, "width": 1.0, "batch": 16}]},
        "accuracy": {"model": "mlp" if q else "dvs_gesture", "size": 8 if q else 16, "width": 0.25 if q else 1.0,
                     "T": 4 if q else 10, "epochs": 1 if q else a.epochs, "batch": 16, "lr": 1e-3, "seed": 0,
                     "optimizer": "adam", "datasets": ["digits"] if q else ["digits", "gestures"],
                     "n_train": 64 if q else None, "n_test": 32 if q else None,
                     "methods": ["stop-wtl", "bptt"] if q else list(TRAIN_METHODS), "timeout": 1800,
                     # one thread: accuracy does not depend on it, and a single thread keeps the wall time
                     # sane when other jobs share the cores (two spinning threads then slow down many-fold)
                     "threads": 1},
        "latency": {"model": "dvs_gesture", "size": 16 if q else 32, "width": 0.25 if q else 1.0,
                    "steps": 60 if q else 2000, "rounds": 2 if q else 4, "threads": 1, "timeout": 600},
    }


def machine(peers: dict | None) -> dict:
    import torch
    import stoprt
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
             if ln.startswith("model name")] if cpuinfo.exists() else []
    cpu = names[0] if names else platform.processor() or platform.machine()
    versions = {"python": platform.python_version(), "torch": torch.__version__, "stoprt": stoprt.__version__}
    try:
        import onnxruntime
        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if peers:
        versions.update(snntorch=peers["snntorch"], spikingjelly=peers["spikingjelly"])
    return {"platform": platform.platform(), "cpu": cpu, "cores": psutil.cpu_count(),
            "memory_gib": psutil.virtual_memory().total / 2**30, "versions": versions}


SOURCE = ("__init__.py", "cli.py", "runtime", "export", "devices")  # stoprt itself, as measured


def tree_state() -> dict:
    """The last commit that changed stoprt's source and its uncommitted source changes, if this is a
    git checkout (read-only git calls). Commits to docs, tests or benchmarks do not count."""
    root = HERE.parents[2]
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "log", "-1", "--format=%h", "--", *SOURCE], capture_output=True, text=True,
                                timeout=30)
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", *SOURCE],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if commit.returncode != 0:
        return {}
    return {"commit": commit.stdout.strip(), "modified": [ln[3:] for ln in status.stdout.splitlines()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results",
                   help="results folder: raw JSON and plots go to <out>/peers, the page to <out>.md")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="measure only these; the others keep their earlier JSON")
    p.add_argument("--report-only", action="store_true", help="rebuild the page from the JSON in --out")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not results")
    p.add_argument("--no-peers", action="store_true", help="stoprt only: do not create or use the bench env")
    p.add_argument("--bench-env", default="runs/bench-env", help="where the peers' environment lives")
    p.add_argument("--methods", nargs="+", choices=ALL, help="measure only these methods (default: all of a section's)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the accuracy comparison")
    p.add_argument("--mem-cap-mib", type=float,
                   default=min(8192.0, 0.5 * psutil.virtual_memory().available / 2**20),
                   help="skip memory configurations predicted to need more (default: min(8 GiB, half of free))")
    p.add_argument("--threads", type=int, default=psutil.cpu_count())
    a = p.parse_args(argv)
    out = Path(a.out)
    folder = peer_report.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        page = peer_report.write(out)
        print(f"wrote {page}")
        return 0
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t_start, peers, notes = time.perf_counter(), None, []
    if a.no_peers:
        notes.append("peers not run (--no-peers)")
    else:
        try:
            peers = bench_env.ensure(Path(a.bench_env), log)
        except bench_env.BenchEnvError as err:
            notes.append(f"peers not run: {err}")
            log(f"peers unavailable, measuring stoprt only: {err}")
    runner = Runner(bench_env.env_python(Path(a.bench_env)) if peers else None, a.threads, log)
    cfg = configs(a)
    if a.methods:
        for section in ("memory", "timing", "accuracy"):
            cfg[section]["methods"] = list(a.methods)
    sections = {"memory": run_memory, "timing": run_timing, "accuracy": run_accuracy, "latency": run_latency}
    durations = {}
    for name in a.sections:
        log(f"{name}:")
        t0, tree = time.perf_counter(), tree_state()  # the source measured, read as the section starts
        result = sections[name](runner, cfg[name])
        durations[name] = time.perf_counter() - t0
        if tree != tree_state():
            tree["changed_during_section"] = True  # another commit or edit landed while it ran
        _write_json(folder / f"{name}.json", {**result, "seconds": durations[name], "quick": a.quick, "tree": tree,
                                           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                           "load_average_at_end": os.getloadavg()[0]})
    run_info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": "python " + " ".join([os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])]),
                "machine": machine(peers), "threads": a.threads, "peers_env": peers, "notes": notes,
                "sections_run": a.sections, "section_seconds": durations, "total_seconds": time.perf_counter() - t_start,
                "load_average_at_end": list(os.getloadavg()), "quick": a.quick}
    _write_json(folder / "run.json", run_info)
    page = peer_report.write(out)
    log(f"done in {run_info['total_seconds'] / 60:.1f} min; wrote {page} and {folder}/*.json, *.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
