"""A one-line progress count for long commands, drawn on stderr only when a person watches it.

`add-pending` over a large collection runs for seconds; a terminal shows how far it got and how fast. Output
meant for scripts (stdout, `--json`, anything piped or captured) never carries it: the line is drawn only
when stderr is a terminal and is wiped before anything else is printed.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

# Redraws at most this often, so a fast run spends its time queueing, not drawing.
REDRAW_EVERY = 0.1


class Progress:
    """`12,000 records, 9,800/s` on one self-overwriting line of a terminal; does nothing elsewhere."""

    def __init__(self, noun: str, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self._stream = stream or sys.stderr
        self._enabled = enabled and self._stream.isatty()
        self._noun = noun
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._shown = False

    def update(self, seen: int) -> None:
        """Show `seen` items so far (skipped when the line was drawn a moment ago)."""
        now = time.monotonic()
        if not self._enabled or now - self._drawn_at < REDRAW_EVERY:
            return
        rate = seen / max(now - self._started, 1e-6)
        self._stream.write(f"\r\x1b[K{seen:,} {self._noun}, {rate:,.0f}/s")
        self._stream.flush()
        self._drawn_at, self._shown = now, True

    def clear(self) -> None:
        """Wipe the line, so other output starts on a clean one; the next `update` draws it again."""
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn_at, self._shown = 0.0, False
