"""The stoprt model file: weights, architecture and input spec in one file, loaded without running code.

Layout: a safetensors file (when the ``safetensors`` package is importable) whose string metadata
holds the format tag and version, the stoprt version, the JSON architecture
(:mod:`stoprt.export.architecture`), the JSON input spec, and ``digests``: a sha256 of every tensor
and one of the other metadata (:func:`stoprt.runtime.checkpoint.digests`, checked on load; files
written before it existed load with a warning); otherwise a
``torch.save`` file of the same content (tensors and strings only, loaded with
``weights_only=True``). A parameter shared by several layers (a tied leak) is stored once and
recorded as an alias. Files are written atomically (temporary file, fsync, rename). Parameters holding NaN or Inf are
refused on load, from a model file or a checkpoint.

:func:`stoprt.export.loading.load_network` loads any of these, checkpoints and bundles included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import __version__
from ..runtime.atomic import atomic_path
from ..runtime.checkpoint import (CheckpointError, check_finite, digests, first_mismatch, mismatch_message,
                                  warn_unverified)
from . import architecture

FORMAT = "stoprt-model"
VERSION = 1
SUFFIX = ".stoprt"
SPEC_KEYS = {"shape": "per-step input shape without batch, e.g. [2, 32, 32]",
              "T": "time steps per sample", "channels": "input channels (2: OFF/ON polarity)",
              "sensor_size": "event sensor [width, height]", "dt_us": "bin length in microseconds",
              "event_count": "events per bin", "binning": "how events become frames, e.g. 'time'",
              "out_size": "frame size after downsampling", "source": "where the data came from"}


class ModelFileError(ValueError):
    """A model file (or checkpoint) that cannot be used: corrupted, another version, or not fitting."""


def normalize_input_spec(spec: Mapping[str, Any] | None, net: nn.Module | None = None) -> dict:
    """Check an input spec and fill ``shape`` (and ``channels``) from ``net.input_shape``.

    Known keys: ``shape``, ``T``, ``channels``, ``sensor_size``, ``dt_us`` or ``event_count`` (not
    both), ``binning``, ``out_size``, ``source``. Unknown keys raise ``ModelFileError``.
    """
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ModelFileError(f"unknown input spec key(s) {unknown}; known: {sorted(SPEC_KEYS)}")
    if spec.get("dt_us") is not None and spec.get("event_count") is not None:
        raise ModelFileError("an input spec bins by time (dt_us) or by event count (event_count), not both")
    for key in ("T", "channels", "dt_us", "event_count"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelFileError(f"input spec {key} must be a positive int, got {value!r}")
    net_shape = getattr(net, "input_shape", None)
    if spec.get("shape") is None and net_shape is not None:
        spec["shape"] = list(net_shape)
    if spec.get("shape") is not None:
        spec["shape"] = [int(s) for s in spec["shape"]]
        if net_shape is not None and tuple(spec["shape"]) != tuple(net_shape):
            raise ModelFileError(f"input spec shape {spec['shape']} does not match the network's input "
                                 f"shape {list(net_shape)}")
        spec.setdefault("channels", spec["shape"][0])
    return spec


def check_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ModelFileError`` naming the first key whose presence or shape differs from ``net``."""
    expected = net.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ModelFileError(f"{source} does not fit the architecture: it has no {key!r} "
                                 f"(the model expects shape {tuple(tensor.shape)})")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelFileError(f"{source} does not fit the architecture: {key!r} has shape "
                                 f"{tuple(state[key].shape)} in the file, {tuple(tensor.shape)} in the model")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ModelFileError(f"{source} does not fit the architecture: unexpected key {extra[0]!r} "
                             f"({len(extra)} in all)")


