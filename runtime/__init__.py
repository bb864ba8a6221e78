"""Streaming runtime: spiking layers, the STOP and BPTT learners, models and built-in event data.

    from stoprt.runtime import layers as L, STOP
    net = L.Sequential(L.Conv2d(2, 32, 3, padding=1), L.LIF(threshold="channel"), L.AvgPool2d(2),
                       L.Flatten(), L.Linear(32 * 16 * 16, 10), L.LIF())
    learner = STOP(net, torch.optim.SGD(net.parameters(), lr=0.05), update="sample")

The names below are loaded on first use (PEP 562), so the torch-free parts (``formats``, ``events``,
``stream.binning``/``sources``/``session``, ``checkpoint``'s array files) import without torch: the
edge install (``pip install stoprt[edge]``) has no torch.
"""

from __future__ import annotations

import importlib

_LAZY = {"functional": ".functional", "layers": ".layers", "models": ".models", "STOP": ".stop", "BPTT": ".bptt",
         "Learner": ".learner", "LearnerStats": ".learner", "wire": ".wiring", "WiringError": ".wiring",
         "save_checkpoint": ".checkpoint", "load_checkpoint": ".checkpoint", "CheckpointError": ".checkpoint"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
