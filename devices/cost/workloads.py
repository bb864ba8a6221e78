"""What a profile or plan runs: a network by name or from a file (checked against the given size
and width); its step runners come from :func:`stoprt.export.runners.make_runner`."""

from __future__ import annotations

from torch import nn

from ...export.loading import LoadedNetwork, load_network


def load_workload(model: str, size: int | None = None, width: float | None = None, channels: int = 2,
                  classes: int | None = None) -> tuple[nn.Module, dict]:
    """A network to profile or plan (any model :func:`stoprt.export.loading.load_network` takes);
    returns it, in training mode, and what it is.

    A built-in name is built with ``size`` (default 32), ``width`` (default 1) and ``channels`` /
    ``classes``. A file's recorded builder arguments win: ``size``/``width`` must not contradict them.
    """
    kwargs = {"in_channels": channels, "size": size or 32, "width": 1.0 if width is None else width}
    if classes is not None:
        kwargs["classes"] = classes
    loaded = load_network(model, kwargs)
    if loaded.path is not None:
        _check_given(loaded, size, width)
    return loaded.net.train(), {"name": loaded.name, "kwargs": loaded.model.get("kwargs", {}),
                                "checkpoint": None if loaded.path is None else str(loaded.path)}


def _check_given(loaded: LoadedNetwork, size: int | None, width: float | None) -> None:
    """``--size``/``--width`` given for a file must be its own (a model file records its input shape)."""
    recorded = loaded.model.get("kwargs")
    if recorded is None:  # described by its architecture: the input shape is all there is to compare
        shape = getattr(loaded.net, "input_shape", None)
        recorded = {"size": shape[-1]} if shape else {}
        if width is not None:
            raise ValueError(f"--width applies to a built-in model, and {loaded.path} records its layers")
    for name, given, key in (("--size", size, "size"), ("--width", width, "width")):
        if given is not None and key in recorded and recorded[key] != given:
            raise ValueError(f"{name} {given} contradicts the checkpoint's {key} {recorded[key]}")
