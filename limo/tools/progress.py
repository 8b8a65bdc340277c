"""Progress bars that read well where they land: redrawn in place on a terminal, a line at a time
in a log file.

tqdm redraws its bar with a carriage return. On a terminal that is what one wants; written to a
file (torchrun's log, `make demo > log`, CI) every redraw lands on one endless line: 30 KB of
progress text for a 3-step run. Off a terminal the bar here writes a whole line instead, at most
once every LOG_INTERVAL_S seconds (and when it closes).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file-like that turns each of tqdm's carriage-return redraws into one plain line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, unit: str, *, stream: TextIO | None = None, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on `stream` (default stderr): in place on a terminal, else a line per LOG_INTERVAL_S."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=disable, dynamic_ncols=True, **kwargs)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), disable=disable, ncols=120, mininterval=LOG_INTERVAL_S,
                maxinterval=LOG_INTERVAL_S, **kwargs)  # fmt: skip
