"""The on-disk cache of generated data (built-in recordings, sklearn's digits): torch-free, so a
cached built-in stream plays on the edge install."""

from __future__ import annotations

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
    """The arrays of a cached ``.npz``, or None when it is absent or unreadable."""
    try:
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write a cache ``.npz`` atomically; a read-only or full disk only costs the cache."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file: np.savez would append .npz to a path
            np.savez(f, **arrays)
    except OSError:
        pass
