"""A live status line for long waits, on a terminal only.

On a TTY the line is rewritten in place (``\\r``) with what is being waited on
and for how long; anywhere else (logs, CI, ``ray job submit``) it prints
nothing, so captured output holds only the real progress lines.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, TextIO


class StatusLine:
    """One rewritable line on ``stream`` (default stderr) when it is a TTY.

    Args:
        stream: Where to draw; nothing is drawn unless it is a terminal.
        min_interval: Seconds between redraws.
    """

    def __init__(self, stream: TextIO | None = None, min_interval: float = 0.25):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self._min_interval = min_interval
        self._last = 0.0
        self._shown = False

    def update(self, text: str) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last < self._min_interval:
            return
        self._last = now
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[2K" + text[:width])
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._shown = False

    def wrap(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """``echo`` that first clears the status line (so lines never mix)."""
        def cleared(line: str) -> None:
            self.clear()
            echo(line)
        return cleared
