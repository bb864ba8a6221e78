"""One round's aggregation: validate each node's report, then a weighted average (numpy only).

A report is a node's parameters (weights, thresholds, leaks, by name) and the number of labelled
samples it learned since the previous merge, in all and per class. A report whose names, shapes or
dtypes differ from the global model's, or that holds NaN/Inf, or a bad count, is refused with the
reason, and the round goes on with the others.

FedAvg weights each node by its labelled samples. The output layer's rows (``class_rows``: the
parameters whose first axis is the class) are weighted per class instead: row ``c`` of node ``i`` by
``n_ic + n_i / K``, the samples of class ``c`` it learned plus an even share of all its labelled
samples (``K`` classes). Boards that see mostly their own classes (non-IID) each teach their classes'
rows to fire and push the other rows down; averaged with plain weights, every row is pushed down by
most of the nodes and the global model falls silent on most inputs (measured on the built-in digits:
it then loses to a board alone). Weighted by class counts alone, each row only learns when to fire,
never when to stay quiet, and one row after another comes to fire on everything (the global model
swings between rounds); the even share keeps some of that. The layers below are shared by all, as
in FedAvg.
``prox_mu > 0`` damps the step towards the previous
global model, FedProx-style on the server: the result minimises
``sum_i w_i |g - p_i|^2 + mu |g - g_prev|^2``, that is ``(avg + mu * g_prev) / (1 + mu)``. Both are convex
combinations, so parameters inside their ranges stay inside; the result is clamped to the ranges
anyway (``bounds``, from :func:`stoprt.runtime.stream.merge.parameter_bounds`), since a node may send
values outside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

Params = dict[str, np.ndarray]


@dataclass
class Report:
    """One node's contribution to a round."""

    node: str
    params: Params
    labelled: int
    accuracy: float | None = None
    class_labelled: np.ndarray | None = None  # [class]: labelled samples of it (None: weights by ``labelled``)


def _is_count(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0


def check_report(params: Mapping[str, np.ndarray], labelled, reference: Params, class_labelled=None,
                 classes: int | None = None) -> str | None:
    """Why ``params``/``labelled``/``class_labelled`` (optional: labelled samples per class, at most
    ``classes`` of them) cannot be aggregated against ``reference``, or None if they can."""
    if not _is_count(labelled):
        return f"labelled-sample count {labelled!r} is not an integer >= 0"
    if class_labelled is not None:
        counts = list(class_labelled)
        if not all(_is_count(v) for v in counts) or sum(counts) != labelled:
            return f"labelled samples per class {counts[:12]} are not integers >= 0 summing to {labelled}"
        if classes is not None and len(counts) > classes and any(counts[classes:]):
            return f"labelled samples of classes beyond the model's {classes}: {counts[classes:][:5]}"
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


def _class_weights(reports: list[Report], classes: int, plain: np.ndarray) -> np.ndarray:
    """``[node, class]`` weights: ``n_ic + n_i / classes`` normalised over the nodes (see the module
    docstring); ``plain`` (``[node]``) for all when a report that counts samples has no class counts."""
    if any(r.class_labelled is None and r.labelled for r in reports):
        return np.repeat(plain[:, None], classes, axis=1)
    counts = np.zeros((len(reports), classes))
    for i, r in enumerate(reports):
        c = np.asarray(r.class_labelled if r.class_labelled is not None else [], np.float64)[:classes]
        counts[i, :len(c)] = c
        counts[i] += r.labelled / classes
    return counts / counts.sum(0)  # > 0: fedavg is called with samples counted


def fedavg(previous: Params, reports: list[Report], bounds: Mapping[str, tuple[float, float]],
           prox_mu: float = 0.0, class_rows: Iterable[str] = ()) -> Params | None:
    """The labelled-sample-weighted average of validated ``reports`` (the ``class_rows`` parameters
    row by row with per-class weights; damped towards ``previous`` with ``prox_mu``), clamped to
    ``bounds``; None when no report counts a sample."""
    if prox_mu < 0:
        raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
    total = sum(r.labelled for r in reports)
    if total == 0:
        return None
    plain = np.array([r.labelled / total for r in reports])
    by_class = set(class_rows)
    out: Params = {}
    for name, ref in previous.items():
        stacked = np.stack([r.params[name].astype(np.float64) for r in reports])  # [node, *shape]
        if name in by_class:
            w = _class_weights(reports, ref.shape[0], plain)  # [node, class]
            acc = (w.reshape(w.shape + (1,) * (ref.ndim - 1)) * stacked).sum(0)
        else:
            acc = np.tensordot(plain, stacked, axes=1)
        if prox_mu:
            acc = (acc + prox_mu * ref.astype(np.float64)) / (1.0 + prox_mu)
        out[name] = acc.astype(ref.dtype)
    return clamp(out, bounds)
