"""Read system files under a configurable root, so that every reader also works on a fake tree.

A reader asks for an absolute system path ("/proc/meminfo"); with ``root="/tmp/orin"`` it reads
"/tmp/orin/proc/meminfo". Missing or unreadable files give ``None`` instead of raising: telemetry is
best effort, and one absent figure must not cost the others.
"""

from __future__ import annotations

import os
from pathlib import Path

PathLike = str | os.PathLike


def under(root: PathLike, path: PathLike) -> Path:
    """Map an absolute system path to the same path under ``root``."""
    return Path(root) / str(path).lstrip("/")


def is_host(root: PathLike) -> bool:
    """Whether ``root`` is this machine's real root rather than a fake tree."""
    return os.path.realpath(root) == "/"


def read_text(root: PathLike, path: PathLike) -> str | None:
    """The file's text, or None when it is missing, unreadable or not text."""
    try:
        return under(root, path).read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError):
        return None


def read_bytes(root: PathLike, path: PathLike) -> bytes | None:
    """The file's bytes (device-tree entries are NUL-terminated binary), or None."""
    try:
        return under(root, path).read_bytes()
    except OSError:
        return None


def read_number(path: Path) -> float | None:
    """One number from a sysfs attribute file (already resolved under the root), or None."""
    try:
        return float(path.read_text(encoding="ascii").strip())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def glob(root: PathLike, pattern: str) -> list[Path]:
    """Sorted matches of an absolute glob pattern under ``root``; empty when nothing matches."""
    try:
        return sorted(Path(root).glob(pattern.lstrip("/")))
    except OSError:
        return []
