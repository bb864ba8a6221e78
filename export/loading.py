"""The one network loader of every command: a built-in model name, a training checkpoint, a model
file, a ``stoprt stream`` session checkpoint (``session.pt``) or a bundle (directory or ``.tar``).

Files keep their integrity checks: model files and checkpoints are verified against their sha256
digests and refused when a parameter holds NaN or Inf (:mod:`.model_file`,
:mod:`stoprt.runtime.checkpoint`); bundles against their manifest (:mod:`.bundle`). A checkpoint's
model is rebuilt from its description and must fit the weights (the first mismatching key is named).

This module sits above :mod:`.model_file` and :mod:`.bundle` (a bundle holds a model file), so
neither of those imports the other's loader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..runtime.checkpoint import CheckpointError, load_checkpoint
from ..runtime.models import MODELS, build_model
from . import architecture
from .bundle import load_bundle
from .model_file import (FORMAT, SPEC_KEYS, ModelFileError, check_finite_state, check_state_dict, load_model,
                         normalize_input_spec, torch_load)


@dataclass
class LoadedNetwork:
    """A network and what it is.

    ``model`` says how to build it again: ``{"name", "kwargs"}`` for a built-in model (given by name,
    or recorded so by a training checkpoint), else ``{"architecture": ...}``
    (:mod:`stoprt.export.architecture`). ``path``: the file it came from, None for a built-in name.
    """

    net: nn.Module
    input_spec: dict
    model: dict
    path: Path | None = None

    @property
    def name(self) -> str:
        """The built-in model's name, or the file's name."""
        return self.model.get("name") or (self.path.name if self.path is not None else "network")


def load_network(spec: str | os.PathLike, build: Mapping[str, Any] | None = None, *,
                 builtin: bool = True) -> LoadedNetwork:
    """Load ``spec``: a built-in model name (built with the builder arguments ``build``), else a file.

    A file's network comes back in eval mode; ``build`` does not apply to it. ``builtin=False``: files
    only (``stoprt export`` exports trained weights, never a fresh network). Raises ``ValueError`` for
    a name that is neither a built-in model nor an existing path (``FileNotFoundError`` with
    ``builtin=False``), :class:`ModelFileError` / :class:`~stoprt.export.bundle.BundleError` (both
    ``ValueError``) for a file that cannot be used.
    """
    if builtin and isinstance(spec, str) and spec in MODELS:
        kwargs = dict(build or {})
        return LoadedNetwork(build_model(spec, **kwargs), {}, {"name": spec, "kwargs": kwargs})
    path = Path(spec)
    if not path.exists():
        if not builtin:
            raise FileNotFoundError(f"no model file, checkpoint or bundle at {path}")
        raise ValueError(f"unknown model {str(spec)!r}: neither a model name ({', '.join(MODELS)}) nor a "
                         "checkpoint, model file or bundle")
    if path.is_dir() or path.suffix == ".tar":
        bundle = load_bundle(path)
        return LoadedNetwork(bundle.net, bundle.input_spec, {"architecture": architecture.describe(bundle.net)}, path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":  # a torch zip: a training or session checkpoint, or the torch.save model file
        probe = torch_load(path)
        if not (isinstance(probe, dict) and probe.get("format") == FORMAT):
            return _from_checkpoint(path)
    net, input_spec = load_model(path)
    return LoadedNetwork(net, input_spec, {"architecture": architecture.describe(net)}, path)


def _from_checkpoint(path: Path) -> LoadedNetwork:
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise ModelFileError(str(err)) from err
    session_meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}  # a `stoprt stream` session.pt
    model = ckpt.get("model") or session_meta.get("model")
    if not isinstance(model, dict) or not ({"name", "architecture"} & set(model)) or "model_state" not in ckpt:
        raise ModelFileError(f"{path} is a stoprt checkpoint without a model description (model/model_state)")
    if "architecture" in model:  # written by an importer without the model file module, or a session
        net = architecture.build(model["architecture"])
        described = {"architecture": model["architecture"]}
    else:
        described = {"name": model["name"], "kwargs": dict(model.get("kwargs", {}))}
        net = build_model(model["name"], **described["kwargs"])
    check_state_dict(net, ckpt["model_state"], str(path))
    check_finite_state(ckpt["model_state"], path)
    net.load_state_dict(ckpt["model_state"])
    spec = ckpt.get("input_spec") or session_meta.get("input_spec") or {}
    spec = {k: v for k, v in spec.items() if k in SPEC_KEYS}
    return LoadedNetwork(net.eval(), normalize_input_spec(spec, net), described, path)
