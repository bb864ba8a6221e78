"""The fleet's network on the server: built as ``stoprt stream`` builds it, saved each round as
``global.pt`` (a stoprt checkpoint: ``{"kind": "fleet-global", "round", "config", "params"}``)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..export.loading import load_network
from ..runtime import layers as L
from ..runtime.checkpoint import load_checkpoint, save_checkpoint
from ..runtime.stream.merge import constrain, fleet_parameters, parameter_bounds
from .config import FleetConfig


def build_network(cfg: FleetConfig) -> nn.Module:
    """A fresh network of the fleet's model (seeded), its lazily shaped parameters materialised."""
    torch.manual_seed(cfg.seed)
    net = load_network(cfg.model, {"in_channels": 2, "size": cfg.size, "classes": cfg.classes}).net
    shape = tuple(getattr(net, "input_shape", None) or (2, cfg.size, cfg.size))
    with torch.no_grad():
        net(torch.zeros(1, *shape))  # lazily shaped thresholds take their shapes here
    L.reset_state(net)
    return net


def class_rows(net: nn.Module, classes: int) -> list[str]:
    """The parameters of the output layer with one row per class: from the last layer that has a
    weight on, those whose first axis has ``classes`` entries (its weight and bias; a per-class
    threshold or readout after it)."""
    names = [f"{prefix}.{n}" if prefix else n for prefix, m in net.named_modules()
             for n, _ in m.named_parameters(recurse=False)]
    weights = [i for i, name in enumerate(names) if name.rsplit(".", 1)[-1] == "weight"]
    params = dict(net.named_parameters())
    tail = names[weights[-1]:] if weights else []
    return [n for n in tail if params[n].dim() >= 1 and params[n].shape[0] == classes]


def initial_model(cfg: FleetConfig) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]], list[str]]:
    """``(global parameters, their bounds, the output layer's per-class parameters)`` of a fresh network."""
    net = build_network(cfg)
    return ({k: v.detach().numpy().copy() for k, v in fleet_parameters(net).items()}, parameter_bounds(net),
            class_rows(net, cfg.classes))


def save_global(folder: str | os.PathLike, rnd: int, params: dict[str, np.ndarray], cfg: FleetConfig) -> Path:
    return save_checkpoint(Path(folder) / "global.pt", {
        "kind": "fleet-global", "round": rnd, "config": asdict(cfg),
        "params": {k: torch.from_numpy(np.array(v)) for k, v in params.items()}})


def load_global(path: str | os.PathLike) -> tuple[nn.Module, int]:
    """``(network with the global parameters, round)`` from a ``global.pt``."""
    data = load_checkpoint(path)
    if data.get("kind") != "fleet-global":
        raise ValueError(f"{path} is not a fleet global model")
    net = build_network(FleetConfig(**data["config"]))
    params = fleet_parameters(net)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(data["params"][name])
    constrain(net)
    return net, int(data["round"])
