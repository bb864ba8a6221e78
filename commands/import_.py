"""``stoprt import``: a network from snnTorch, SpikingJelly or NIR as a stoprt model file.

    stoprt import weights.pt --from snntorch --spec layers.json --out model.pt [--input-shape 2 32 32]
    stoprt import model.nir --from nir --out model.pt

A state dict alone does not say how the layers connect, so snnTorch and SpikingJelly weights come with
a layer spec (JSON; or export the network to NIR with the library and use ``--from nir``). Example
``layers.json`` for an snnTorch network ``nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), snn.Leaky(...),
nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 16 * 16, 10), snn.Leaky(...))``::

    {"input_shape": [2, 32, 32],
     "layers": [{"type": "Conv2d", "padding": 1},
                {"type": "Leaky", "reset_mechanism": "subtract", "learn_beta": true},
                {"type": "AvgPool2d", "kernel_size": 2},
                {"type": "Flatten"},
                {"type": "Linear"},
                {"type": "Leaky", "learn_threshold": true}]}

Entry ``i`` reads the state dict keys ``"i.weight"``, ``"i.beta"``, ... (give ``"name"`` for other
prefixes); shapes, beta and thresholds come from the state dict. For SpikingJelly the neuron entries
are ``{"type": "LIFNode", "tau": 2.0, "v_reset": null}`` and the like (their parameters are not in a
state dict). The state dict is read with ``torch.load(weights_only=True)``: no code from the file runs.

The result is written with ``stoprt.export.model_file.save_model`` where that module exists, else as a
stoprt checkpoint whose ``model`` entry holds the architecture description
(``stoprt.export.architecture`` format) and ``model_state`` the weights.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from ..cli_args import positive_float, positive_int

SOURCES = ("snntorch", "spikingjelly", "nir")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``import`` to the top-level CLI's subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "import", help="convert an snnTorch, SpikingJelly or NIR network into a stoprt model file",
        description="Convert a network from snnTorch or SpikingJelly (state dict + JSON layer spec) or a NIR "
                    "file into a stoprt model that steps exactly like the original.")
    parser.add_argument("source", metavar="SOURCE", type=Path,
                        help="state dict file (torch.save; snntorch, spikingjelly) or NIR file (nir)")
    parser.add_argument("--from", dest="library", choices=SOURCES, required=True, help="where SOURCE comes from")
    parser.add_argument("--out", metavar="MODEL_FILE", type=Path, required=True, help="stoprt model file to write")
    parser.add_argument("--spec", metavar="JSON", type=Path,
                        help="layer spec of the network (needed for snntorch and spikingjelly)")
    parser.add_argument("--input-shape", metavar="N", type=positive_int, nargs="+",
                        help="one step's input without batch, e.g. 2 32 32 (default: from the spec or NIR file)")
    parser.add_argument("--dt", type=positive_float, default=None, help="NIR time step in seconds (default 1e-4)")
    parser.set_defaults(func=run_import)
    return parser


def _load_state_dict(path: Path) -> dict:
    import torch
    if not path.is_file():
        raise ValueError(f"no state dict file at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign, damaged or code-carrying files
        raise ValueError(f"{path} is not a state dict readable without running code "
                         f"(torch.load weights_only=True): {type(err).__name__}: {str(err).splitlines()[0][:200]}") from err
    for key in ("state_dict", "model_state_dict", "model_state"):  # common checkpoint layouts
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict")
    return data


def run_import(args: argparse.Namespace) -> int:
    """Convert ``args.source`` and write ``args.out``. Exit code."""
    from ..export.importers import _common, nir, snntorch, spikingjelly

    if args.library == "nir":
        if args.spec is not None:
            raise ValueError("--spec is for snntorch and spikingjelly; a NIR file describes its own layers")
        layers, shape = nir.nir_layers(args.source, args.dt if args.dt is not None else nir.DT)
        dtype = None
    else:
        if args.spec is None:
            raise ValueError(f"--from {args.library} needs --spec: a state dict does not say how the layers connect")
        if args.dt is not None:
            raise ValueError("--dt is for NIR files")
        state = _load_state_dict(args.source)
        convert = snntorch.snntorch_layers if args.library == "snntorch" else spikingjelly.spikingjelly_layers
        layers, shape = convert(args.spec, state)
        dtype = _common.source_dtype(state.values())
    shape = tuple(args.input_shape) if args.input_shape else shape
    net = _common.build(layers, shape, dtype)
    written = _save(args.out, net, layers, shape, f"{args.library}:{args.source}")
    kinds = Counter(layer.kind for layer in layers)
    resets = sorted({layer.kwargs["reset"] for layer in layers if layer.kind == "LIF"})
    n_params = sum(p.numel() for p in net.parameters())
    print(f"stoprt import: {args.source} ({args.library}) -> {args.out} ({written})")
    print(f"  {len(layers)} layers: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + f"; {n_params} parameters")
    print(f"  input shape: {list(shape) if shape else 'not known (give --input-shape to check every layer)'}")
    if resets:
        learnable = "STOP or BPTT" if "hard" not in resets else "BPTT (STOP needs soft resets)"
        print(f"  LIF resets: {', '.join(resets)}; trainable on the device with {learnable}")
    return 0


def _save(out: Path, net, layers, shape, source: str) -> str:
    """Write the model file; returns what was written."""
    input_spec = {"source": source, "shape": None if shape is None else list(shape)}
    try:
        from ..export.model_file import save_model
    except ImportError:
        save_model = None
    if save_model is not None:
        save_model(out, net, input_spec)
        return "stoprt model file"
    from ..runtime.checkpoint import save_checkpoint
    from ..export.importers._common import describe
    save_checkpoint(out, {"model": {"architecture": describe(layers, shape), "imported_from": source},
                          "input_spec": input_spec, "model_state": net.state_dict()})
    return "stoprt checkpoint with the architecture description"