def save_model(path: str | os.PathLike, net: nn.Module, input_spec: Mapping[str, Any] | None = None,
               use_safetensors: bool | None = None) -> Path:
    """Atomically write ``net`` (weights, architecture) and its input spec to ``path``.

    ``use_safetensors``: None picks safetensors when importable, else ``torch.save``.
    """
    path = Path(path)
    arch = architecture.describe(net)
    spec = normalize_input_spec(input_spec, net)
    tensors, aliases = _dedupe(net.state_dict())
    meta = {"format": FORMAT, "format_version": str(VERSION), "stoprt_version": __version__,
            "architecture": json.dumps(arch), "input_spec": json.dumps(spec),
            "aliases": json.dumps(aliases)}
    meta["digests"] = json.dumps(digests({"tensors": tensors, "metadata": meta}))
    if use_safetensors is None:
        use_safetensors = _safetensors() is not None
    with atomic_path(path) as tmp:
        if use_safetensors:
            st = _safetensors()
            if st is None:
                raise ModelFileError("safetensors is not installed (pip install safetensors)")
            st.save_file(tensors, tmp, metadata=meta)
        else:
            torch.save({"format": FORMAT, "metadata": meta, "tensors": tensors}, tmp)
    return path


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Read a model file; returns ``(net, input_spec)`` with ``net`` in eval mode.

    Raises ``ModelFileError`` for a missing, corrupted or foreign file, another format version, or
    weights that do not fit the stored architecture; ``FileNotFoundError`` if there is no file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    meta, tensors = _read(path)
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a stoprt model file")
    if meta.get("format_version") != str(VERSION):
        raise ModelFileError(f"{path} has model file format version {meta.get('format_version')} (written by "
                             f"stoprt {meta.get('stoprt_version')}); this stoprt {__version__} reads version {VERSION}")
    _verify(path, meta, tensors)
    try:
        arch, spec, aliases = (json.loads(meta[k]) for k in ("architecture", "input_spec", "aliases"))
    except (KeyError, ValueError) as err:
        raise ModelFileError(f"{path} is corrupted: unreadable metadata ({err})") from err
    net = architecture.build(arch)
    state = dict(tensors)
    state.update({key: tensors[first] for key, first in aliases.items() if first in tensors})
    check_state_dict(net, state, str(path))
    check_finite_state(state, path)
    net.load_state_dict(state)
    return net.eval(), spec


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each tensor once (safetensors refuses shared memory); aliases map a key to the stored one."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in first and t.numel() > 0:
            aliases[key] = first[ident]
        else:
            first[ident] = key
            tensors[key] = t.detach().cpu().contiguous().clone()
    return tensors, aliases


def _verify(path: Path, meta: dict[str, str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Check the digests written by :func:`save_model` (a file without them: warn, see the docstring)."""
    meta = dict(meta)
    saved = meta.pop("digests", None)
    if saved is None:
        warn_unverified(path)
        return
    try:
        saved = json.loads(saved)
    except ValueError as err:
        raise ModelFileError(f"{path} is corrupted: unreadable checksums ({err})") from err
    key = first_mismatch(saved, {"tensors": tensors, "metadata": meta})
    if key is not None:
        raise ModelFileError(mismatch_message(path, key))


def check_finite_state(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse parameters holding NaN or Inf, as a ``ModelFileError``."""
    try:
        check_finite(state, path)
    except CheckpointError as err:
        raise ModelFileError(str(err)) from err


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        return None
    return st


def torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; an unreadable file is a ``ModelFileError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ModelFileError(f"{path} is not readable (corrupted or another format): {type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200] if str(err) else ''}") from err


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file opens with its JSON header's length (u64 little-endian) and then ``{``."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= size - 8


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of either layout."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        data = torch_load(path)
        if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
            raise ModelFileError(f"{path} is not a stoprt model file")
        return data["metadata"], data.get("tensors", {})
    if not _looks_like_safetensors(head, path.stat().st_size):
        raise ModelFileError(f"{path} is not a stoprt model file: neither a torch zip archive nor a safetensors "
                             "file (corrupted, truncated or another format)")
    st = _safetensors()
    if st is None:
        raise ModelFileError(f"{path} is a safetensors model file and safetensors is not installed "
                             "(pip install safetensors)")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # SafetensorError, or OSError-likes for a torn header
        raise ModelFileError(f"{path} is not a readable stoprt model file (corrupted or another format): "
                             f"{str(err)[:200]}") from err
    return meta, tensors
