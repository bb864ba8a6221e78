"""What a learning bundle carries besides the model: STOP's learning graphs, their starting
parameters and the optimizer and schedule they were made for.

``stoprt export CKPT --to onnx-learn OUT`` (and :func:`stoprt.export.bundle.write_bundle` with
``learning=``) writes a bundle (see :mod:`.bundle`) with three more files, each with its sha256 in the
manifest:

    learn_step.onnx   the learning step (:func:`.onnx_learn.export_learn_step`)
    update.onnx       the optimizer update (:func:`.onnx_update.export_update`)
    params.npz        the parameters the learning starts from, by state_dict key (the graphs take
                      parameters as inputs); numpy, so a device without torch reads them

and a ``learning`` entry in ``manifest.json``: those names, the optimizer (``name``, ``lr``,
``momentum``, ``weight_decay``), the loss and the update schedule. The learning-rate is the default of
a run (an input of the update graph, so a run may change it); the rest is built into the graphs.
A learning bundle is still a bundle: the torch backends and the ONNX Runtime inference step use it
as before; ``stoprt stream --backend onnxruntime --learn`` learns from it without torch
(:meth:`stoprt.export.ort_learner.OrtLearner.from_bundle`).
"""

from __future__ import annotations

import copy
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..runtime import layers as L
from ..runtime.update_schedule import check_update_schedule
from .onnx_learn import export_learn_step
from .onnx_update import export_update
from .signatures import OPTIMIZERS

LEARN_FILE, UPDATE_FILE, PARAMS_FILE = "learn_step.onnx", "update.onnx", "params.npz"


@dataclass(frozen=True)
class LearningOptions:
    """The optimizer and schedule of a learning bundle. ``update``: ``"sample"``, ``"step"`` or every
    N labelled steps, as :class:`~stoprt.runtime.stop.STOP`."""

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    loss: str = "ce"
    update: str | int = "sample"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, momentum >= 0 and weight_decay >= 0, got {self.lr}, {self.momentum}, "
                             f"{self.weight_decay}")
        check_update_schedule(self.update)


def write_learning_files(net: nn.Module, folder: Path, options: LearningOptions, input_spec: dict,
                         opset: int) -> dict:
    """Write the three files into ``folder`` (a bundle's staging folder); returns the manifest entry."""
    net = copy.deepcopy(net)
    L.freeze_batchnorm(net)  # as STOP keeps it: BatchNorm learns nothing on the device
    sig = export_learn_step(net, folder / LEARN_FILE, loss=options.loss, opset=opset, input_spec=input_spec)
    shapes = dict(sig.params)
    usig = export_update(net, [[n, shapes[n]] for n in sig.learned], folder / UPDATE_FILE,
                         optimizer=options.optimizer, momentum=options.momentum,
                         weight_decay=options.weight_decay, opset=opset)
    params = {key: p.detach().float().cpu().numpy() for key, p in net.named_parameters()
              if key in sig.weights}
    buffer = io.BytesIO()
    np.savez(buffer, **params)
    (folder / PARAMS_FILE).write_bytes(buffer.getbuffer())
    return {"learn_graph": LEARN_FILE, "update_graph": UPDATE_FILE, "params": PARAMS_FILE,
            "optimizer": {"name": options.optimizer, "lr": options.lr, "momentum": usig.momentum,
                          "weight_decay": usig.weight_decay,
                          **({"betas": usig.betas, "eps": usig.eps} if options.optimizer == "adam" else {})},
            **{k: v for k, v in asdict(options).items() if k in ("loss", "update")}}
