"""Fleet benchmark: accuracy against rounds for the fleet and for each board alone, bytes per round and
round time, on a real fleet on this machine (stoprt.fleet.local.LocalFleet: a SuperLink, three
SuperNodes, three `stoprt stream --learn --fleet` on non-IID shares of the built-in digits).

    python examples/benchmarks/fleet_bench.py --rounds 7 --round-every 18 --head-weights class --out docs/results/fleet
    python examples/benchmarks/fleet_bench.py --rounds 7 --round-every 18 --head-weights samples --out docs/results/fleet

Writes fleet_bench_HEAD.json (and fleet_bench_HEAD.png with matplotlib), HEAD being how the server
averages the output layer's rows (``stoprt fleet run --head-weights``). The held-out accuracy is over
all ten classes (the last digits of the pool, never streamed); "alone" is a board's share learned
without the fleet for as many labelled samples as that board had learned by the round (same STOP,
Adam, lr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from stoprt.export.loading import load_network
from stoprt.fleet import shares
from stoprt.fleet.config import HEAD_WEIGHTS
from stoprt.fleet.local import LocalFleet
from stoprt.fleet.model import load_global
from stoprt.runtime.atomic import write_text

GROUPS = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
DURATION, GAP, DT = 300_000, 300_000, 30_000


def _rounds(work: Path) -> list:
    try:
        return json.loads((work / "status" / "status.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--share", type=int, default=280, help="recordings per board (at most 283 fit the pool)")
    ap.add_argument("--head-weights", choices=HEAD_WEIGHTS, default=HEAD_WEIGHTS[0])
    ap.add_argument("--round-every", type=float, default=18.0, help="seconds between round starts")
    ap.add_argument("--out", default="docs/results/fleet")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    events, labels = shares.digit_pool(DURATION)
    picks = [shares.share_indices(labels, g, args.share, 0.15, seed=i) for i, g in enumerate(GROUPS)]
    sources = [shares.write_share(work, f"share{i}", events, labels, p, GAP) for i, p in enumerate(picks)]
    globals_ = []
    load_before = os.getloadavg()
    start = time.time()
    with LocalFleet(work, sources, ["--realtime", "--threads", "1", "--checkpoint-every", "0"]) as fleet:
        fleet.start_link()
        fleet.wait_for_link()
        for i in range(3):
            fleet.start_node(i)
            fleet.start_stream(i)
        fleet.start_run({"rounds": args.rounds, "min-nodes": 2, "node-wait": 60.0, "round-timeout": 90.0,
                         "straggler-wait": 5.0, "round-every": args.round_every, "ack-timeout": 20.0, "size": 16,
                         "head-weights": args.head_weights})
        while fleet.procs["run"].poll() is None and time.time() - start < 60 * (2 + args.rounds):
            if len(_rounds(work)) > len(globals_):
                copy = work / f"global-{len(globals_) + 1}.pt"
                shutil.copy(work / "status" / "global.pt", copy)
                globals_.append(copy)
            time.sleep(0.5)
        for i in range(3):
            fleet.signal(f"stream{i}", signal.SIGTERM)
    load_after = os.getloadavg()
    rounds = _rounds(work)
    n = len(labels)
    held, track = shares.lay_out(events, labels, range(n - shares.HELD_OUT, n), GAP)
    held_steps = shares.stream_steps(held, 16, DT)
    boards = []
    for p in picks:
        share, share_track = shares.lay_out(events, labels, p, GAP)
        torch.manual_seed(0)
        solo = load_network("mlp", {"in_channels": 2, "size": 16, "classes": 10}).net
        boards.append(shares.LoneBoard(solo, shares.stream_steps(share, 16, DT), share_track, lr=1e-3))
    rows, learned = [], [0, 0, 0]
    for r, entry in enumerate(rounds):
        net, _ = load_global(globals_[r]) if r < len(globals_) else load_global(work / "status" / "global.pt")
        alone = []
        for i, board in enumerate(boards):
            learned[i] += entry["per_node"].get(f"node{i}", {}).get("labelled", 0)
            alone.append(shares.evaluate(board.learn_until(learned[i]), held_steps, track))
        rows.append({"round": entry["round"], "seconds": entry["seconds"], "bytes_sent": entry["bytes_sent"],
                     "bytes_received": entry["bytes_received"], "labelled_per_node": list(learned),
                     "fleet_accuracy": shares.evaluate(net, held_steps, track), "alone_accuracy": alone,
                     "per_node_bytes": {k: {"sent": v.get("sent", 0), "received": v.get("received", 0)}
                                        for k, v in entry["per_node"].items()}})
        print(json.dumps({k: rows[-1][k] for k in ("round", "seconds", "bytes_sent", "fleet_accuracy", "alone_accuracy")}),
              flush=True)
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch thread, python {sys.version.split()[0]}",
              "note": "shared 2-core machine under load from other jobs; round times are inflated",
              "load_average_1min": {"before": load_before[0], "after_fleet": load_after[0]},
              "share": args.share, "head_weights": args.head_weights, "round_every_s": args.round_every, "rounds": rows}
    write_text(out / f"fleet_bench_{args.head_weights}.json", json.dumps(result, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    x = [r["round"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    ax[0].plot(x, [r["fleet_accuracy"] for r in rows], "o-", label="fleet (global)")
    for i in range(3):
        ax[0].plot(x, [r["alone_accuracy"][i] for r in rows], "--", label=f"node{i} alone")
    ax[0].set(xlabel="round", ylabel="held-out accuracy (10 classes)")
    ax[0].legend(fontsize=7)
    ax[1].bar(x, [(r["bytes_sent"] + r["bytes_received"]) / 2**20 for r in rows])
    ax[1].set(xlabel="round", ylabel="MiB of parameters per round")
    ax[2].bar(x, [r["seconds"] for r in rows])
    ax[2].set(xlabel="round", ylabel="round time (s)")
    fig.suptitle(f"head weights: {args.head_weights}")
    fig.tight_layout()
    fig.savefig(out / f"fleet_bench_{args.head_weights}.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
