"""stoprt: an on-device learning runtime for spiking neural networks.

Parts: :mod:`stoprt.runtime` (layers, STOP and BPTT learners, models, built-in event data),
:mod:`stoprt.export` (moving models onto the device) and :mod:`stoprt.devices` (boards and memory).
"""

__version__ = "0.1.0"
