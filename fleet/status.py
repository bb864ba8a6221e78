"""The server's record of a fleet run: ``status.json`` in the status folder, rewritten atomically each
round, read by ``stoprt fleet status``.

``{"config", "started", "updated", "rounds": [...], "nodes": {name: ...}}``: one entry per round (its
time, the nodes asked, which reports were aggregated, refused (with the reason) or missing, the bytes
of parameters sent to and received from each node), and per node its latest state (last round seen,
the accuracy its stream reported over the samples learned since the previous merge, labelled samples).
Bytes count the parameter payloads (the arrays' data), not Flower's framing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..runtime.atomic import write_text

STATUS_FILE = "status.json"


class FleetStatus:
    """Accumulates the rounds of one run and writes ``status.json``."""

    def __init__(self, folder: str | os.PathLike, config: dict) -> None:
        self.path = Path(folder) / STATUS_FILE
        self.data = {"config": config, "started": time.time(), "updated": time.time(), "rounds": [], "nodes": {}}
        self.write()

    def add_round(self, entry: dict) -> None:
        self.data["rounds"].append(entry)
        for name, node in entry["per_node"].items():
            known = self.data["nodes"].setdefault(name, {"first_round": entry["round"], "labelled_total": 0})
            known.update(node_id=node.get("node_id"), last_round=entry["round"], status=node["status"])
            if node.get("accuracy") is not None:
                known["accuracy"] = node["accuracy"]
            known["labelled_total"] += node.get("labelled", 0)
            if node.get("samples") is not None:
                known["samples"] = node["samples"]
        self.data["updated"] = time.time()
        self.write()

    def write(self) -> None:
        write_text(self.path, json.dumps(self.data, indent=1))


def read_status(folder: str | os.PathLike) -> dict:
    path = Path(folder) / STATUS_FILE
    if not path.is_file():
        raise ValueError(f"no fleet status at {path} (the server writes it after each round)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not a fleet status file: {err}") from None


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def format_status(data: dict) -> str:
    """A few lines for people: the rounds, then the nodes."""
    lines = [f"rounds: {len(data['rounds'])} of {data['config'].get('rounds', '?')}"]
    for r in data["rounds"]:
        lines.append(f"  round {r['round']}: {r['seconds']:.1f} s, {len(r['aggregated'])} aggregated, "
                     f"{len(r['refused'])} refused, {len(r['missing'])} missing, "
                     f"{r['bytes_sent'] + r['bytes_received']} bytes"
                     + (", global unchanged" if not r["global_changed"] else ""))
        for name, why in r["refused"].items():
            lines.append(f"    refused {name}: {why}")
    lines.append(f"nodes: {len(data['nodes'])}")
    for name, n in sorted(data["nodes"].items()):
        lines.append(f"  {name}: last round {n['last_round']} ({n['status']}), accuracy {_pct(n.get('accuracy'))}, "
                     f"{n['labelled_total']} labelled samples aggregated or reported")
    return "\n".join(lines)
