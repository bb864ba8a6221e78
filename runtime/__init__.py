"""Streaming runtime: spiking layers, the STOP and BPTT learners, models and built-in event data."""
