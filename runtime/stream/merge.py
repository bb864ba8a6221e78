"""Merging a fleet's global model into a live stream session, at a sample boundary.

A board in a fleet keeps running its :class:`~stoprt.runtime.stream.session.StreamSession`; the fleet
agent beside it (``stoprt fleet node``, a Flower ClientApp) talks to the server. The two exchange
parameters through files in the session's checkpoint folder, never through the network, so the
session never waits on it:

* ``merge.npz`` (written atomically by the agent): the global model of round r, one array per
  parameter name, and the round as ``__round__``;
* ``session.pt`` (the session's own atomic checkpoint): after a merge its ``meta["fleet"]`` holds the
  round, the parameters just after the merge (the *base*) and the labelled samples (in all and per
  class) and correct predictions learned since the previous merge; a restarted session continues
  from it;
* ``report.npz`` (atomic, after that checkpoint): the same base and counts (also the labelled
  samples per class, which the server needs to weight the output layer's rows), the node's report
  for round r, in numpy's format, so that the agent needs no torch (on a 4 GB board a second torch
  process is memory the stream needs; this module imports torch only where the session calls it);
* ``merged.json`` (atomic, last): ``{"round": r, "ok": ...}``, so the agent knows the report is there.

:class:`FleetMerge` is the session's ``on_sample_end`` hook. At each sample boundary (the learner has
applied its update, the state is reset) it looks at ``merge.npz``; a new round is applied as

    p  <-  global + (p - base)        (base: the parameters right after the previous merge)

so what the stream learned since the previous merge (also while the round was on the network) is
kept on top of the global model (the averaging is then FedAvg over what each board learned since
the last merge, the board's "local epochs" being its stream between two rounds), then thresholds and leaks are clamped into their ranges by the
neurons themselves. A session that never merged (a new or late node) takes the global model as it is
(``p <- global``): its lone learning does not share the fleet's starting point, and its first report
then counts zero samples. The optimizer state (Adam moments) stays local. Checking costs one
``stat`` per sample; a damaged or mismatched merge file is refused with one warning and an ack that
says why, and the stream goes on learning alone.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_path, write_text

if TYPE_CHECKING:
    import torch
    from torch import nn

MERGE_FILE, REPORT_FILE, ACK_FILE = "merge.npz", "report.npz", "merged.json"
ROUND_KEY = "__round__"
_log = logging.getLogger(__name__)


def fleet_parameters(net: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a fleet shares: every learnable parameter (weights, thresholds, leaks)."""
    return dict(net.named_parameters())


