"""Atomic file writes: what the user has is never lost to a crash in the middle of a write.

Everything stoprt writes (checkpoints, model files, bundles, engines, metrics, caches) goes to a
temporary file in the target's folder, is flushed to disk, and is renamed over the target in one
step: after a crash either the old file or the new one is there, whole.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. The result gets
    the usual 0644 permissions (not the temporary file's private 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return write_bytes(path, text.encode())


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed :func:`atomic_path` writes of ``path`` left behind.

    Only names this module makes for ``path`` (``.NAME.XXXXXXXX.tmp`` beside it) are removed; call it
    at start, when no other writer of ``path`` runs. Returns the removed paths.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = [p for p in path.parent.iterdir() if ours.fullmatch(p.name) and p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
