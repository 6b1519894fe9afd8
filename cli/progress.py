"""A progress bar on stderr with done, total, rate and ETA, shown only on a terminal.

The bar is drawn by this module, not by a library such as tqdm. The library
side already reports (done, total) through callbacks, so drawing one line takes
less code than the glue and type stubs that a library would bring.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from .context import human_size

# Redraws per second at most: enough to look live, few enough to cost nothing.
_MAX_REDRAWS_PER_SECOND = 10
_BAR_WIDTH = 20


def format_eta(seconds: float) -> str:
    """Return a duration as M:SS, or H:MM:SS from one hour on."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLine:
    """Rewrites one stderr line with a bar, the done and total amounts, a rate and an ETA.

    Silent unless ``enabled`` and stderr is a terminal. Amounts are bytes unless
    ``unit`` is given, in which case they are counts of that unit (such as
    ``snapshots``) and the rate is per second.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.monotonic()
        self._shown = False
        self._last_draw = 0.0

    def update(
        self, message: str, done: int = 0, total: int | None = None, unit: str = "B"
    ) -> None:
        """Show ``message`` after the bar for ``done`` of ``total`` (no bar without a total)."""
        if not self.enabled:
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        if not finished and now - self._last_draw < 1 / _MAX_REDRAWS_PER_SECOND:
            return
        self._last_draw = now
        line = render(done, total, now - self.started, message, unit)
        width = shutil.get_terminal_size((100, 24)).columns
        sys.stderr.write("\r\x1b[K" + line[: max(width - 1, 20)])
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        """End the line, so that later output starts on a line of its own."""
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._shown = False


def render(done: int, total: int | None, elapsed: float, message: str, unit: str = "B") -> str:
    """Return the progress line: bar and percentage (with a total), amounts, rate, ETA."""
    elapsed = max(elapsed, 1e-6)
    rate = done / elapsed
    parts = []
    if total:
        share = min(done / total, 1.0)
        filled = int(share * _BAR_WIDTH)
        parts.append("[" + "#" * filled + "." * (_BAR_WIDTH - filled) + f"] {share * 100:3.0f}%")
    if unit == "B":
        amount = human_size(done) + (f" of {human_size(total)}" if total else "")
        parts.append(amount)
        parts.append(f"{rate / 1e6:.1f} MB/s")
    else:
        parts.append(f"{done}" + (f" of {total}" if total else "") + f" {unit}")
        parts.append(f"{rate:.1f} {unit}/s")
    if total and done < total and rate > 0:
        parts.append("ETA " + format_eta((total - done) / rate))
    if message:
        parts.append(message)
    return "  ".join(parts)


def progress_line(args: argparse.Namespace) -> ProgressLine:
    """Return a progress line that is silent with --quiet or --json, or off a terminal."""
    return ProgressLine(enabled=not args.quiet and not args.json)