def write_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Atomically write named arrays as ``.npz`` (read back with :func:`read_arrays`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` written by :func:`write_arrays`; ValueError for a damaged file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is damaged or not a .npz: {type(err).__name__}: {err}") from None


def parameter_bounds(net: nn.Module) -> dict[str, tuple[float, float]]:
    """``{name: (low, high)}`` of the parameters with a range, as the neurons declare it: thresholds
    at or above ``threshold_floor``, leaks inside ``leak_range``."""
    bounds: dict[str, tuple[float, float]] = {}
    for prefix, module in net.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in module.named_parameters(recurse=False):
            if name == "threshold" and hasattr(module, "threshold_floor"):
                bounds[dot + name] = (float(module.threshold_floor), float("inf"))
            elif name == "leak" and hasattr(module, "leak_range"):
                bounds[dot + name] = tuple(float(v) for v in module.leak_range)
    return bounds


def constrain(net: nn.Module) -> None:
    """Clamp every neuron's threshold and leak into its range (the neurons' own ``constrain_``)."""
    for module in net.modules():
        if hasattr(module, "constrain_"):
            module.constrain_()


class FleetMerge:
    """``on_sample_end`` hook of a stream session: applies ``DIR/merge.npz`` (see the module docstring).

    Args:
        directory: the session's checkpoint folder.
        saved: the checkpoint the session resumed from, if any (its ``meta["fleet"]`` is the base).
    """

    def __init__(self, directory: str | os.PathLike, saved: dict | None = None) -> None:
        self.directory = Path(directory)
        self.merge_path, self.ack_path = self.directory / MERGE_FILE, self.directory / ACK_FILE
        self.state: dict[str, Any] | None = ((saved or {}).get("meta") or {}).get("fleet")
        self._seen: tuple[int, int] | None = None
        self.applied = 0

    def __call__(self, session) -> None:
        if self.state is not None and "fleet" not in session.meta:
            session.meta["fleet"] = self.state  # checkpoints keep the base across restarts
        try:
            st = os.stat(self.merge_path)
        except FileNotFoundError:
            return
        key = (st.st_mtime_ns, st.st_size)
        if key == self._seen:
            return
        self._seen = key
        rnd = None
        try:
            arrays = read_arrays(self.merge_path)
            if ROUND_KEY not in arrays:
                raise ValueError(f"{self.merge_path} is not a fleet merge file (no {ROUND_KEY})")
            rnd = int(arrays.pop(ROUND_KEY))
            if self.state is not None and rnd <= self.state["round"]:
                return  # already applied (e.g. before a restart)
            self._apply(session, arrays)
        except (ValueError, OSError) as err:
            _log.warning("stoprt stream: fleet merge refused, learning alone: %s", err)
            write_text(self.ack_path, json.dumps({"round": rnd, "ok": False, "error": str(err)}))
            return
        previous = self.state
        stats = session.stats
        merged_before = previous is not None
        by_class = list(stats.labelled_by_class)
        before = previous.get("by_class", []) if merged_before else by_class
        before = before + [0] * (len(by_class) - len(before))
        self.state = {"round": rnd, "base": {k: p.detach().cpu().clone() for k, p in fleet_parameters(session.net).items()},
                      "labelled": stats.labelled_samples, "correct": stats.correct, "by_class": by_class,
                      "delta_labelled": stats.labelled_samples - previous["labelled"] if merged_before else 0,
                      "delta_correct": stats.correct - previous["correct"] if merged_before else 0,
                      "delta_by_class": [now - then for now, then in zip(by_class, before)]}
        session.meta["fleet"] = self.state
        if session.checkpoint_path is not None:
            session.save()
        write_arrays(self.directory / REPORT_FILE, {
            **{k: v.numpy() for k, v in self.state["base"].items()}, ROUND_KEY: np.array(rnd),
            "__labelled__": np.array(self.state["delta_labelled"]), "__correct__": np.array(self.state["delta_correct"]),
            "__class_labelled__": np.array(self.state["delta_by_class"], np.int64), "__samples__": np.array(stats.samples)})
        self.applied += 1
        write_text(self.ack_path, json.dumps({"round": rnd, "ok": True, "samples": stats.samples,
                                              "labelled": self.state["delta_labelled"]}))

    def _apply(self, session, arrays: dict[str, np.ndarray]) -> None:
        import torch  # the session's process has it loaded
        incoming = {k: torch.from_numpy(v) for k, v in arrays.items()}
        params = fleet_parameters(session.net)
        if set(incoming) != set(params):
            missing, extra = sorted(set(params) - set(incoming)), sorted(set(incoming) - set(params))
            raise ValueError(f"the global model does not fit this network (missing {missing[:3]}, unknown {extra[:3]})")
        for name, p in params.items():
            if tuple(incoming[name].shape) != tuple(p.shape):
                raise ValueError(f"the global model's {name!r} is {tuple(incoming[name].shape)}, this network's is "
                                 f"{tuple(p.shape)}")
            if not bool(torch.isfinite(incoming[name]).all()):
                raise ValueError(f"the global model's {name!r} holds NaN/Inf")
        base = None if self.state is None else self.state["base"]
        with torch.no_grad():
            for name, p in params.items():  # in place: a static or graphed step keeps its pointers
                g = incoming[name].to(p)
                p.copy_(g if base is None else g + (p - base[name].to(p)))
        constrain(session.net)
