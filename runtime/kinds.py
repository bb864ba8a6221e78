"""The one registry of layer kinds: the role each layer plays, and what it keeps in a time step.

Every stoprt layer class declares both next to its code: a class attribute ``KIND`` (one of the roles
below) and a method ``keeps(ctx) -> list[Kept] | None``. torch's own layers that stoprt uses as they
are (pooling, flattening, identity, ``nn.Sequential``) cannot carry an attribute, so they are
registered in :data:`TORCH_LAYERS`. Everything that needs to know a layer's role (the wiring STOP's
traces need, the memory planner, hybrid splits, model files, importers, channel sizing) asks
:func:`layer_kind`; the memory planner asks :func:`step_keeps` what a layer keeps. (A neuron's state is
read and written by name through :class:`stoprt.runtime.layers.Neuron`'s ``get_state`` / ``set_state``.)

Roles (what the dataflow of currents and spikes needs to know):

* ``synapse``: a synaptic op, linear in its input (Linear, Conv2d); under STOP it keeps input traces;
* ``neuron``: a layer with membrane state (LIF, LeakyReadout);
* ``current_pass``: linear and fixed in time, positively homogeneous (average pooling, per-sample
  dropout, flattening, identity): passes a current or spikes, and a positive scale, through;
* ``affine_pass``: an affine map fixed in time (frozen BatchNorm): passes a current, not a scale;
* ``spike_pass``: not linear (max pooling): exact for STOP only on spikes;
* ``sequence``, ``residual``: containers (layers in order; ``main(x) + shortcut(x)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag
from typing import Callable

from torch import Tensor, nn

SYNAPSE, NEURON = "synapse", "neuron"
CURRENT_PASS, AFFINE_PASS, SPIKE_PASS = "current_pass", "affine_pass", "spike_pass"
SEQUENCE, RESIDUAL = "sequence", "residual"
KINDS = (SYNAPSE, NEURON, CURRENT_PASS, AFFINE_PASS, SPIKE_PASS, SEQUENCE, RESIDUAL)


class Steps(IntFlag):
    """At which steps of a sample a kept tensor exists at the end of the last step's forward."""

    EVERY = 1   # one per step
    PREV = 2    # step t's, kept by step t + 1 (steps 0 .. T-2)
    FROM1 = 4   # one per step but the first (the first step's is None: a zero trace)
    LAST = 8    # the last step's only
    ONCE = 16   # one per sample (a dropout mask, a cached BatchNorm scale)
    STEP0 = 32  # made by step 0 only (a zero initial state broadcast against the threshold)


INPUT, OUTPUT = "input", "output"
STATS = "stats"  # element size of BatchNorm's saved batch statistics: float32, or the dtype if wider


@dataclass(frozen=True)
class Kept:
    """One tensor a layer keeps in a step: saved for backward, or held as state between steps.

    ``name``: :data:`INPUT` / :data:`OUTPUT` are the tensors flowing into / out of the layer (the same
    storage as its neighbours' output / input, so it is counted once); any other name is the layer's
    own. ``size``: INPUT / OUTPUT: as many values per sample as that tensor (``[B, *shape]``); an
    int: that many values whatever the batch. ``elsize``: bytes per value; None: the network's dtype.
    """

    name: str
    steps: Steps
    size: str | int = OUTPUT
    state: bool = False
    elsize: int | str | None = None


@dataclass(frozen=True)
class StepContext:
    """What a layer's ``keeps`` depends on: the mode, whether its input needs a gradient, which
    parameters learn (``learns(p)``; False for None) and whether BPTT keeps BatchNorm frozen."""

    mode: str  # "stop", "bptt" or "infer"
    input_grad: bool
    learns: Callable[[Tensor | None], bool]
    freeze_batchnorm: bool = True

    @property
    def train(self) -> bool:
        return self.mode != "infer"


class UnknownLayerError(ValueError):
    """A module with no role in the registry."""


