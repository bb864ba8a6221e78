"""Checkpoints: written atomically, checked on load, loaded without executing code from the file.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, so it loads
with ``torch.load(weights_only=True)``: no unrestricted pickle. It is written atomically
(:mod:`stoprt.runtime.atomic`): a crash at any moment leaves the old checkpoint or the new one.

Integrity: :func:`digests` records a sha256 of every tensor's bytes (keyed by its path in the
payload) and one over all plain values; :func:`save_checkpoint` stores them under ``"integrity"``
and :func:`load_checkpoint` refuses a file whose content does not match, naming the tensor. The
model file (``stoprt.export.model_file``) uses the same record. Files written before this record
existed (no ``"integrity"`` key) still load, with a warning to re-save them: refusing would strand a
user's training progress, and the warning says the content is unverified.

Array checkpoints (:func:`save_array_checkpoint`, :func:`load_array_checkpoint`) are the torch-free
form, for learners whose values are numpy arrays (the ONNX Runtime learner, on an install without
torch): one ``.npz`` (no pickle) holding each array under its payload path, and the plain values,
format tag, version and the same digests as JSON. Written atomically, checked the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .atomic import atomic_path

FORMAT = "stoprt-checkpoint"
VERSION = 1
PLAIN = "<plain values>"  # the digests key of everything that is not a tensor
_log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, from another version, or not ours."""


def digests(tree: Any) -> dict[str, str]:
    """sha256 of each tensor (or numpy array) in a nested payload (dicts, lists, tuples), keyed by its
    path (``"model_state/fc.weight"``), plus :data:`PLAIN` over every other value with its path and type."""
    out: dict[str, str] = {}
    plain = hashlib.sha256()
    torch = sys.modules.get("torch")  # a payload holds tensors only where torch is loaded

    def walk(node: Any, path: str) -> None:
        if isinstance(node, np.ndarray):
            a = np.ascontiguousarray(node)
            h = hashlib.sha256(f"{a.dtype.str}{a.shape};".encode())
            h.update(a.tobytes())
            out[path] = h.hexdigest()
        elif torch is not None and isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            out[path] = h.hexdigest()
        elif isinstance(node, Mapping):
            plain.update(f"{path}:{type(node).__name__}{len(node)};".encode())
            for key in sorted(node, key=lambda k: (type(k).__name__, str(k))):
                plain.update(f"{type(key).__name__}:{key!s}|".encode())
                walk(node[key], f"{path}/{key}" if path else str(key))
        elif isinstance(node, (list, tuple)):
            plain.update(f"{path}:{type(node).__name__}{len(node)};".encode())
            for i, item in enumerate(node):
                walk(item, f"{path}/{i}" if path else str(i))
        else:
            plain.update(f"{path}={type(node).__name__}:{node!r};".encode())

    walk(tree, "")
    out[PLAIN] = plain.hexdigest()
    return out


def first_mismatch(saved: Mapping[str, str], tree: Any) -> str | None:
    """The first path whose digest differs from ``saved`` (a tensor's path, or :data:`PLAIN`), or None."""
    now = digests(tree)
    for key in sorted(set(saved) | set(now), key=lambda k: (k == PLAIN, k)):
        if saved.get(key) != now.get(key):
            return key
    return None


def mismatch_message(path: str | os.PathLike, key: str) -> str:
    what = "its plain (non-tensor) values" if key == PLAIN else f"tensor {key!r}"
    return f"{path} is corrupted: {what} does not match the checksum written when it was saved"


def warn_unverified(path: str | os.PathLike) -> None:
    _log.warning("stoprt: warning: %s has no integrity checksums (written by an older stoprt); loaded "
                 "unverified. Save it again (it is re-saved with checksums) to protect it.", path)


def check_finite(state: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Refuse parameters (tensors) holding NaN or Inf (a diverged or damaged model), naming the first one."""
    import torch
    for key, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: parameter {key!r} holds {bad} NaN/Inf value(s) of {t.numel()}; "
                                  "refusing to load it as a model")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (tensors and plain values) with our format tag, version and digests."""
    import torch
    body = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save({**body, "integrity": digests(body)}, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; clear errors for anything else,
    including content that does not match its digests."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable stoprt checkpoint (corrupted or another "
                              f"format): {type(err).__name__}: {str(err).splitlines()[0][:200]}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a stoprt checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}; this stoprt reads "
                              f"version {VERSION}")
    saved = data.pop("integrity", None)
    if saved is None:
        warn_unverified(path)
    else:
        _verify(path, saved, data)
    return data


def _verify(path: Path, saved: Any, data: dict) -> None:
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is corrupted: its integrity record is unreadable")
    key = first_mismatch(saved, data)
    if key is not None:
        raise CheckpointError(mismatch_message(path, key))


# ---- array checkpoints (torch-free) ---------------------------------------------------------------
_JSON = "__stoprt__"  # the npz member holding the plain values, the tag and the digests


def save_array_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (nested dicts of numpy arrays and JSON values) as an ``.npz``."""
    body = {"format": FORMAT, "version": VERSION, **payload}
    arrays: dict[str, np.ndarray] = {}

    def split(node: Any, path: str) -> Any:  # arrays out, each replaced by a reference to its member
        if isinstance(node, np.ndarray):
            arrays[path] = node
            return {"__array__": path}
        if isinstance(node, Mapping):
            return {str(k): split(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [split(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(node)]
        return node

    plain = json.loads(json.dumps(split(body, "")))  # as it will load: tuples as lists, keys as strings
    record = json.dumps({"body": plain, "integrity": digests(_join(plain, arrays, path))})
    buffer = io.BytesIO()
    np.savez(buffer, **{_JSON: np.frombuffer(record.encode(), np.uint8)}, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return Path(path)


def _join(node: Any, arrays: Mapping[str, np.ndarray], path: Path) -> Any:
    """The payload again: each ``{"__array__": key}`` replaced by its array."""
    if isinstance(node, dict):
        if set(node) == {"__array__"}:
            if node["__array__"] not in arrays:
                raise CheckpointError(f"{path} is corrupted: array {node['__array__']!r} is missing")
            return arrays[node["__array__"]]
        return {k: _join(v, arrays, path) for k, v in node.items()}
    return [_join(v, arrays, path) for v in node] if isinstance(node, list) else node


def load_array_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a file of :func:`save_array_checkpoint` (no pickle), checked against its digests."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            members = {k: npz[k] for k in npz.files}
        record = json.loads(members.pop(_JSON).tobytes().decode())
        plain, saved = record["body"], record["integrity"]
    except Exception as err:  # zip, npy and JSON errors of a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable stoprt array checkpoint (corrupted or another "
                              f"format): {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from err
    data = _join(plain, members, path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a stoprt checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}; this stoprt reads "
                              f"version {VERSION}")
    _verify(path, saved, data)
    return data
