"""A one-line progress display on stderr, shown only on a terminal."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """Rewrites one stderr line with a message and a rate; silent off a terminal."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.monotonic()
        self._shown = False

    def update(self, message: str, done_bytes: int = 0) -> None:
        """Show ``message`` with the rate of ``done_bytes`` since the start, in MB/s."""
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done_bytes / elapsed / 1e6
        sys.stderr.write(f"\r\x1b[K{message}, {rate:.0f} MB/s")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        """End the line."""
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
