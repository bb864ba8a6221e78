"""The run config of a fleet (``[tool.flwr.app.config]`` of the app; see :mod:`.app` for each key)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


HEAD_WEIGHTS = ("class", "samples")  # how the output layer's rows are averaged (see .aggregate)


@dataclass
class FleetConfig:
    rounds: int = 3
    min_nodes: int = 2
    node_wait: float = 60.0
    round_timeout: float = 60.0
    straggler_wait: float = 15.0
    round_every: float = 0.0
    ack_timeout: float = 10.0
    prox_mu: float = 0.0
    head_weights: str = "class"
    model: str = "mlp"
    size: int = 16
    classes: int = 10
    seed: int = 0
    status_dir: str = "fleet-status"

    def __post_init__(self) -> None:
        if self.head_weights not in HEAD_WEIGHTS:
            raise ValueError(f"head-weights must be one of {HEAD_WEIGHTS}, got {self.head_weights!r}")

    @classmethod
    def from_run_config(cls, run_config: dict) -> "FleetConfig":
        known = {k.replace("_", "-"): k for k in asdict(cls())}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown fleet run config {unknown}; known: {sorted(known)}")
        return cls(**{known[k]: type(getattr(cls(), known[k]))(v) for k, v in run_config.items()})
