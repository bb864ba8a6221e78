"""Keeping heavy imports off the first step's path.

``torch.optim.Optimizer.add_param_group`` is wrapped by ``torch._disable_dynamo``, which imports
``torch._dynamo`` (seconds on a small board: it loads the compiler stack, scipy and onnx's probes)
the first time an optimizer is made, only to exclude the call from a compilation. Nothing can be
compiling before ``torch._dynamo`` is loaded, so until then the call can run as it is; the wrapper's
own ``torch._dynamo.disable`` takes over once something else has loaded it. ``Optimizer.step``
still loads it at the first update (torch imports it there on every call).
"""

from __future__ import annotations

import sys

import torch


def defer_dynamo_import() -> bool:
    """Let optimizers be made without importing ``torch._dynamo``; returns whether it applied (not
    when dynamo is loaded already, or when this torch wraps ``add_param_group`` differently)."""
    wrapper = torch.optim.Optimizer.add_param_group
    fn = getattr(wrapper, "__wrapped__", None)
    if fn is None or "torch._dynamo" in sys.modules or hasattr(fn, "__dynamo_disable"):
        return False

    def run(*args, **kwargs):
        if "torch._dynamo" in sys.modules:  # loaded since: torch's own disable from now on
            del fn.__dynamo_disable
            return wrapper(*args, **kwargs)
        return fn(*args, **kwargs)

    fn.__dynamo_disable = run  # the attribute torch's wrapper caches its disabled function in
    return True
