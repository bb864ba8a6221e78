"""One round's aggregation: validate each node's report, then a weighted average (numpy only).

A report is a node's parameters (weights, thresholds, leaks, by name) and the number of labelled
samples it learned since the previous merge. A report whose names, shapes or dtypes differ from the
global model's, or that holds NaN/Inf, or a bad count, is refused with the reason, and the round goes
on with the others.

FedAvg weights each node by its labelled samples. ``prox_mu > 0`` damps the step towards the previous
global model, FedProx-style on the server: the result minimises
``sum_i w_i |g - p_i|^2 + mu |g - g_prev|^2``, that is ``(avg + mu * g_prev) / (1 + mu)``. Both are convex
combinations, so parameters inside their ranges stay inside; the result is clamped to the ranges
anyway (``bounds``, from :func:`stoprt.runtime.stream.merge.parameter_bounds`), since a node may send
values outside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

Params = dict[str, np.ndarray]


@dataclass
class Report:
    """One node's contribution to a round."""

    node: str
    params: Params
    labelled: int
    accuracy: float | None = None


def check_report(params: Mapping[str, np.ndarray], labelled, reference: Params) -> str | None:
    """Why ``params``/``labelled`` cannot be aggregated against ``reference``, or None if they can."""
    if not isinstance(labelled, (int, np.integer)) or isinstance(labelled, bool) or labelled < 0:
        return f"labelled-sample count {labelled!r} is not an integer >= 0"
    missing, extra = sorted(set(reference) - set(params)), sorted(set(params) - set(reference))
    if missing or extra:
        return f"parameter names differ (missing {missing[:3]}, unknown {extra[:3]})"
    for name, ref in reference.items():
        p = params[name]
        if tuple(p.shape) != tuple(ref.shape):
            return f"{name!r} has shape {tuple(p.shape)}, expected {tuple(ref.shape)}"
        if not np.issubdtype(p.dtype, np.floating):
            return f"{name!r} has dtype {p.dtype}, expected a float dtype"
        bad = int(np.size(p) - np.count_nonzero(np.isfinite(p)))
        if bad:
            return f"{name!r} holds {bad} NaN/Inf value(s)"
    return None


def clamp(params: Params, bounds: Mapping[str, tuple[float, float]]) -> Params:
    """Each parameter with a range clipped into it (thresholds above their floor, leaks inside)."""
    return {k: np.asarray(np.clip(v, *bounds[k]), dtype=v.dtype) if k in bounds else v for k, v in params.items()}


def fedavg(previous: Params, reports: list[Report], bounds: Mapping[str, tuple[float, float]],
           prox_mu: float = 0.0) -> Params | None:
    """The labelled-sample-weighted average of validated ``reports`` (damped towards ``previous``
    with ``prox_mu``), clamped to ``bounds``; None when no report counts a sample."""
    if prox_mu < 0:
        raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
    total = sum(r.labelled for r in reports)
    if total == 0:
        return None
    out: Params = {}
    for name, ref in previous.items():
        acc = np.zeros(ref.shape, np.float64)
        for r in reports:
            if r.labelled:
                acc += (r.labelled / total) * r.params[name].astype(np.float64)
        if prox_mu:
            acc = (acc + prox_mu * ref.astype(np.float64)) / (1.0 + prox_mu)
        out[name] = acc.astype(ref.dtype)
    return clamp(out, bounds)
