"""Streaming runtime: spiking layers, the STOP and BPTT learners, models and built-in event data.

    from stoprt.runtime import layers as L, STOP
    net = L.Sequential(L.Conv2d(2, 32, 3, padding=1), L.LIF(threshold="channel"), L.AvgPool2d(2),
                       L.Flatten(), L.Linear(32 * 16 * 16, 10), L.LIF())
    learner = STOP(net, torch.optim.SGD(net.parameters(), lr=0.05), update="sample")
"""

from . import functional, layers, models
from .bptt import BPTT
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .learner import Learner, LearnerStats
from .stop import STOP
from .wiring import WiringError, wire

__all__ = ["functional", "layers", "models", "STOP", "BPTT", "Learner", "LearnerStats", "wire",
           "WiringError", "save_checkpoint", "load_checkpoint", "CheckpointError"]
