"""Networks from other SNN libraries and NIR as stoprt networks, and stoprt networks as NIR.

    from stoprt.export.importers import from_snntorch, from_spikingjelly, import_nir, export_nir
    net = from_snntorch(snn_net)                            # an nn.Sequential with snntorch.Leaky
    net = from_snntorch("spec.json", torch.load("w.pt", weights_only=True))   # without snnTorch
    net = from_spikingjelly(sj_net)                         # LIFNode / ParametricLIFNode
    net = import_nir("model.nir")                           # LIF / CubaLIF / LI, hard reset
    export_nir(net, "model.nir")                            # hard-reset LIF networks

Every import returns a ``stoprt.runtime.layers.Sequential`` in eval mode that steps exactly like the
source (same spikes; membranes equal up to rounding, the exceptions stated in each module), or raises
:class:`ConversionError` naming the layer that cannot be mapped exactly. Each module's docstring states
the equations on both sides and what maps to what. The libraries themselves are optional: a layer spec
(JSON, see ``_spec``) plus a state dict stands in for the snnTorch or SpikingJelly network.

What STOP can then learn depends on the reset: ``soft`` (SpikingJelly ``v_reset=None``) and
``soft_nodecay`` (snnTorch ``subtract``) LIFs train with STOP; ``hard`` ones (snnTorch ``zero``,
SpikingJelly ``v_reset`` a number, all of NIR) run and train with BPTT only.
"""


from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that ``stoprt --help`` (which registers ``stoprt import``) imports no torch.
_API = {"ConversionError": "._common", "describe": "._common", "from_snntorch": ".snntorch",
        "snntorch_layers": ".snntorch", "from_spikingjelly": ".spikingjelly",
        "spikingjelly_layers": ".spikingjelly", "import_nir": ".nir", "export_nir": ".nir", "nir_layers": ".nir"}
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name], __name__), name)
