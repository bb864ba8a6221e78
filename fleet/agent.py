"""The board side of a fleet round: hand the global model to the live session, read its report.

Files only, numpy only (see :mod:`stoprt.runtime.stream.merge`): the agent writes ``merge.npz``
atomically, waits (bounded) for the session's ``merged.json`` of that round, then reads the session's
``report.npz``: the parameters just after the merge (the global model plus what the board learned
since the previous merge) and the labelled samples that learning counts, in all and per class. If the
session does not take the round in time (the stream ended, or is paused), the report is empty;
``merge.npz`` stays, so a session that starts or resumes later takes it at its first sample boundary.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.stream.merge import ACK_FILE, MERGE_FILE, REPORT_FILE, ROUND_KEY, read_arrays, write_arrays


@dataclass
class NodeReport:
    """What a board sends back for a round (``params`` None: nothing to aggregate)."""

    round: int
    params: dict[str, np.ndarray] | None
    labelled: int = 0
    correct: int = 0
    samples: int | None = None       # the session's samples so far (resumes included)
    class_labelled: list[int] | None = None  # [class]: labelled samples of it since the previous merge
    note: str = ""
    refused: str = ""  # why the session refused the round's global model (it does not fit this board's network)

    @property
    def accuracy(self) -> float | None:
        """The stream's own accuracy over the samples learned since the previous merge."""
        return self.correct / self.labelled if self.labelled else None


def _read_ack(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def exchange(checkpoint_dir: str | os.PathLike, rnd: int, global_params: dict[str, np.ndarray],
             timeout_s: float = 10.0, poll_s: float = 0.05) -> NodeReport:
    """Give round ``rnd``'s global model to the session in ``checkpoint_dir`` and return its report."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise ValueError(f"no session checkpoint folder {folder} (start `stoprt stream --learn --fleet "
                         f"--checkpoint {folder}` on this board)")
    write_arrays(folder / MERGE_FILE, {**global_params, ROUND_KEY: np.array(rnd)})
    deadline = time.monotonic() + timeout_s
    while True:
        ack = _read_ack(folder / ACK_FILE)
        if ack is not None and ack.get("round") == rnd:
            break
        if time.monotonic() >= deadline:
            return NodeReport(rnd, None, note=f"the session did not take round {rnd} within {timeout_s:g} s "
                                              "(stream stopped?); it takes it when it runs again")
        time.sleep(poll_s)
    if not ack.get("ok"):
        return NodeReport(rnd, None, note=f"the session refused round {rnd}: {ack.get('error')}",
                          refused=str(ack.get("error")))
    arrays = read_arrays(folder / REPORT_FILE)
    if int(arrays.get(ROUND_KEY, -1)) != rnd:
        return NodeReport(rnd, None, note=f"{REPORT_FILE} does not hold round {rnd}")
    counts = {k: int(arrays.pop(f"__{k}__")) for k in ("labelled", "correct", "samples")}
    by_class = arrays.pop("__class_labelled__", None)
    arrays.pop(ROUND_KEY)
    return NodeReport(rnd, arrays, **counts, class_labelled=None if by_class is None else [int(v) for v in by_class])
