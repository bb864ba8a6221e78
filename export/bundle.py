"""Deployment bundles: one directory (optionally one ``.tar``) with everything a device needs.

Contents::

    model.stoprt      the stoprt model file (weights, architecture, input spec)
    step.onnx         the ONNX step graph (optional; see stoprt.export.onnx_step)
    input_spec.json   how events become the network's input (also inside the model file)
    learn_step.onnx, update.onnx, params.npz
                      a learning bundle's learning graphs and starting parameters (optional; see
                      stoprt.export.learning), named under the manifest's ``learning`` entry
    manifest.json     format, versions (stoprt, torch, onnx, opset), per file sha256 and size, and
                      ``manifest_sha256``: a sha256 of the manifest's other fields (canonical JSON)

The directory is assembled next to its destination and renamed into place, so a reader sees the
old bundle or the new one, never half of one. :func:`load_bundle` checks the manifest's own checksum
and every file's before using a file, names the file that does not match, and checks that the
manifest's input spec is the model file's. A bundle written before ``manifest_sha256`` existed loads
with a warning (the spec comparison still covers its input spec).

:func:`verify_bundle` does the checks that need no torch (manifest and file checksums): the edge
install, which learns from a bundle in ONNX Runtime, uses it; :func:`load_bundle` adds the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from typing import TYPE_CHECKING

from .. import __version__
from ..runtime.atomic import atomic_path

if TYPE_CHECKING:  # torch is imported where a model is written or loaded: verify_bundle needs none
    from torch import nn

    from .learning import LearningOptions

FORMAT = "stoprt-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.stoprt"
ONNX_FILE = "step.onnx"
SPEC_FILE = "input_spec.json"
CHECKSUM = "manifest_sha256"
_log = logging.getLogger(__name__)


class BundleError(ValueError):
    """A bundle that is incomplete, altered, from another version, or not a bundle."""


@dataclass
class Bundle:
    """A loaded bundle: the network (eval mode), its input spec, the step graph's path if any."""

    root: Path
    net: nn.Module
    input_spec: dict
    onnx_path: Path | None
    manifest: dict


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bundle(out: str | os.PathLike, net: nn.Module, input_spec: Mapping[str, Any] | None = None, *,
                 onnx: bool = True, opset: int = 20, params_as_inputs: bool = False,
                 archive: bool = False, learning: LearningOptions | None = None) -> Path:
    """Write a bundle for ``net`` to the directory ``out`` (or the ``.tar`` file ``out`` if ``archive``);
    with ``learning``, a learning bundle (:mod:`.learning`).

    An existing bundle at ``out`` is replaced; any other existing file or non-empty directory there
    is left alone and raises ``FileExistsError``.
    """
    import torch

    from .model_file import normalize_input_spec, save_model
    out = Path(out)
    _check_target(out, archive)
    spec = normalize_input_spec(input_spec, net)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(staging / MODEL_FILE, net, spec)
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        versions = {"stoprt": __version__, "torch": torch.__version__}
        if onnx:
            import onnx as onnx_pkg
            from .onnx_step import export_step
            export_step(net, staging / ONNX_FILE, opset=opset, params_as_inputs=params_as_inputs, input_spec=spec)
            versions.update(onnx=onnx_pkg.__version__, opset=opset)
        learned = None
        if learning is not None:
            from .learning import write_learning_files
            learned = write_learning_files(net, staging, learning, spec, opset)
        files = {p.name: {"sha256": _sha256(p), "size": p.stat().st_size} for p in sorted(staging.iterdir())}
        manifest = {"format": FORMAT, "version": VERSION, "created": datetime.now(timezone.utc).isoformat(),
                    "versions": versions, "model": MODEL_FILE, "onnx": ONNX_FILE if onnx else None,
                    "params_as_inputs": bool(onnx and params_as_inputs), "input_spec": spec, "files": files}
        if learned is not None:
            manifest["learning"] = learned
        manifest[CHECKSUM] = _manifest_sha256(manifest)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if archive:
            _write_tar(staging, out)
        else:
            _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_target(out: Path, archive: bool) -> None:
    if archive:
        if out.exists() and not (out.is_file() and tarfile.is_tarfile(out)):
            raise FileExistsError(f"{out} exists and is not a bundle archive; not replacing it")
    elif out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise FileExistsError(f"{out} is a non-empty directory that is not a bundle; not replacing it")


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / "bundle")          # the old bundle stays whole until the new one is in place
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old / "bundle", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _write_tar(staging: Path, out: Path) -> None:
    with atomic_path(out) as tmp, tarfile.open(tmp, mode="w") as tar:
        for p in sorted(staging.iterdir()):
            tar.add(p, arcname=p.name)


