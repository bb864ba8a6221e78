"""The signatures of stoprt's ONNX graphs, as stored in their metadata: torch-free.

A runner or learner reads a graph's interface (names, shapes without batch, what each input is)
from these, with ONNX Runtime alone: the edge install (``pip install stoprt[edge]``) has no torch.
The exporters that write the graphs (:mod:`.onnx_step`, :mod:`.onnx_learn`, :mod:`.onnx_update`)
need torch and re-export these names.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import ClassVar, TypeVar

from .. import __version__

STEP_FORMAT = "stoprt-step"
STEP_VERSION = 1
OPSETS = (18, 19, 20)
DEFAULT_OPSET = 20


class StepGraphError(ValueError):
    """An ONNX file that is not a stoprt step graph, or one that cannot be exported."""


class GraphMetadata:
    """What every stoprt graph keeps in its ONNX metadata: a format tag, a version and the signature
    (a dataclass: the subclass) as JSON. Subclasses name the tag, version, error type, what the graph
    is called and how one is made."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    ERROR: ClassVar[type[ValueError]]
    KIND: ClassVar[str]
    HOW: ClassVar[str]

    def to_metadata(self) -> dict[str, str]:
        return {"stoprt.format": self.FORMAT, "stoprt.step_version": str(self.VERSION),
                "stoprt.signature": json.dumps(asdict(self))}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str = "the graph"):
        if meta.get("stoprt.format") != cls.FORMAT:
            raise cls.ERROR(f"{where} is not a stoprt {cls.KIND} (no stoprt metadata): export it with {cls.HOW}")
        if meta.get("stoprt.step_version") != str(cls.VERSION):
            raise cls.ERROR(f"{where} is a stoprt {cls.KIND} of version {meta.get('stoprt.step_version')}; "
                            f"this stoprt reads version {cls.VERSION}")
        try:
            return cls(**json.loads(meta["stoprt.signature"]))
        except (KeyError, TypeError, ValueError) as err:
            raise cls.ERROR(f"{where} has unreadable stoprt metadata: {err}") from err


Meta = TypeVar("Meta", bound=GraphMetadata)


def read_graph_signature(path: str | os.PathLike, kind: type[Meta]) -> Meta:
    """The ``kind`` signature stored in the graph file at ``path`` (its weights are not needed; reads
    with the ``onnx`` package, no torch and no runtime)."""
    import onnx
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise kind.ERROR(f"{path} is not a readable ONNX file: {type(err).__name__}: {err}") from err
    return kind.from_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


@dataclass
class StepSignature(GraphMetadata):
    """The interface of a step graph; shapes exclude the batch dimension.

    ``state``: ``[name, shape]`` of each state input in order (its output is ``new_`` + name);
    ``params``: ``[name, shape]`` of each parameter input (empty unless ``params_as_inputs``);
    ``weights``: state_dict key -> the graph's name for that parameter (``param.<key>``: an input, or an
    initializer when baked), for updates and refitting; every key of a tied (shared) parameter maps to
    its one name. ``buffers``: state_dict keys baked into the graph (BatchNorm statistics);
    ``constants``: buffer key -> its initializer, where one survived (equal-valued buffers may share
    one), which a refit needs when an engine fused them with a weight.
    """

    FORMAT, VERSION, ERROR = STEP_FORMAT, STEP_VERSION, StepGraphError
    KIND = "step graph"
    HOW = "stoprt.export.onnx_step.export_step or `stoprt export --to onnx`"

    input_name: str
    input_shape: list[int]
    output_name: str
    output_shape: list[int]
    state: list[list] = field(default_factory=list)
    params: list[list] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)
    buffers: list[str] = field(default_factory=list)
    constants: dict[str, str] = field(default_factory=dict)
    params_as_inputs: bool = False
    opset: int = DEFAULT_OPSET
    stoprt_version: str = __version__
    input_spec: dict | None = None

    @property
    def state_outputs(self) -> list[str]:
        return [new_name(name) for name, _ in self.state]



def new_name(state_name: str) -> str:
    """The output carrying the next value of a state input."""
    return "new_" + state_name


LEARN_FORMAT = "stoprt-learn-step"
LEARN_VERSION = 1


class LearnGraphError(StepGraphError):
    """A network the learning graph cannot be exported for, or a file that is not a learning graph."""


@dataclass
class LearnSignature(StepSignature):
    """:class:`StepSignature` of a learning step. ``state`` covers neuron state and traces (a trace of
    rank 0, the bias trace, has shape ``None``: it has no batch axis); ``grads``: ``[name, shape]`` of
    each accumulator (output ``new_`` + name); ``learned``: parameter input name of each accumulator."""

    FORMAT, VERSION, ERROR = LEARN_FORMAT, LEARN_VERSION, LearnGraphError
    KIND = "learning-step graph"
    HOW = "stoprt.export.onnx_learn.export_learn_step"

    target_name: str = "target"
    loss: str = "ce"
    grads: list[list] = field(default_factory=list)
    learned: list[str] = field(default_factory=list)

    @property
    def grad_outputs(self) -> list[str]:
        return ["new_" + name for name, _ in self.grads]


UPDATE_FORMAT = "stoprt-update"
UPDATE_VERSION = 1
OPTIMIZERS = ("sgd", "adam")
ADAM_STEP = "adam.step"
UPDATE_OPSETS = tuple(sorted({17, *OPSETS}))


@dataclass
class UpdateSignature(GraphMetadata):
    """``learned``: ``[name, shape]`` of each learned parameter (its learning-graph input name);
    ``clamps``: name -> ``[lo, hi]`` (None: unbounded) for leaks and thresholds; the optimizer and
    its hyperparameters (``betas``/``eps``: Adam's)."""

    FORMAT, VERSION, ERROR = UPDATE_FORMAT, UPDATE_VERSION, LearnGraphError
    KIND = "update graph"
    HOW = "stoprt.export.onnx_update.export_update"

    learned: list[list]
    clamps: dict[str, list] = field(default_factory=dict)
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    opset: int = DEFAULT_OPSET

    @property
    def state(self) -> list[list]:
        """``[name, shape]`` of each optimizer-state input, in graph order (output: ``new_`` + name)."""
        def per_param(prefix: str) -> list[list]:
            return [[n.replace("param.", prefix + ".", 1), list(s)] for n, s in self.learned]
        if self.optimizer == "adam":
            return per_param("exp_avg") + per_param("exp_avg_sq") + [[ADAM_STEP, []]]
        return per_param("momentum") if self.momentum else []