def _view(module: nn.Module, ctx: StepContext) -> None:
    return None  # the output is a view of the input: nothing kept, no new tensor


def _keeps_input(module: nn.Module, ctx: StepContext) -> list[Kept]:
    return [Kept(INPUT, Steps.EVERY, INPUT)] if ctx.train and ctx.input_grad else []


def _adaptive_avg(module: nn.Module, ctx: StepContext) -> list[Kept]:
    # A pool to 1x1 is computed as a mean, whose backward keeps no tensor.
    size = module.output_size
    global_mean = all(s == 1 for s in ((size, size) if isinstance(size, int) else size))
    return [] if global_mean else _keeps_input(module, ctx)


def _max_pool(module: nn.Module, ctx: StepContext) -> list[Kept]:
    # torch's max pooling keeps its input and the int64 argmax indices (output-shaped).
    if not (ctx.train and ctx.input_grad):
        return []
    return [Kept(INPUT, Steps.EVERY, INPUT), Kept("indices", Steps.EVERY, OUTPUT, elsize=8)]


# torch's own layers, used as they are: their role and what they keep (torch's kernels decide that).
TORCH_LAYERS: dict[type, tuple[str, Callable[[nn.Module, StepContext], list[Kept] | None]]] = {
    nn.AvgPool2d: (CURRENT_PASS, _keeps_input),
    nn.AdaptiveAvgPool2d: (CURRENT_PASS, _adaptive_avg),
    nn.Flatten: (CURRENT_PASS, _view),
    nn.Identity: (CURRENT_PASS, _view),
    nn.MaxPool2d: (SPIKE_PASS, _max_pool),
    nn.AdaptiveMaxPool2d: (SPIKE_PASS, _max_pool),
    nn.Sequential: (SEQUENCE, _view),
}
# torch layers stoprt replaces: they lack STOP's traces, per-sample dropout masks or frozen statistics.
_REPLACED = (nn.Linear, nn.Conv2d, nn.Dropout, nn.BatchNorm2d)


def _entry(cls: type) -> tuple[str, Callable | None] | None:
    """(kind, keeps) of the nearest class in ``cls``'s MRO that declares or registers one."""
    for c in cls.__mro__:
        if "KIND" in vars(c):
            return c.KIND, None  # a stoprt layer: ``keeps`` is its own method
        if c in TORCH_LAYERS:
            return TORCH_LAYERS[c]
    return None


def layer_kind(module: nn.Module | type, strict: bool = True) -> str | None:
    """The role of a layer (instance or class), one of :data:`KINDS`.

    Unknown layers raise :class:`UnknownLayerError` naming the layer (or give None when not ``strict``).
    """
    cls = module if isinstance(module, type) else type(module)
    entry = _entry(cls)
    if entry is not None:
        return entry[0]
    if not strict:
        return None
    if issubclass(cls, _REPLACED):
        raise UnknownLayerError(f"{cls.__name__} is a plain torch layer; use its stoprt.runtime.layers "
                                "counterpart (it keeps STOP's traces, per-sample dropout masks, frozen BN)")
    raise UnknownLayerError(f"{cls.__module__}.{cls.__qualname__} is not a layer stoprt knows; build the "
                            "network from stoprt.runtime.layers (Sequential, Residual and the layer types)")


def step_keeps(module: nn.Module, ctx: StepContext) -> list[Kept] | None:
    """What ``module`` keeps in one step under ``ctx``; None when its output is a view of its input."""
    entry = _entry(type(module))
    if entry is None:
        layer_kind(module)  # raises, naming the layer
    if entry[1] is not None:
        return entry[1](module, ctx)
    if not callable(getattr(type(module), "keeps", None)):
        raise UnknownLayerError(f"{type(module).__qualname__} declares KIND but not keeps(ctx), what it keeps "
                                "in a step")
    return module.keeps(ctx)
