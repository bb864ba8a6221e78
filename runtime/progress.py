"""A small terminal progress bar (no dependency): live on a terminal, sparse lines in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar.update(n, acc=0.9)`` advances by n; ``bar.close()`` prints the final line.

    On a terminal the line is redrawn in place at most ten times a second; otherwise (CI logs, pipes)
    a line is printed at every tenth of the total, so logs stay short.
    """

    def __init__(self, total: int, desc: str = "", stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total, self.desc = max(int(total), 1), desc
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.count, self.fields = 0, {}
        self.start = self._last_draw = time.perf_counter()
        self._last_decile = -1

    def update(self, n: int = 1, **fields) -> None:
        self.count += n
        self.fields.update(fields)
        if not self.enabled:
            return
        now = time.perf_counter()
        decile = 10 * self.count // self.total
        if self.live and now - self._last_draw >= 0.1:
            self._draw("\r", "")
            self._last_draw = now
        elif not self.live and decile > self._last_decile:
            self._last_decile = decile
            self._draw("", "\n")

    def _draw(self, prefix: str, suffix: str) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        frac = min(self.count / self.total, 1.0)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        extra = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())
        self.stream.write(f"{prefix}{self.desc} {100 * frac:3.0f}% |{bar}| {self.count}/{self.total} "
                          f"[{elapsed:.0f}s<{eta:.0f}s, {rate:.1f}/s] {extra}{suffix}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.live:
            self._draw("\r", "\n")
