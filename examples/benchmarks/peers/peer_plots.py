"""The PNG plots of the results page, drawn from the raw JSON sections ``run.py`` wrote."""

from __future__ import annotations

from pathlib import Path

from stoprt.runtime import atomic

import peer_methods

LABELS = peer_methods.LABELS
SUBDIR = "peers"  # this benchmark's folder inside the (shared) results folder


def folder(out: Path) -> Path:
    """Where the raw JSON and the plots of a results folder ``out`` live: ``<out>/peers``."""
    return Path(out) / SUBDIR
TIME_TARGET = 1.3  # STOP's time per step within this factor of the non-spiking floor
LATENCY_NAMES = {"stoprt-torch": "stoprt (torch, TorchStepRunner)", "stoprt-ort": "stoprt (ONNX Runtime, OrtStepRunner)",
                 "snntorch": "snnTorch (single step)", "spikingjelly": "SpikingJelly (single-step mode)"}


def ok(row: dict) -> bool:
    """A measured row (not skipped, not failed)."""
    return "error" not in row and "skipped" not in row


def plot(out: Path, mem, tim, acc, lat) -> list[str]:
    """PNG plots of the results folder ``out`` beside its JSON; returns what could not be drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return ["matplotlib is not installed: no plots (pip install matplotlib)"]
    if mem:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for key, ax, title in (("held_mib", axes[0], "held for training: saved + state (MiB)"),
                               ("saved_for_backward_mib", axes[1], "saved for backward (MiB)"),
                               ("rss_delta_mib", axes[2], "RSS peak - warmed baseline (MiB)")):
            for m in dict.fromkeys(r["method"] for r in mem["rows"]):
                pts = [(r["T"], r[key]) for r in mem["rows"] if r["method"] == m and ok(r)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=LABELS[m], linestyle="-" if m.startswith(("stop", "bptt")) else "--")
            ax.set(xscale="log", yscale="log", xlabel="time steps T", title=title)
            ax.set_xticks(mem["config"]["Ts"], [str(T) for T in mem["config"]["Ts"]])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("Training memory of one sample vs T (VGG-11 style)")
        _save(fig, folder(out) / "memory.png", plt)
    if tim and any(ok(r) for r in tim["results"]):
        res = [r for r in tim["results"] if ok(r)]
        fig, axes = plt.subplots(1, len(res), figsize=(5.5 * len(res), 4.2), squeeze=False)
        for ax, r in zip(axes[0], res):
            keys = [k for k in r["ms_per_step"] if k != "floor"]
            ax.barh([LABELS[k] for k in keys], [r["ms_per_step"][k] for k in keys], color="tab:blue")
            ax.axvline(r["ms_per_step"]["floor"], color="k", linestyle="--", label="non-spiking floor")
            ax.axvline(TIME_TARGET * r["ms_per_step"]["floor"], color="tab:red", linestyle=":", label=f"{TIME_TARGET}x floor")
            ax.set(xlabel="ms per training step", title=f"{r['name']}: width x{r['width']}, batch {r['batch']}")
            ax.invert_yaxis()
            ax.legend(fontsize=8)
        _save(fig, folder(out) / "timing.png", plt)
    if acc:
        datasets = acc["config"]["datasets"]
        methods = list(dict.fromkeys(r["method"] for r in acc["rows"]))
        fig, ax = plt.subplots(figsize=(10, 4.2))
        width, lowest = 0.8 / max(len(datasets), 1), 100.0
        for i, d in enumerate(datasets):
            vals = [next((100 * r["test_acc"] for r in acc["rows"] if r["method"] == m and r["data"] == d and ok(r)), 0)
                    for m in methods]
            bars = ax.bar([j + i * width for j in range(len(methods))], vals, width, label=d)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
            lowest = min([lowest] + [v for v in vals if v > 0])
        ax.set_xticks([j + width * (len(datasets) - 1) / 2 for j in range(len(methods))],
                      [LABELS[m] for m in methods], rotation=25, ha="right", fontsize=8)
        # the axis starts near the lowest bar: the differences are a few points
        ax.set(ylabel="held-out accuracy (%)", ylim=(max(0.0, lowest - 10.0), 101.0),
               title=f"Accuracy after {acc['config']['epochs']} epochs (axis does not start at 0)")
        ax.legend(loc="lower right", fontsize=8)
        _save(fig, folder(out) / "accuracy.png", plt)
    if lat and "backends" in lat:
        b = lat["backends"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh([LATENCY_NAMES.get(k, k) for k in b], [v["median_us"] for v in b.values()],
                xerr=[[0] * len(b), [v["p99_us"] - v["median_us"] for v in b.values()]],
                color=["tab:blue" if k.startswith("stoprt") else "tab:gray" for k in b])
        ax.set(xlabel="us per step (bar: median, whisker: p99)", title="Streaming inference, batch 1")
        ax.invert_yaxis()
        _save(fig, folder(out) / "latency.png", plt)
    return []


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
