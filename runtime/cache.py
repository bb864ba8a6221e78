"""The on-disk cache of generated data (built-in recordings, sklearn's digits): torch-free, so a
cached built-in stream plays on the edge install."""

from __future__ import annotations

import io
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from .atomic import atomic_path

CACHE_VERSION = 2  # bump whenever generation changes, so stale on-disk caches are not reused


def cache_dir() -> Path:
    """``$STOPRT_CACHE_DIR``, default ``~/.cache/stoprt``."""
    return Path(os.environ.get("STOPRT_CACHE_DIR") or Path.home() / ".cache" / "stoprt")


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cached ``.npz`` (writable), or None when it is absent or unreadable."""
    try:
        with zipfile.ZipFile(path) as stored:
            return {name.removesuffix(".npy"): _npy_array(bytearray(stored.read(name))) for name in stored.namelist()}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _npy_array(data: bytearray) -> np.ndarray:
    """The array of a ``.npy`` file's bytes, a view of them: ``np.load`` copies a structured array
    (the built-in streams' events) field by field, 30 times slower than reading the file."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("a cache holds no object arrays")
    count = math.prod(shape)
    array = np.frombuffer(data, dtype, count=count, offset=stream.tell())
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write a cache ``.npz`` atomically; a read-only or full disk only costs the cache."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file: np.savez would append .npz to a path
            np.savez(f, **arrays)
    except OSError:
        pass