def load_bundle(path: str | os.PathLike, extract_to: str | os.PathLike | None = None) -> Bundle:
    """Verify and load a bundle directory or ``.tar`` archive.

    An archive is unpacked into ``extract_to`` (default: a new temporary directory, which then holds
    the returned ``onnx_path``). Raises :class:`BundleError` naming the file whose checksum or size
    does not match, a missing file, or an unreadable or foreign manifest.
    """
    from .model_file import load_model
    root, manifest = verify_bundle(path, extract_to)
    net, spec = load_model(root / manifest["model"])
    if manifest.get("input_spec") != spec:
        raise BundleError(f"{root}: the input spec in {MANIFEST} differs from the model file's (altered)")
    onnx_name = manifest.get("onnx")
    return Bundle(root, net, spec, root / onnx_name if onnx_name else None, manifest)


def verify_bundle(path: str | os.PathLike, extract_to: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """``(root, manifest)`` of a bundle whose manifest and files match their checksums (no torch needed;
    see :func:`load_bundle` for ``extract_to`` and the errors). The files a manifest names (model,
    step graph, learning files) must be among its checksummed files."""
    path = Path(path)
    if path.is_file():
        root = Path(extract_to) if extract_to is not None else Path(tempfile.mkdtemp(prefix="stoprt-bundle-"))
        _extract(path, root)
    elif path.is_dir():
        root = path
    else:
        raise FileNotFoundError(f"no bundle at {path}")
    manifest = _read_manifest(root)
    for name, entry in manifest["files"].items():
        file = root / name
        if Path(name).name != name:
            raise BundleError(f"{root}: manifest names a file outside the bundle: {name!r}")
        if not file.is_file():
            raise BundleError(f"{root}: {name} is missing")
        if file.stat().st_size != entry.get("size") or _sha256(file) != entry.get("sha256"):
            raise BundleError(f"{root}: {name} does not match its checksum in {MANIFEST} (altered or corrupted)")
    if manifest.get("model") not in manifest["files"]:
        raise BundleError(f"{root}: {MANIFEST} lists no model file")
    learning = manifest.get("learning")
    named = [manifest.get("onnx")] + ([learning.get(k) for k in ("learn_graph", "update_graph", "params")]
                                      if isinstance(learning, dict) else [])
    for name in named:
        if name is not None and name not in manifest["files"]:
            raise BundleError(f"{root}: {MANIFEST} names {name} without its checksum")
    if learning is not None and (not isinstance(learning, dict) or None in named[1:]):
        raise BundleError(f"{root}: the learning entry of {MANIFEST} is incomplete")
    return root, manifest


def _read_manifest(root: Path) -> dict:
    file = root / MANIFEST
    if not file.is_file():
        raise BundleError(f"{root} is not a stoprt bundle (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleError(f"{file} is not readable JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{root} is not a stoprt bundle ({MANIFEST} has another format)")
    if manifest.get("version") != VERSION:
        raise BundleError(f"{root} is a bundle of version {manifest.get('version')} (stoprt "
                          f"{manifest.get('versions', {}).get('stoprt')}); this stoprt {__version__} reads "
                          f"version {VERSION}")
    if CHECKSUM not in manifest:
        _log.warning("stoprt: warning: %s has no %s (written by an older stoprt); its fields are unverified. "
                     "Export the bundle again to add it.", file, CHECKSUM)
    elif manifest[CHECKSUM] != _manifest_sha256(manifest):
        raise BundleError(f"{file} does not match its {CHECKSUM} (a field was altered, or the file is corrupted)")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{file} has no file list")
    return manifest


def _manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's fields other than the checksum itself, as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _extract(archive: Path, root: Path) -> None:
    """Unpack plain files only, never outside ``root`` (no links, no absolute or ``..`` names)."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                if not m.isfile() or Path(m.name).name != m.name:
                    raise BundleError(f"{archive}: unexpected archive member {m.name!r} (a bundle holds plain files)")
            root.mkdir(parents=True, exist_ok=True)
            # The members were checked above; the "data" filter (Python >= 3.10.12) checks again.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, members=members, **safe)
    except tarfile.TarError as err:
        raise BundleError(f"{archive} is not a readable bundle archive: {err}") from err
